"""Routing and selection policies end to end: the real daemon in front of demo backends.

Every demo backend names itself in ``X-Backend``, which is how these tests see where a
request went.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import Any

import pytest

from tests.support.backends import free_port
from tests.support.daemon import http_request, wait_for


@pytest.fixture
def backends(spawn_backend):
    """name -> url of four subprocess demo backends a, b, c, d."""
    return {name: f"http://127.0.0.1:{spawn_backend(name)[1]}" for name in "abcd"}


def backend_of(port: int, path: str = "/", **kwargs: Any) -> str:
    status, headers, body = http_request(port, kwargs.pop("method", "GET"), path, **kwargs)
    assert "x-backend" in headers, (status, body)  # answered by a backend (maybe its 404)
    return headers["x-backend"]


def one_upstream(*servers: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"u": {"servers": list(servers), **upstream}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "u"}],
    }


# -- routing -------------------------------------------------------------------------------------


def test_routes_by_host_path_method_header_cookie(start_sluicegate, backends):
    def up(name: str) -> dict[str, Any]:
        return {"servers": [{"url": backends[name]}]}

    daemon = start_sluicegate(
        {
            "upstreams": {"A": up("a"), "B": up("b"), "C": up("c"), "D": up("d")},
            "routes": [
                {"name": "exact", "match": {"host": "api.example.com"}, "upstream": "A"},
                {"name": "wild", "match": {"host": "*.example.com"}, "upstream": "B"},
                {"name": "canary", "match": {"headers": {"X-Canary": "1"}}, "upstream": "C"},
                {"name": "beta", "match": {"cookie": {"tier": "beta"}}, "upstream": "C"},
                {
                    "name": "writes",
                    "match": {"path_prefix": "/w/", "methods": ["POST", "PUT"]},
                    "upstream": "D",
                },
                {"name": "api", "match": {"path_prefix": "/api/"}, "upstream": "B"},
                {"name": "api-shadowed", "match": {"path_prefix": "/api/v2/"}, "upstream": "C"},
                {"name": "root", "match": {"path_prefix": "/"}, "upstream": "A"},
            ],
        }
    )
    port = daemon.port

    def via(path: str = "/", *, host: str = "plain.test", **kwargs: Any) -> str:
        headers = {"Host": host, **kwargs.pop("headers", {})}
        return backend_of(port, path, headers=headers, **kwargs)

    assert via(host="api.example.com") == "a"
    assert via(host="API.Example.com:8080") == "a"
    assert via(host="www.example.com") == "b"
    assert via(host="deep.www.example.com") == "b"
    assert via(host="example.com") == "a"  # not *.example.com: falls through to root
    assert via(headers={"X-Canary": "1"}) == "c"
    assert via(headers={"X-Canary": "0"}) == "a"
    assert via(headers={"Cookie": "sid=1; tier=beta"}) == "c"
    assert via(headers={"Cookie": "tier=alpha"}) == "a"
    assert via("/w/x", method="POST", body=b"{}") == "d"
    assert via("/w/x", method="PUT", body=b"{}") == "d"
    assert via("/w/x") == "a"  # GET is not a listed method
    assert via("/api/x") == "b"
    assert via("/api/v2/x") == "b"  # first match wins
    # host routes come first: they win over path and header routes
    assert via("/api/x", host="api.example.com", headers={"X-Canary": "1"}) == "a"


def test_no_route_is_404(start_sluicegate, backends):
    daemon = start_sluicegate(
        {
            "upstreams": {"u": {"servers": [{"url": backends["a"]}]}},
            "routes": [
                {
                    "name": "only",
                    "match": {"host": "only.test", "path_prefix": "/x/"},
                    "upstream": "u",
                }
            ],
        }
    )
    for path, host in (("/x/1", "other.test"), ("/y", "only.test")):
        status, headers, body = http_request(daemon.port, "GET", path, headers={"Host": host})
        assert status == 404
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["request_id"] == headers["x-request-id"]
    assert backend_of(daemon.port, "/x/1", headers={"Host": "only.test"}) == "a"


def test_strip_prefix(start_sluicegate, backends):
    daemon = start_sluicegate(
        {
            "upstreams": {"u": {"servers": [{"url": backends["a"]}]}},
            "routes": [
                {
                    "name": "api",
                    "match": {"path_prefix": "/api/"},
                    "upstream": "u",
                    "strip_prefix": True,
                },
                {"name": "keep", "match": {"path_prefix": "/keep/"}, "upstream": "u"},
            ],
        }
    )
    seen = json.loads(http_request(daemon.port, "GET", "/api/echo?x=%2F")[2])
    assert seen["path"] == "/echo?x=%2F"
    status, headers, _ = http_request(daemon.port, "GET", "/keep/echo")
    assert (status, headers["x-backend"]) == (404, "a")  # not stripped: the backend has no /keep
    status, _, body = http_request(daemon.port, "GET", "/api/")
    assert status == 200 and body == b"a\n"  # "/api/" -> "/"


# -- policies ------------------------------------------------------------------------------------


def test_round_robin_weighted_exact_sequence(start_sluicegate, backends):
    daemon = start_sluicegate(
        one_upstream(
            {"url": backends["a"], "weight": 5},
            {"url": backends["b"]},
            {"url": backends["c"]},
            policy="round_robin",
        )
    )
    sequence = "".join(backend_of(daemon.port) for _ in range(14))
    assert sequence == "aabacaa" * 2


def test_ip_hash_sticks_per_forwarded_client(start_sluicegate, backends):
    config = one_upstream(*({"url": backends[n]} for n in "abc"), policy="ip_hash")
    config["trusted_proxies"] = ["127.0.0.1/32"]
    daemon = start_sluicegate(config)
    chosen: dict[str, str] = {}
    for i in range(40):
        client = f"198.51.100.{i}"
        chosen[client] = backend_of(daemon.port, headers={"X-Forwarded-For": client})
    assert len(set(chosen.values())) == 3  # the keys spread
    for client, name in list(chosen.items())[:10]:
        for _ in range(3):
            # the rightmost untrusted hop is the client: a forged leftmost entry changes nothing
            xff = f"6.6.6.{len(client)}, {client}"
            assert backend_of(daemon.port, headers={"X-Forwarded-For": xff}) == name


def test_ip_hash_with_header_key(start_sluicegate, backends):
    daemon = start_sluicegate(
        one_upstream(
            *({"url": backends[n]} for n in "abc"), policy="ip_hash", hash_key="header:X-User"
        )
    )
    chosen = {
        f"user{i}": backend_of(daemon.port, headers={"X-User": f"user{i}"}) for i in range(30)
    }
    assert len(set(chosen.values())) >= 2
    for user, name in chosen.items():
        assert backend_of(daemon.port, headers={"X-User": user}) == name


def test_least_conn_prefers_the_idle_server(start_sluicegate, backends):
    daemon = start_sluicegate(
        one_upstream({"url": backends["a"]}, {"url": backends["b"]}, policy="least_conn")
    )
    slow: dict[str, str] = {}

    def slow_request() -> None:
        slow["backend"] = backend_of(daemon.port, "/delay/1500")

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_for(
        lambda: any(s["in_flight"] for s in daemon.status()["upstreams"]["u"]["servers"]),
        message="the slow request in flight",
    )
    quick = [backend_of(daemon.port) for _ in range(6)]
    thread.join()
    busy = slow["backend"]
    assert busy not in quick
    assert len(set(quick)) == 1


def test_backup_only_when_primaries_are_drained(start_sluicegate, backends):
    daemon = start_sluicegate(
        one_upstream(
            {"url": backends["a"]},
            {"url": backends["b"]},
            {"url": backends["c"], "backup": True},
        )
    )
    assert set(backend_of(daemon.port) for _ in range(10)) == {"a", "b"}
    assert daemon.admin("POST", "/upstreams/u/servers/0/drain")[0] == 200
    assert set(backend_of(daemon.port) for _ in range(4)) == {"b"}
    assert daemon.admin("POST", "/upstreams/u/servers/1/drain")[0] == 200
    assert set(backend_of(daemon.port) for _ in range(4)) == {"c"}
    assert daemon.admin("POST", "/upstreams/u/servers/2/drain")[0] == 200
    status, headers, body = http_request(daemon.port, "GET", "/")
    assert status == 503
    assert json.loads(body)["request_id"] == headers["x-request-id"]
    assert daemon.admin("POST", "/upstreams/u/servers/0/undrain")[0] == 200
    assert set(backend_of(daemon.port) for _ in range(4)) == {"a"}


def test_backup_when_primaries_are_down(start_sluicegate, backends):
    dead = f"http://127.0.0.1:{free_port()}"
    daemon = start_sluicegate(
        one_upstream(
            {"url": dead},
            {"url": backends["c"], "backup": True},
            health_check={
                "path": "/health",
                "interval": "100ms",
                "timeout": "200ms",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
            },
        )
    )
    wait_for(
        lambda: daemon.status()["upstreams"]["u"]["servers"][0]["health"] == "down",
        message="the dead primary marked down",
    )
    assert collections.Counter(backend_of(daemon.port) for _ in range(5)) == {"c": 5}


def test_keep_alive_client_requests_are_balanced_per_request(start_sluicegate, backends):
    """Selection is per request, not per client connection."""
    import http.client

    daemon = start_sluicegate(
        one_upstream({"url": backends["a"]}, {"url": backends["b"]}, policy="round_robin")
    )
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
    seen = []
    for _ in range(4):
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        seen.append(response.getheader("X-Backend"))
    conn.close()
    assert seen == ["a", "b", "a", "b"]
    time.sleep(0)
