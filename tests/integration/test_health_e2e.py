"""Active health checks, the panic guard, flap damping and drain, through the real daemon.

Fault servers answer ``GET /health`` with their ``health_status`` whatever their ``mode``,
and count health checks apart from client requests (``health_requests`` vs ``requests``).
"""

from __future__ import annotations

import json
import time

from tests.support.backends import wait_http_ok
from tests.support.daemon import http_request, wait_for
from tests.support.faulty import (
    access_lines,
    hits,
    lb_config,
    metric_sum,
    metric_value,
    server_status,
    timed_request,
)

FAST = {
    "path": "/health",
    "interval": "100ms",
    "timeout": "200ms",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
}


def health_of(daemon, index: int) -> str:
    return server_status(daemon, index)["health"]


def wait_health(daemon, index: int, word: str, timeout: float = 3.0) -> None:
    wait_for(
        lambda: health_of(daemon, index) == word,
        timeout=timeout,
        interval=0.05,
        message=f"server {index} health {word}",
    )


def healthy_gauge(daemon, server) -> float | None:
    return metric_value(
        daemon.metrics(), "sluicegate_upstream_healthy", upstream="app", server=server.address
    )


def test_servers_start_unknown_and_take_traffic(start_sluicegate, fault_server):
    # Failing health checks, but far from the threshold: still unknown, still eligible.
    a, b = fault_server("a"), fault_server("b")
    a.health_status = b.health_status = 503
    slow = {**FAST, "interval": "1s", "unhealthy_threshold": 10, "healthy_threshold": 10}
    daemon = start_sluicegate(lb_config([a, b], health=slow))

    assert [s["health"] for s in daemon.status()["upstreams"]["app"]["servers"]] == [
        "unknown",
        "unknown",
    ]
    statuses = [timed_request(daemon)[0] for _ in range(4)]

    assert statuses == [200] * 4
    assert hits(a, b) == [2, 2]


def test_failing_server_is_marked_down_and_gets_no_traffic_then_recovers(
    start_sluicegate, fault_server
):
    a, b = fault_server("a"), fault_server("b")
    daemon = start_sluicegate(lb_config([a, b], health=FAST))
    wait_health(daemon, 0, "up")
    wait_health(daemon, 1, "up")
    assert healthy_gauge(daemon, a) == 1

    a.health_status = 503
    wait_health(daemon, 0, "down")
    assert healthy_gauge(daemon, a) == 0
    assert metric_sum(daemon.metrics(), "sluicegate_health_checks_total", result="fail") >= 2
    answers = [timed_request(daemon)[2] for _ in range(6)]

    assert answers == [b"b\n"] * 6
    assert hits(a, b) == [0, 6]
    assert any(
        line.get("event") == "health" and line.get("server") == a.address
        for line in daemon.log_lines()
    )

    a.health_status = 200
    wait_health(daemon, 0, "up")
    assert healthy_gauge(daemon, a) == 1
    answers = [timed_request(daemon)[2] for _ in range(4)]
    assert sorted(answers) == [b"a\n", b"a\n", b"b\n", b"b\n"]


def test_health_checks_are_not_client_traffic(start_sluicegate, fault_server):
    a = fault_server("a")
    daemon = start_sluicegate(lb_config([a], health=FAST))

    wait_for(lambda: a.health_requests >= 5, timeout=3, message="5 health checks")
    assert a.requests == 0
    assert timed_request(daemon)[0] == 200

    assert a.requests == 1
    lines = access_lines(daemon, 1)
    assert [line["path"] for line in lines] == ["/"]
    metrics = daemon.metrics()
    assert metric_sum(metrics, "sluicegate_requests_total") == 1
    assert metric_sum(metrics, "sluicegate_upstream_requests_total") == 1
    assert metric_sum(metrics, "sluicegate_health_checks_total", server=a.address) >= 5
    assert server_status(daemon, 0)["requests"] == 1


def test_demo_backend_health_fail_endpoint(start_sluicegate, spawn_backend):
    (_, port_a), (_, port_b) = spawn_backend("a"), spawn_backend("b")
    urls = [f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"]
    daemon = start_sluicegate(lb_config(urls, health=FAST))
    wait_health(daemon, 0, "up")

    assert http_request(port_a, "POST", "/health/fail")[0] == 200
    wait_health(daemon, 0, "down")
    names = [timed_request(daemon)[2] for _ in range(4)]
    count_a = json.loads(http_request(port_a, "GET", "/count")[2])["requests"]

    assert names == [b"b\n"] * 4
    assert count_a == 0  # health checks are not counted as requests by the backend

    assert http_request(port_a, "POST", "/health/ok")[0] == 200
    wait_health(daemon, 0, "up")
    names = [timed_request(daemon)[2] for _ in range(2)]
    assert sorted(names) == [b"a\n", b"b\n"]
    wait_http_ok(f"http://127.0.0.1:{port_a}/health", timeout=1)


def test_panic_mode_when_most_servers_are_down(start_sluicegate, fault_server):
    servers = [fault_server(f"s{i}") for i in range(3)]
    daemon = start_sluicegate(lb_config(servers, health=FAST, min_healthy_percent=50))
    for index in range(3):
        wait_health(daemon, index, "up")

    servers[0].health_status = 503  # 2 of 3 eligible: 66% >= 50%, no panic
    wait_health(daemon, 0, "down")
    [timed_request(daemon) for _ in range(4)]
    assert hits(*servers) == [0, 2, 2]

    servers[1].health_status = 503  # 1 of 3: 33% < 50%, panic: all take traffic
    wait_health(daemon, 1, "down")
    for server in servers:
        server.reset_counts()
    statuses = [timed_request(daemon)[0] for _ in range(6)]

    assert statuses == [200] * 6
    assert hits(*servers) == [2, 2, 2]


def test_without_panic_guard_only_healthy_servers_serve(start_sluicegate, fault_server):
    servers = [fault_server(f"s{i}") for i in range(3)]
    servers[0].health_status = servers[1].health_status = 503
    daemon = start_sluicegate(lb_config(servers, health=FAST))
    wait_health(daemon, 0, "down")
    wait_health(daemon, 1, "down")

    [timed_request(daemon) for _ in range(6)]

    assert hits(*servers) == [0, 0, 6]


def test_all_servers_down_gives_503(start_sluicegate, fault_server):
    a = fault_server("a")
    a.health_status = 500
    daemon = start_sluicegate(lb_config([a], health=FAST))
    wait_health(daemon, 0, "down")

    status, _, body, _ = timed_request(daemon)

    assert status == 503
    assert b"no eligible server" in body
    assert hits(a) == [0]


def test_flap_damping_holds_a_flapping_server_down(start_sluicegate, fault_server):
    a, b = fault_server("a"), fault_server("b")
    health = {
        **FAST,
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
        "flap_damping": {"max_flips": 2, "window": "10s", "hold_down": "1500ms"},
    }
    daemon = start_sluicegate(lb_config([a, b], health=health))
    wait_health(daemon, 0, "up")
    for word, status in (("down", 503), ("up", 200), ("down", 503)):  # three flips
        a.health_status = status
        wait_health(daemon, 0, word)

    a.health_status = 200  # healthy again at once, but held down
    held_from = time.monotonic()
    checks = a.health_requests
    wait_for(lambda: a.health_requests >= checks + 3, timeout=3, message="3 passing checks")
    assert health_of(daemon, 0) == "down"
    [timed_request(daemon) for _ in range(4)]
    assert a.requests == 0

    wait_health(daemon, 0, "up", timeout=4)
    assert time.monotonic() - held_from >= 1.0
    [timed_request(daemon) for _ in range(4)]
    assert a.requests == 2


def test_drain_and_undrain(start_sluicegate, fault_server):
    a, b = fault_server("a"), fault_server("b")
    daemon = start_sluicegate(lb_config([a, b]))

    status, _, body = daemon.admin("POST", "/upstreams/app/servers/0/drain")
    assert status == 200
    drained = json.loads(body)
    assert drained["draining"] is True and drained["url"] == a.url
    assert server_status(daemon, 0)["draining"] is True
    [timed_request(daemon) for _ in range(4)]
    assert hits(a, b) == [0, 4]

    status, _, body = daemon.admin("POST", "/upstreams/app/servers/0/undrain")
    assert status == 200 and json.loads(body)["draining"] is False
    [timed_request(daemon) for _ in range(4)]
    assert hits(a, b) == [2, 6]

    assert daemon.admin("POST", "/upstreams/app/servers/5/drain")[0] == 404
    assert daemon.admin("POST", "/upstreams/nope/servers/0/drain")[0] == 404


def test_draining_every_server_gives_503(start_sluicegate, fault_server):
    a = fault_server("a")
    daemon = start_sluicegate(lb_config([a]))
    assert daemon.admin("POST", "/upstreams/app/servers/0/drain")[0] == 200

    status, _, _, _ = timed_request(daemon)

    assert status == 503
    assert hits(a) == [0]
