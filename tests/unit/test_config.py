"""Config loading: every error case in config_cases/, the shipped configs, defaults."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pydantic
import pytest

from proxy.config import Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).parent / "config_cases"
EXPECT_PREFIX = "# expect: "


def _expected_lines(path: Path) -> list[str]:
    """Each case file starts with `# expect: <location>: <message>` lines."""
    lines = path.read_text().splitlines()
    return [line.removeprefix(EXPECT_PREFIX) for line in lines if line.startswith(EXPECT_PREFIX)]


@pytest.mark.parametrize("case", sorted(CASES.glob("*.yaml")), ids=lambda path: path.stem)
def test_error_case_reports_exactly_the_expected_lines(case: Path) -> None:
    expected = [f"{case}: {line}" for line in _expected_lines(case)]
    assert expected, f"{case.name} has no '# expect:' line"

    with pytest.raises(ConfigError) as raised:
        load_config(str(case))

    assert raised.value.errors == expected


def test_there_are_enough_error_cases() -> None:
    assert len(list(CASES.glob("*.yaml"))) >= 20


def test_missing_file_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert raised.value.errors == [f"{path}: cannot read config file: No such file or directory"]


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert raised.value.errors == [f"{path}: the file is empty (expected a mapping of settings)"]


def test_error_message_is_every_line() -> None:
    error = ConfigError(["a: b: one", "a: c: two"])
    assert str(error) == "a: b: one\na: c: two"


# ----------------------------------------------------------------------- shipped configs


def test_example_config_loads_with_the_documented_values() -> None:
    config = load_config(str(REPO / "config" / "sluicegate.yaml"))

    assert config.summary() == "2 routes, 1 upstream, 3 servers"
    assert [(listener.host, listener.port, listener.tls) for listener in config.listen] == [
        ("0.0.0.0", 8080, None)
    ]
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 9901)
    assert config.admin.token_env == "SLUICEGATE_ADMIN_TOKEN"
    assert config.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),)
    assert config.redis is not None
    assert (config.redis.url, config.redis.timeout, config.redis.instances) == (
        "redis://127.0.0.1:6379/0",
        0.05,
        1,
    )
    assert config.limits.max_header_bytes == 16 * 1024
    assert config.limits.max_body_bytes == 10 * 1024 * 1024

    api = config.upstreams["api"]
    assert api.name == "api"
    assert api.policy == "least_conn"
    assert api.hash_key == "client_ip"  # as in SPEC; only ip_hash reads it
    assert [(s.scheme, s.host, s.port, s.weight, s.backup) for s in api.servers] == [
        ("http", "10.0.0.1", 8080, 3, False),
        ("http", "10.0.0.2", 8080, 2, False),
        ("http", "10.0.0.3", 8080, 1, True),
    ]
    assert (api.timeouts.connect, api.timeouts.read) == (1.0, 30.0)
    assert api.health_check is not None
    assert api.health_check.expect_status == (200, 399)
    assert api.health_check.flap_damping is not None
    assert api.health_check.flap_damping.hold_down == 30.0
    assert api.retry.on == frozenset({"error", "timeout", "http_502", "http_503", "http_504"})
    assert api.retry.max_body_bytes == 1024 * 1024

    first = config.routes[0]
    assert first.name == "api"
    assert first.match.host == "api.example.com"
    assert first.match.path_prefix == "/v1/"
    assert first.match.methods == frozenset({"GET", "POST"})
    assert first.match.headers == {"x-canary": "1"}  # names lower-cased for matching
    assert first.rate_limit is not None
    assert (first.rate_limit.rate, first.rate_limit.burst) == (100.0, 200)
    assert config.routes[1].match.path_prefix == "/"


def test_demo_config_loads_with_the_demo_values() -> None:
    config = load_config(str(REPO / "config" / "demo.yaml"))

    assert config.summary() == "3 routes, 1 upstream, 3 servers"
    assert [(listener.host, listener.port) for listener in config.listen] == [("127.0.0.1", 8080)]
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 9901)
    assert config.redis is None
    demo = config.upstreams["demo"]
    assert demo.policy == "round_robin"
    assert [server.port for server in demo.servers] == [8081, 8082, 8083]
    assert demo.health_check is not None
    assert (demo.health_check.path, demo.health_check.interval) == ("/health", 1.0)
    cached, limited, default = config.routes
    assert (cached.name, cached.match.path_prefix) == ("cached", "/cacheable/")
    assert cached.cache is not None and cached.compress is not None
    assert config.cache is not None and config.cache.store == "memory"
    assert limited.name == "limited"
    assert limited.match.path_prefix == "/limited/"
    assert limited.strip_prefix is True
    assert limited.rate_limit is not None
    assert (limited.rate_limit.rate, limited.rate_limit.burst) == (5.0, 10)
    assert (default.match.path_prefix, default.rate_limit) == ("/", None)


# ---------------------------------------------------------------------------- defaults

MINIMAL = {
    "upstreams": {"api": {"servers": [{"url": "http://127.0.0.1:9000"}]}},
    "routes": [{"name": "all", "upstream": "api"}],
}


def test_defaults_fill_every_omitted_key() -> None:
    config = parse_config(MINIMAL, "mem.yaml")

    assert config.source == "mem.yaml"
    assert [(listener.address, listener.host, listener.port) for listener in config.listen] == [
        ("0.0.0.0:8080", "0.0.0.0", 8080)
    ]
    assert (config.admin.address, config.admin.token_env) == ("127.0.0.1:9901", None)
    assert config.workers == 1
    assert config.trusted_proxies == ()
    assert config.shutdown_timeout == 30.0
    assert config.redis is None
    limits = config.limits
    assert (limits.max_header_bytes, limits.max_body_bytes) == (16384, 10 * 1024 * 1024)
    assert (limits.client_header_timeout, limits.client_body_timeout) == (10.0, 30.0)
    assert (limits.keepalive_timeout, limits.max_connections) == (75.0, 10000)
    assert (config.logging.level, config.logging.access_log, config.logging.format) == (
        "info",
        True,
        "json",
    )

    api = config.upstreams["api"]
    assert (api.name, api.policy, api.hash_key, api.keepalive) == ("api", "round_robin", None, 64)
    assert (api.timeouts.connect, api.timeouts.read) == (1.0, 30.0)
    assert api.failure_on == frozenset(
        {"error", "timeout", "invalid_header", "http_502", "http_503", "http_504"}
    )
    assert api.health_check is None
    assert api.min_healthy_percent == 0
    breaker = api.circuit_breaker
    assert (breaker.failure_threshold, breaker.open_duration, breaker.half_open_requests) == (
        5,
        30.0,
        1,
    )
    assert (breaker.failure_rate, breaker.min_requests, breaker.window) == (None, 20, 10.0)
    retry = api.retry
    assert (retry.tries, retry.timeout, retry.on) == (3, 10.0, frozenset({"error", "timeout"}))
    assert (retry.max_body_bytes, retry.budget) == (1024 * 1024, 0.2)
    server = api.servers[0]
    assert (server.scheme, server.host, server.port, server.weight, server.backup) == (
        "http",
        "127.0.0.1",
        9000,
        1,
        False,
    )

    route = config.routes[0]
    assert (route.match.host, route.match.path_prefix, route.match.methods) == (None, "/", None)
    assert (route.match.headers, route.match.cookie) == ({}, {})
    assert (route.strip_prefix, route.rate_limit) == (False, None)


def test_nested_defaults_when_a_section_is_present() -> None:
    data = {
        **MINIMAL,
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "upstreams": {
            "api": {
                "policy": "ip_hash",
                "servers": [{"url": "https://example.com"}],
                "health_check": {"flap_damping": {}},
            }
        },
        "routes": [{"name": "all", "upstream": "api", "rate_limit": {"rate": "2.5/s"}}],
    }
    config = parse_config(data, "mem.yaml")

    assert config.redis is not None
    assert (config.redis.timeout, config.redis.instances) == (0.05, 1)
    api = config.upstreams["api"]
    assert api.hash_key == "client_ip"  # ip_hash hashes the client address by default
    assert (api.servers[0].scheme, api.servers[0].port) == ("https", 443)
    check = api.health_check
    assert check is not None
    assert (check.path, check.interval, check.timeout) == ("/health", 2.0, 1.0)
    assert (check.healthy_threshold, check.unhealthy_threshold) == (2, 3)
    assert check.expect_status == (200, 399)
    assert check.flap_damping is not None
    flap = check.flap_damping
    assert (flap.max_flips, flap.window, flap.hold_down) == (4, 60.0, 30.0)
    limit = config.routes[0].rate_limit
    assert limit is not None
    assert (limit.rate, limit.burst, limit.key) == (2.5, 3, "client_ip")  # burst = ceil(rate)
    assert (limit.on_redis_error, limit.mode) == ("local", "enforce")


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("0.0.0.0:8080", "0.0.0.0", 8080),
        ("[::1]:8080", "::1", 8080),
        (":8080", "0.0.0.0", 8080),
        ("localhost:80", "localhost", 80),
        (8080, "0.0.0.0", 8080),
    ],
)
def test_listen_address_forms(address: object, host: str, port: int) -> None:
    config = parse_config({**MINIMAL, "listen": [{"address": address}]}, "mem.yaml")
    assert (config.listen[0].host, config.listen[0].port) == (host, port)


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port"),
    [
        ("http://10.0.0.1", "http", "10.0.0.1", 80),
        ("https://api.example.com/", "https", "api.example.com", 443),
        ("http://[::1]:9000", "http", "::1", 9000),
    ],
)
def test_server_url_forms(url: str, scheme: str, host: str, port: int) -> None:
    data = {**MINIMAL, "upstreams": {"api": {"servers": [{"url": url}]}}}
    server = parse_config(data, "mem.yaml").upstreams["api"].servers[0]
    assert (server.url, server.scheme, server.host, server.port) == (url, scheme, host, port)


def test_yaml_on_is_a_key_and_values_are_normalised(tmp_path: Path) -> None:
    # YAML 1.1 would read `on:` as the boolean True; the loader keeps it a key.
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstreams:\n"
        "  api:\n"
        "    servers: [{url: 'http://a:1'}]\n"
        "    retry: {on: [error, non_idempotent]}\n"
        "    health_check: {expect_status: 204}\n"
        "routes:\n"
        "  - name: r\n"
        "    upstream: api\n"
        "    match: {methods: [get, Post], host: '*.Example.com', headers: {X-Canary: 1}}\n"
    )
    config = load_config(str(path))
    api = config.upstreams["api"]
    assert api.retry.on == frozenset({"error", "non_idempotent"})
    assert api.health_check is not None
    assert api.health_check.expect_status == (204, 204)
    match = config.routes[0].match
    assert match.methods == frozenset({"GET", "POST"})
    assert match.host == "*.example.com"
    assert match.headers == {"x-canary": "1"}


def test_summary_is_singular_for_one() -> None:
    assert parse_config(MINIMAL, "mem.yaml").summary() == "1 route, 1 upstream, 1 server"


def test_summary_counts_servers_over_all_upstreams() -> None:
    data = {
        "upstreams": {
            "a": {"servers": [{"url": "http://a:1"}, {"url": "http://a:2"}]},
            "b": {"servers": [{"url": "http://b:1"}]},
        },
        "routes": [
            {"name": "one", "upstream": "a"},
            {"name": "two", "upstream": "b"},
            {"name": "three", "upstream": "a"},
        ],
    }
    assert parse_config(data, "mem.yaml").summary() == "3 routes, 2 upstreams, 3 servers"


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL, "mem.yaml")
    with pytest.raises(pydantic.ValidationError):
        config.workers = 4  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.upstreams["api"].servers[0].weight = 9  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.routes[0].match.path_prefix = "/x"  # type: ignore[misc]
    assert isinstance(config.routes, tuple)
    assert isinstance(config.upstreams["api"].servers, tuple)


def test_parse_config_does_not_modify_its_input() -> None:
    data = {
        "upstreams": {"api": {"servers": [{"url": "http://a:1"}]}},
        "routes": [{"name": "r", "upstream": "api"}],
    }
    parse_config(data, "mem.yaml")
    assert data["upstreams"] == {"api": {"servers": [{"url": "http://a:1"}]}}


def test_same_input_gives_equal_configs() -> None:
    assert parse_config(MINIMAL, "a.yaml").upstreams == parse_config(MINIMAL, "b.yaml").upstreams


# --------------------------------------------------------------------------------- TLS


def _write_pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert(name)
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def test_tls_listener_with_a_valid_pair_loads(tmp_path: Path) -> None:
    cert, key = _write_pair(tmp_path, "proxy.test")
    listen = [{"address": ":8443", "tls": {"cert": str(cert), "key": str(key)}}]
    config = parse_config({**MINIMAL, "listen": listen}, "mem.yaml")
    assert config.listen[0].tls is not None
    assert config.listen[0].tls.cert == str(cert)


def test_tls_cert_and_key_that_do_not_match_is_an_error(tmp_path: Path) -> None:
    cert, _ = _write_pair(tmp_path, "one.test")
    _, other_key = _write_pair(tmp_path, "two.test")
    listen = [{"address": ":8443", "tls": {"cert": str(cert), "key": str(other_key)}}]
    with pytest.raises(ConfigError) as raised:
        parse_config({**MINIMAL, "listen": listen}, "mem.yaml")
    [line] = raised.value.errors
    assert line.startswith(
        f"mem.yaml: listen[0].tls: cannot load certificate '{cert}' with key '{other_key}': "
    )


def test_config_is_a_config() -> None:
    assert isinstance(parse_config(MINIMAL, "mem.yaml"), Config)


def _upstream_config(**keys: object) -> dict:
    return {
        **MINIMAL,
        "upstreams": {"api": {"servers": [{"url": "http://127.0.0.1:1"}], **keys}},
        "routes": [{"name": "all", "upstream": "api"}],
    }


def test_policy_names_are_the_registry_of_policies() -> None:
    from proxy.balancing.policies import POLICIES

    for name in POLICIES:
        assert parse_config(_upstream_config(policy=name), "p.yaml").upstreams["api"].policy == name
    with pytest.raises(ConfigError) as error:
        parse_config(_upstream_config(policy="fastest"), "p.yaml")
    assert all(name in str(error.value) for name in POLICIES)


def test_failure_words_are_the_retry_vocabulary() -> None:
    from proxy.balancing.retry import FAILURE_WORDS, FailureKind, status_word

    assert {kind.value for kind in FailureKind} <= set(FAILURE_WORDS)
    assert status_word(502) in FAILURE_WORDS
    upstream = _upstream_config(failure_on=list(FAILURE_WORDS), retry={"on": list(FAILURE_WORDS)})
    api = parse_config(upstream, "f.yaml").upstreams["api"]
    assert api.failure_on == frozenset(FAILURE_WORDS) == api.retry.on
    with pytest.raises(ConfigError):
        parse_config(_upstream_config(failure_on=["http_418"]), "f.yaml")
