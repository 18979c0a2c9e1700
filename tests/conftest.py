"""Fixtures shared by every layer of the suite (plugins live in tests/support/)."""

pytest_plugins = [
    "tests.support.redis_server",
    "tests.support.backends",
    "tests.support.daemon",
    "tests.support.faulty",
    "tests.support.dnsserver",
]
