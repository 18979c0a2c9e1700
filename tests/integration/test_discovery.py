"""Upstreams that come and go, end to end: DNS discovery against a real (test) DNS server,
slow start measured in traffic, sticky cookies across two instances, zone affinity.

Backends listen on 127.0.0.2, 127.0.0.3, ... (all of 127.0.0.0/8 is loopback), one port
for all of them, so that the addresses DNS hands out are what tells them apart. Each one
names itself in ``X-Backend``.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from typing import Any

import pytest
import trustme

from proxy.balancing.discovery import DnsLookup, LookupFailed, address_order
from tests.integration.test_https_upstream import describe, server_context
from tests.support.backends import free_port
from tests.support.daemon import http_request, wait_for
from tests.support.rawupstream import RawUpstream

PERIOD = 0.2  # resolve: 200ms


def resolved_upstream(dns_address: str, port: int, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {
            "api": {
                "servers": [{"url": f"http://api.test:{port}", "resolve": "200ms"}],
                "resolvers": [dns_address],
                **upstream,
            }
        },
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "api"}],
    }


def backend_of(port: int, path: str = "/", **kwargs: Any) -> str:
    status, headers, body = http_request(port, "GET", path, **kwargs)
    assert status == 200 and "x-backend" in headers, (status, body)
    return headers["x-backend"]


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value (0 when absent), whatever the order of its labels."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return float(match.group(2))
    return 0.0


@pytest.fixture
def loopback_backends(spawn_backend):
    """``start(*last_octets) -> port``: demo backends b<N> on 127.0.0.<N>, one shared port."""
    port = free_port()

    def start(*octets: int) -> int:
        for octet in octets:
            spawn_backend(f"b{octet}", host=f"127.0.0.{octet}", port=port)
        return port

    return start


async def test_lookup_asks_a_and_aaaa_of_the_configured_server(dns_server):
    lookup = DnsLookup([dns_server.address], timeout=1.0)
    dns_server.set("dual.test", "::1", "127.0.0.9", "127.0.0.10")
    found = await lookup.addresses("dual.test")
    assert sorted(((ip, 80) for ip in found), key=address_order) == [
        ("127.0.0.9", 80),
        ("127.0.0.10", 80),
        ("::1", 80),
    ]
    assert await lookup.addresses("unknown.test") == []  # NXDOMAIN: empty, not a failure
    dns_server.set("bare.test")
    assert await lookup.addresses("bare.test") == []  # the name exists, with no address
    assert await lookup.addresses("10.1.2.3") == ["10.1.2.3"]  # a literal: no question asked
    dns_server.mode = "servfail"
    with pytest.raises(LookupFailed, match="SERVFAIL"):
        await lookup.addresses("dual.test")
    dns_server.mode = "drop"
    with pytest.raises(LookupFailed, match="timed out"):
        await lookup.addresses("dual.test")


def test_addresses_that_come_and_go_follow_dns(start_sluicegate, dns_server, loopback_backends):
    port = loopback_backends(2, 3)
    dns_server.set("api.test", "127.0.0.2")
    daemon = start_sluicegate(resolved_upstream(dns_server.address, port))
    # The first lookup is done before the daemon serves: the very first request lands.
    assert backend_of(daemon.port) == "b2"
    servers = daemon.status()["upstreams"]["api"]["servers"]
    assert [(s["url"], s["address"]) for s in servers] == [
        (f"http://api.test:{port}", f"127.0.0.2:{port}")
    ]

    # An address that appears gets traffic within about a period.
    dns_server.set("api.test", "127.0.0.2", "127.0.0.3")
    changed = time.monotonic()
    wait_for(lambda: backend_of(daemon.port) == "b3", timeout=5, interval=0.01)
    joined_after = time.monotonic() - changed
    print(f"\nadded address took {joined_after * 1000:.0f} ms to get traffic (period 200 ms)")
    assert joined_after < 3.0
    servers = daemon.status()["upstreams"]["api"]["servers"]
    assert [s["address"] for s in servers] == [f"127.0.0.2:{port}", f"127.0.0.3:{port}"]
    # Drain and undrain by index in that list.
    status, _, body = daemon.admin("POST", "/upstreams/api/servers/1/drain")
    assert status == 200 and json.loads(body)["address"] == f"127.0.0.3:{port}"
    assert {backend_of(daemon.port) for _ in range(6)} == {"b2"}
    assert daemon.admin("POST", "/upstreams/api/servers/1/undrain")[0] == 200
    assert {backend_of(daemon.port) for _ in range(6)} == {"b2", "b3"}

    # Slow requests under way on an address that vanishes finish; new ones stop going there.
    slow: list[tuple[int, str]] = []

    def slow_request() -> None:
        status, headers, _ = http_request(daemon.port, "GET", "/delay/1500", timeout=10)
        slow.append((status, headers.get("x-backend", "")))

    threads = [threading.Thread(target=slow_request) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(
        lambda: daemon.status()["upstreams"]["api"]["servers"][0]["in_flight"] > 0,
        message="a slow request on b2",
    )
    dns_server.set("api.test", "127.0.0.3")
    changed = time.monotonic()

    def b2_gone() -> bool:
        return all(backend_of(daemon.port) == "b3" for _ in range(10))

    wait_for(b2_gone, timeout=5, interval=0.01, message="b2 to stop getting requests")
    left_after = time.monotonic() - changed
    print(f"removed address stopped getting traffic after {left_after * 1000:.0f} ms")
    assert left_after < 3.0
    for thread in threads:
        thread.join(10)
    assert len(slow) == 4 and all(status == 200 for status, _ in slow), slow
    assert "b2" in {name for _, name in slow}  # in flight on the vanished address: finished
    servers = daemon.status()["upstreams"]["api"]["servers"]
    assert [s["address"] for s in servers] == [f"127.0.0.3:{port}"]

    # A failed lookup (SERVFAIL, then no answer at all) keeps the last good set.
    before = metric(
        daemon.metrics(), "sluicegate_dns_resolutions_total", upstream="api", result="failure"
    )
    dns_server.mode = "servfail"
    wait_for(
        lambda: (
            metric(
                daemon.metrics(),
                "sluicegate_dns_resolutions_total",
                upstream="api",
                result="failure",
            )
            >= before + 2
        ),
        message="failed lookups counted",
    )
    assert {backend_of(daemon.port) for _ in range(10)} == {"b3"}
    dns_server.mode = "drop"
    queries = dns_server.queries
    wait_for(lambda: dns_server.queries >= queries + 2, message="lookups that go unanswered")
    time.sleep(1.2)  # a lookup's timeout (1 s for a 200 ms period) has passed
    assert {backend_of(daemon.port) for _ in range(10)} == {"b3"}
    text = daemon.metrics()
    assert metric(text, "sluicegate_dns_resolutions_total", upstream="api", result="success") > 0
    # DNS is back: changes apply again.
    dns_server.mode = "answer"
    dns_server.set("api.test", "127.0.0.2")
    wait_for(lambda: backend_of(daemon.port) == "b2", timeout=5, interval=0.02)
    # The DNS server gone altogether: the set stays too.
    failures = metric(
        daemon.metrics(), "sluicegate_dns_resolutions_total", upstream="api", result="failure"
    )
    dns_server.stop()
    time.sleep(1.5)
    assert {backend_of(daemon.port) for _ in range(10)} == {"b2"}
    assert (
        metric(
            daemon.metrics(), "sluicegate_dns_resolutions_total", upstream="api", result="failure"
        )
        > failures
    )


def test_no_address_yet_means_not_ready_until_dns_has_one(
    start_sluicegate, dns_server, loopback_backends
):
    port = loopback_backends(2)
    daemon = start_sluicegate(resolved_upstream(dns_server.address, port))  # NXDOMAIN for now
    status, _, body = daemon.admin("GET", "/readyz")
    assert status == 503
    assert any("api" in reason and "DNS" in reason for reason in json.loads(body)["reasons"])
    assert http_request(daemon.port, "GET", "/")[0] == 503
    assert daemon.status()["upstreams"]["api"]["servers"] == []
    dns_server.set("api.test", "127.0.0.2")
    wait_for(lambda: daemon.admin("GET", "/readyz")[0] == 200, timeout=5)
    assert backend_of(daemon.port) == "b2"
    text = daemon.metrics()
    assert metric(text, "sluicegate_dns_resolutions_total", upstream="api", result="empty") > 0


def test_reload_keeps_resolved_servers_and_their_state(
    start_sluicegate, dns_server, loopback_backends
):
    port = loopback_backends(2, 3)
    dns_server.set("api.test", "127.0.0.2", "127.0.0.3")
    config = resolved_upstream(dns_server.address, port)
    daemon = start_sluicegate(config)
    assert daemon.admin("POST", "/upstreams/api/servers/0/drain")[0] == 200
    assert {backend_of(daemon.port) for _ in range(4)} == {"b3"}
    config["upstreams"]["api"]["retry"] = {"tries": 2}
    daemon.write_config(
        {**config, "listen": daemon.config["listen"], "admin": daemon.config["admin"]}
    )
    status, _, body = daemon.admin("POST", "/reload")
    assert status == 200, body
    servers = daemon.status()["upstreams"]["api"]["servers"]
    assert [(s["address"], s["draining"]) for s in servers] == [
        (f"127.0.0.2:{port}", True),  # the same server: still drained
        (f"127.0.0.3:{port}", False),
    ]
    assert {backend_of(daemon.port) for _ in range(4)} == {"b3"}


def test_workers_each_resolve_and_status_adds_them_up(
    start_sluicegate, dns_server, loopback_backends
):
    port = loopback_backends(2, 3)
    dns_server.set("api.test", "127.0.0.2", "127.0.0.3")
    config = resolved_upstream(dns_server.address, port)
    daemon = start_sluicegate({**config, "workers": 2}, timeout=30)
    for _ in range(40):
        assert http_request(daemon.port, "GET", "/")[0] == 200
    status = daemon.status()
    assert status["workers"] == 2 and status["zone"] is None
    servers = status["upstreams"]["api"]["servers"]
    assert [s["address"] for s in servers] == [f"127.0.0.2:{port}", f"127.0.0.3:{port}"]
    assert sum(s["requests"] for s in servers) == 40
    assert daemon.admin("POST", "/upstreams/api/servers/0/drain")[0] == 200
    assert {backend_of(daemon.port) for _ in range(10)} == {"b3"}  # in every worker


def test_https_to_a_resolved_address_names_the_host(start_sluicegate, dns_server, tmp_path):
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    # The certificate names api.test only: verifying it against the address would fail.
    with RawUpstream(describe, ssl_context=server_context(ca, "api.test")) as up:
        dns_server.set("api.test", "127.0.0.1")
        config = resolved_upstream(dns_server.address, up.port)
        config["upstreams"]["api"]["servers"][0]["url"] = f"https://api.test:{up.port}"
        daemon = start_sluicegate(config, env={"SSL_CERT_FILE": str(bundle)})
        status, _, body = http_request(daemon.port, "GET", "/x", headers={"Host": "app.test"})
        assert status == 200, body
        assert json.loads(body)["host"] == "app.test"
        assert up.tls_errors == []


# -- slow start, measured ---------------------------------------------------------------------


def test_slow_start_ramps_a_new_address_in_traffic(start_sluicegate, dns_server, loopback_backends):
    ramp = 2.0
    port = loopback_backends(2, 3, 4)
    dns_server.set("api.test", "127.0.0.2", "127.0.0.3")
    daemon = start_sluicegate(resolved_upstream(dns_server.address, port, slow_start="2s"))
    assert backend_of(daemon.port)
    hits: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            name = backend_of(daemon.port)
            hits.append((time.monotonic(), name))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        dns_server.set("api.test", "127.0.0.2", "127.0.0.3", "127.0.0.4")
        first = wait_for(
            lambda: next((t for t, name in list(hits) if name == "b4"), None),
            timeout=5,
            interval=0.01,
        )
        time.sleep(ramp + 0.8)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    # b4's share of each 200 ms window, as a fraction of its fair share (1/3), from its
    # first request on: the ramp started at most a period before it.
    windows = collections.defaultdict(collections.Counter)
    for t, name in hits:
        if t >= first:
            windows[int((t - first) / 0.2)][name] += 1
    relative = []
    for index in sorted(windows)[:-1]:  # the last window was cut short when the clients stopped
        counts = windows[index]
        total = sum(counts.values())
        if total >= 20:  # round robin's share of a few requests is too coarse to read
            relative.append((index * 0.2, counts["b4"] / total * 3))
    print("\nslow start (2 s): window start, b4 share / fair share")
    for start, share in relative:
        print(f"  {start:4.1f}s  {share:5.2f}")
    early = [share for start, share in relative if start < 0.4]
    middle = [share for start, share in relative if 0.8 <= start < 1.2]
    late = [share for start, share in relative if start >= ramp + 0.2]
    assert early and middle and late, relative
    # Ramp fraction f against two servers at full weight gives 3f / (2 + f) of the fair
    # share: 0.14 at 10%, 0.65 half way, 1 at the end.
    assert sum(early) / len(early) < 0.4  # starts near 10% of its weight
    assert 0.3 < sum(middle) / len(middle) < 0.85  # about half way up
    assert sum(late) / len(late) > 0.85  # full share once the ramp is over


# -- sticky cookies -------------------------------------------------------------------------------


def sticky_config(backends: dict[str, int]) -> dict[str, Any]:
    return {
        "upstreams": {
            "app": {
                "servers": [{"url": f"http://127.0.0.1:{port}"} for port in backends.values()],
                "sticky": {"cookie": "sg_srv", "ttl": "1h"},
                "retry": {"tries": 3},
            }
        },
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"}],
    }


def cookie_of(headers: dict[str, str]) -> str | None:
    value = headers.get("set-cookie")
    if value is None:
        return None
    assert value.endswith("; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"), value
    return value.split(";", 1)[0].split("=", 1)[1]


def test_sticky_cookie_is_followed_by_every_instance(start_sluicegate, spawn_backend):
    backends = {name: spawn_backend(name)[1] for name in ("s1", "s2", "s3")}
    config = sticky_config(backends)
    one = start_sluicegate(config, name="one")
    two = start_sluicegate(config, name="two")

    status, headers, _ = http_request(one.port, "GET", "/")
    pinned_to = headers["x-backend"]
    cookie = cookie_of(headers)
    assert status == 200 and cookie and len(cookie) == 16
    assert str(backends[pinned_to]) not in cookie and "127.0.0.1" not in cookie

    # The other instance decodes it alike, and does not set it again.
    for daemon in (two, one):
        for _ in range(6):
            status, headers, _ = http_request(
                daemon.port, "GET", "/", headers={"Cookie": f"a=1; sg_srv={cookie}"}
            )
            assert (status, headers["x-backend"]) == (200, pinned_to)
            assert "set-cookie" not in headers

    # A forged value is ignored: the policy picks, and a real id is set.
    status, headers, _ = http_request(two.port, "GET", "/", headers={"Cookie": "sg_srv=forged"})
    fresh = cookie_of(headers)
    assert status == 200 and fresh and fresh != "forged"
    _, again, _ = http_request(one.port, "GET", "/", headers={"Cookie": f"sg_srv={fresh}"})
    assert again["x-backend"] == headers["x-backend"]

    # A drained server's cookie is replaced with one for the server that answered.
    index = list(backends).index(pinned_to)
    assert two.admin("POST", f"/upstreams/app/servers/{index}/drain")[0] == 200
    status, headers, _ = http_request(two.port, "GET", "/", headers={"Cookie": f"sg_srv={cookie}"})
    replaced = cookie_of(headers)
    assert status == 200 and headers["x-backend"] != pinned_to and replaced not in (None, cookie)
    _, followed, _ = http_request(one.port, "GET", "/", headers={"Cookie": f"sg_srv={replaced}"})
    assert followed["x-backend"] == headers["x-backend"]


def test_a_retry_on_another_server_repins_the_cookie(start_sluicegate, spawn_backend):
    spawned = {name: spawn_backend(name) for name in ("s1", "s2")}
    backends = {name: port for name, (_, port) in spawned.items()}
    daemon = start_sluicegate(sticky_config(backends))
    _, headers, _ = http_request(daemon.port, "GET", "/")
    pinned_to, cookie = headers["x-backend"], cookie_of(headers)
    proc = spawned[pinned_to][0]
    proc.terminate()
    proc.wait(5)
    status, headers, _ = http_request(
        daemon.port, "GET", "/", headers={"Cookie": f"sg_srv={cookie}"}
    )
    assert status == 200 and headers["x-backend"] != pinned_to
    assert cookie_of(headers) not in (None, cookie)


# -- zone affinity ---------------------------------------------------------------------------


def test_zone_affinity_prefers_this_zone_while_it_is_healthy_enough(
    start_sluicegate, spawn_backend
):
    zones = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}
    ports = {name: spawn_backend(name)[1] for name in zones}
    daemon = start_sluicegate(
        {
            "zone": "${SLUICEGATE_ZONE}",
            "upstreams": {
                "app": {
                    "servers": [
                        {"url": f"http://127.0.0.1:{ports[name]}", "zone": zone}
                        for name, zone in zones.items()
                    ],
                    "zone_affinity": {"min_healthy_percent": 60},
                }
            },
            "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"}],
        },
        env={"SLUICEGATE_ZONE": "a"},
    )
    status = daemon.status()
    assert status["zone"] == "a"
    assert [s["zone"] for s in status["upstreams"]["app"]["servers"]] == ["a", "a", "b", "b"]
    assert {backend_of(daemon.port) for _ in range(20)} == {"a1", "a2"}
    # One of two in zone a drained: 50% < 60%, so every eligible server takes traffic.
    assert daemon.admin("POST", "/upstreams/app/servers/0/drain")[0] == 200
    assert {backend_of(daemon.port) for _ in range(30)} == {"a2", "b1", "b2"}
    assert daemon.admin("POST", "/upstreams/app/servers/0/undrain")[0] == 200
    assert {backend_of(daemon.port) for _ in range(20)} == {"a1", "a2"}
