"""Router: ordered routes, host (exact and wildcard), path prefix, methods, headers, cookies."""

from __future__ import annotations

import pytest

from proxy.config import MatchConfig
from proxy.pipeline.routing import Router, cookie_value, host_without_port


class FakeRequest:
    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]

    def header(self, lowered_name: bytes) -> bytes | None:
        for name, value in self.headers:
            if name.lower() == lowered_name:
                return value
        return None


def router(*routes: tuple[str, dict]) -> Router:
    return Router((name, MatchConfig(**match)) for name, match in routes)


def match(
    r: Router,
    path: str = "/",
    *,
    method: str = "GET",
    host: str | None = "example.com",
    headers: dict[str, str] | None = None,
) -> str | None:
    return r.match(
        method.encode(),
        host.encode() if host is not None else None,
        path.encode(),
        FakeRequest(headers),
    )


def test_host_without_port():
    assert host_without_port(b"Example.COM:8080") == b"example.com"
    assert host_without_port(b"example.com") == b"example.com"
    assert host_without_port(b"[::1]:80") == b"[::1]"
    assert host_without_port(b"[::1]") == b"[::1]"


def test_exact_host_is_case_insensitive_and_ignores_port():
    r = router(("api", {"host": "api.example.com"}))
    assert match(r, host="api.example.com") == "api"
    assert match(r, host="API.Example.Com:8443") == "api"
    assert match(r, host="www.example.com") is None
    assert match(r, host="xapi.example.com") is None
    assert match(r, host=None) is None


def test_wildcard_host_matches_subdomains_only():
    r = router(("wild", {"host": "*.example.com"}))
    assert match(r, host="a.example.com") == "wild"
    assert match(r, host="a.b.example.com:81") == "wild"
    assert match(r, host="example.com") is None
    assert match(r, host=".example.com") is None
    assert match(r, host="badexample.com") is None
    assert match(r, host="example.com.evil.org") is None


def test_path_prefix_is_a_byte_prefix():
    r = router(("v1", {"path_prefix": "/v1/"}), ("root", {"path_prefix": "/"}))
    assert match(r, "/v1/users") == "v1"
    assert match(r, "/v1/") == "v1"
    assert match(r, "/v1") == "root"
    assert match(r, "/v10/x") == "root"


def test_methods():
    r = router(("write", {"methods": ["POST", "PUT"]}), ("any", {}))
    assert match(r, method="POST") == "write"
    assert match(r, method="PUT") == "write"
    assert match(r, method="GET") == "any"


def test_header_condition_exact_value_name_case_insensitive():
    r = router(("canary", {"headers": {"X-Canary": "1"}}), ("main", {}))
    assert match(r, headers={"x-canary": "1"}) == "canary"
    assert match(r, headers={"X-CANARY": "1"}) == "canary"
    assert match(r, headers={"X-Canary": "0"}) == "main"
    assert match(r, headers={"X-Canary": "11"}) == "main"
    assert match(r) == "main"


def test_cookie_condition():
    r = router(("beta", {"cookie": {"tier": "beta"}}), ("main", {}))
    assert match(r, headers={"Cookie": "a=1; tier=beta; b=2"}) == "beta"
    assert match(r, headers={"Cookie": 'tier="beta"'}) == "beta"
    assert match(r, headers={"Cookie": "tier=gamma"}) == "main"
    assert match(r, headers={"Cookie": "xtier=beta"}) == "main"
    assert match(r) == "main"


def test_every_condition_must_hold():
    r = router(
        (
            "strict",
            {
                "host": "api.example.com",
                "path_prefix": "/v1/",
                "methods": ["POST"],
                "headers": {"X-Canary": "1"},
            },
        ),
    )
    ok = {
        "path": "/v1/x",
        "method": "POST",
        "host": "api.example.com",
        "headers": {"X-Canary": "1"},
    }
    assert match(r, **ok) == "strict"
    for key, bad in (("path", "/v2/x"), ("method", "GET"), ("host", "other.com"), ("headers", {})):
        assert match(r, **{**ok, key: bad}) is None


def test_first_match_wins():
    r = router(("first", {"path_prefix": "/a"}), ("second", {"path_prefix": "/a/b"}))
    assert match(r, "/a/b/c") == "first"


def test_no_route_gives_none():
    r = router(("only", {"path_prefix": "/api/"}))
    assert match(r, "/other") is None


@pytest.mark.parametrize(
    ("header", "name", "expected"),
    [
        (None, b"a", None),
        (b"", b"a", None),
        (b"a=1", b"a", b"1"),
        (b"b=2;a=1", b"a", b"1"),
        (b"a", b"a", None),
        (b'a="q"', b"a", b"q"),
        (b"A=1", b"a", None),
    ],
)
def test_cookie_value(header, name, expected):
    assert cookie_value(header, name) == expected
