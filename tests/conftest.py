"""Fixtures shared by every layer of the suite (plugins live in tests/support/)."""

import pytest

pytest_plugins = [
    "tests.support.redis_server",
    "tests.support.backends",
    "tests.support.daemon",
    "tests.support.faulty",
    "tests.support.dnsserver",
]


def pytest_sessionstart(session) -> None:
    # An extension module older than its .py runs the old code: every test would then
    # check something other than the source it reads.
    from proxy.compiled import stale_extensions

    stale = stale_extensions()
    if stale:
        raise pytest.UsageError(f"stale compiled modules {', '.join(stale)}: run `make venv`")
