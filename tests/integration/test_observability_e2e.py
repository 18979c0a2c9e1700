"""Observability on the real daemon: every admin endpoint, the token rules, each SPEC metric
moving as traffic flows (failures, retries, breakers, health, rate limits, reloads), bounded
label cardinality, and the access log.

Everything here runs ``python -m proxy run`` in a subprocess with subprocess demo backends
and talks to it with blocking clients, as an operator's tools would.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import free_port, http_request, wait_for

TOKEN = "s3cret-admin-token"

SPEC_SERVER_FIELDS = (
    "url",
    "weight",
    "backup",
    "health",
    "breaker",
    "in_flight",
    "requests",
    "failures",
    "draining",
)
ROLLING_FIELDS = ("request_rate", "error_rate", "p50_ms", "p99_ms")
ACCESS_LOG_FIELDS = (
    "time",
    "request_id",
    "client_ip",
    "method",
    "host",
    "path",
    "route",
    "upstream",
    "server",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_duration_ms",
    "tries",
    "rate_limited",
    "error",
)
# SPEC "Metrics": exposed family name -> (type, label names).
SPEC_METRICS = {
    "sluicegate_requests": ("counter", {"route", "method", "status"}),
    "sluicegate_request_duration_seconds": ("histogram", {"route"}),
    "sluicegate_upstream_requests": ("counter", {"upstream", "server", "status"}),
    "sluicegate_upstream_response_seconds": ("histogram", {"upstream", "server"}),
    "sluicegate_upstream_in_flight": ("gauge", {"upstream", "server"}),
    "sluicegate_upstream_healthy": ("gauge", {"upstream", "server"}),
    "sluicegate_circuit_breaker_state": ("gauge", {"upstream", "server"}),
    "sluicegate_circuit_breaker_transitions": ("counter", {"upstream", "server", "to"}),
    "sluicegate_retries": ("counter", {"upstream", "reason"}),
    "sluicegate_rate_limited": ("counter", {"route"}),
    "sluicegate_rate_limit_backend_errors": ("counter", set()),
    "sluicegate_health_checks": ("counter", {"upstream", "server", "result"}),
    "sluicegate_config_reloads": ("counter", {"result"}),
    "sluicegate_open_connections": ("gauge", set()),
}


# -- helpers -----------------------------------------------------------------------------------


def upstream(*ports: int, **extra) -> dict:
    cfg = {
        "policy": "round_robin",
        "servers": [{"url": f"http://127.0.0.1:{port}"} for port in ports],
        "retry": {"tries": 1},
    }
    cfg.update(extra)
    return cfg


# /limited on upstream "app": one request a second, the burst of one used by the first.
LIMITED_ROUTE = {
    "name": "limited",
    "match": {"path_prefix": "/limited"},
    "upstream": "app",
    "strip_prefix": True,
    "rate_limit": {"rate": "1/s", "burst": 1},
}


def config(upstreams: dict, routes: list | None = None, **extra) -> dict:
    name = next(iter(upstreams))
    cfg = {
        "upstreams": upstreams,
        "routes": routes or [{"name": "all", "match": {"path_prefix": "/"}, "upstream": name}],
    }
    cfg.update(extra)
    return cfg


def samples(text: str) -> list:
    """Every sample of the exposition, parsed with prometheus-client's own parser."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample named ``name`` whose labels include ``labels``; the sum
    when several match; None when none does."""
    found = [
        s.value
        for s in samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(found) if found else None


def metric(daemon, name: str, **labels: str) -> float:
    return value(daemon.metrics(), name, **labels) or 0.0


def server_label(port: int) -> str:
    return f"127.0.0.1:{port}"


def closed_port() -> int:
    """A port nothing listens on (connections are refused)."""
    return free_port()


def post_backend(port: int, path: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.status == 200


def json_body(reply: tuple[int, dict, bytes]) -> dict:
    return json.loads(reply[2])


# -- endpoints ---------------------------------------------------------------------------------


def test_healthz_metrics_and_the_page(start_sluicegate, spawn_backend):
    _, port = spawn_backend("a")
    daemon = start_sluicegate(config({"app": upstream(port)}))

    status, _, body = daemon.admin("GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"

    status, headers, body = daemon.admin("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert "version=" in headers["content-type"]
    assert b"# TYPE sluicegate_requests_total counter" in body

    status, headers, body = daemon.admin("GET", "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    page = body.decode()
    assert page.lower().startswith("<!doctype html>")
    assert "status" in page  # polls ./status
    for external in ('src="http', "src='http", 'href="http', "href='http", "@import"):
        assert external not in page


def test_status_has_every_spec_field_and_rolling_stats(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    _, b = spawn_backend("b")
    cfg = config(
        {
            "web": upstream(a, b),
            "spare": {
                "policy": "least_conn",
                "servers": [
                    {"url": f"http://127.0.0.1:{a}", "weight": 3},
                    {"url": f"http://127.0.0.1:{b}", "backup": True},
                ],
            },
        }
    )
    daemon = start_sluicegate(cfg)
    for _ in range(10):
        assert daemon.get("/delay/5")[0] == 200

    status = daemon.status()
    assert status["version"]
    assert isinstance(status["uptime_seconds"], int | float) and status["uptime_seconds"] >= 0
    assert status["config_file"] == str(daemon.config_path.resolve())
    assert "T" in status["config_loaded_at"]
    assert list(status["upstreams"]) == ["web", "spare"]
    web = status["upstreams"]["web"]
    assert web["policy"] == "round_robin"
    for server in web["servers"] + status["upstreams"]["spare"]["servers"]:
        for field in SPEC_SERVER_FIELDS + ROLLING_FIELDS:
            assert field in server, (field, server)
    first, second = web["servers"]
    assert first["url"] == f"http://127.0.0.1:{a}" and second["url"] == f"http://127.0.0.1:{b}"
    assert (first["weight"], first["backup"], first["draining"]) == (1, False, False)
    assert first["health"] == "unknown" and first["breaker"] == "closed"
    assert first["in_flight"] == 0 and first["failures"] == 0
    assert first["requests"] + second["requests"] == 10
    assert first["requests"] == 5  # round robin, equal weights
    assert first["request_rate"] > 0 and first["error_rate"] == 0
    assert 0 < first["p50_ms"] <= first["p99_ms"]
    assert first["p50_ms"] >= 4  # the backend waited 5 ms
    spare = status["upstreams"]["spare"]
    assert spare["policy"] == "least_conn"
    assert [s["weight"] for s in spare["servers"]] == [3, 1]
    assert [s["backup"] for s in spare["servers"]] == [False, True]
    idle = spare["servers"][0]
    assert idle["requests"] == 0 and idle["p50_ms"] is None and idle["request_rate"] == 0


def test_readyz_turns_503_with_reasons_when_every_server_is_drained(
    start_sluicegate, spawn_backend
):
    _, a = spawn_backend("a")
    _, b = spawn_backend("b")
    daemon = start_sluicegate(config({"app": upstream(a, b), "other": upstream(a)}))
    status, _, body = daemon.admin("GET", "/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "reasons": []}

    for index in (0, 1):
        reply = daemon.admin("POST", f"/upstreams/app/servers/{index}/drain")
        assert reply[0] == 200 and json_body(reply)["draining"] is True
    status, _, body = daemon.admin("GET", "/readyz")
    answer = json.loads(body)
    assert status == 503 and answer["ready"] is False
    assert len(answer["reasons"]) == 1 and "app" in answer["reasons"][0]
    assert daemon.get("/")[0] == 503  # no eligible server

    reply = daemon.admin("POST", "/upstreams/app/servers/1/undrain")
    assert reply[0] == 200 and json_body(reply)["draining"] is False
    assert daemon.admin("GET", "/readyz")[0] == 200
    assert daemon.get("/")[0] == 200


def test_drain_and_undrain_answer_the_server_status_or_404(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    _, b = spawn_backend("b")
    daemon = start_sluicegate(config({"app": upstream(a, b)}))

    reply = daemon.admin("POST", "/upstreams/app/servers/0/drain")
    assert reply[0] == 200
    server = json_body(reply)
    assert server["url"] == f"http://127.0.0.1:{a}" and server["draining"] is True
    for field in SPEC_SERVER_FIELDS:
        assert field in server
    assert {daemon.get("/")[1]["x-backend"] for _ in range(6)} == {"b"}
    assert daemon.status()["upstreams"]["app"]["servers"][0]["draining"] is True

    reply = daemon.admin("POST", "/upstreams/app/servers/0/undrain")
    assert reply[0] == 200 and json_body(reply)["draining"] is False
    assert {daemon.get("/")[1]["x-backend"] for _ in range(6)} == {"a", "b"}

    for path in (
        "/upstreams/nope/servers/0/drain",
        "/upstreams/app/servers/2/drain",
        "/upstreams/app/servers/2/undrain",
        "/upstreams/app/servers/-1/drain",
        "/upstreams/app/servers/x/undrain",
    ):
        status, headers, body = daemon.admin("POST", path)
        assert status == 404, path
        assert headers["content-type"].startswith("application/json")
        assert "error" in json.loads(body)


def test_reload_endpoint_counts_successes_and_failures(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    _, b = spawn_backend("b")
    daemon = start_sluicegate(config({"app": upstream(a)}))
    assert metric(daemon, "sluicegate_config_reloads_total", result="success") == 0
    assert metric(daemon, "sluicegate_config_reloads_total", result="failure") == 0

    daemon.write_config({**daemon.config, "upstreams": {"app": upstream(b)}})
    status, _, body = daemon.admin("POST", "/reload")
    assert status == 200 and json.loads(body)["status"] == "reloaded"
    assert daemon.get("/")[1]["x-backend"] == "b"
    assert metric(daemon, "sluicegate_config_reloads_total", result="success") == 1

    daemon.write_config("upstreams: {app: {servers: [{url: http://127.0.0.1:1, weight: 0}]}}\n")
    status, _, body = daemon.admin("POST", "/reload")
    assert status == 400 and "weight" in json.loads(body)["error"]
    assert daemon.get("/")[1]["x-backend"] == "b"  # nothing changed
    text = daemon.metrics()
    assert value(text, "sluicegate_config_reloads_total", result="failure") == 1
    assert value(text, "sluicegate_config_reloads_total", result="success") == 1


def test_admin_token_guards_every_post_and_leaves_gets_open(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    cfg = config({"app": upstream(a)}, admin={"token_env": "SLUICEGATE_ADMIN_TOKEN"})
    daemon = start_sluicegate(cfg, env={"SLUICEGATE_ADMIN_TOKEN": TOKEN})

    posts = ("/reload", "/upstreams/app/servers/0/drain", "/upstreams/app/servers/0/undrain")
    wrong = (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    )
    for path in posts:
        for headers in wrong:
            status, reply_headers, body = daemon.admin("POST", path, headers=headers)
            assert status == 401, (path, headers)
            assert reply_headers.get("www-authenticate") == "Bearer"
            assert "error" in json.loads(body)
    assert daemon.status()["upstreams"]["app"]["servers"][0]["draining"] is False

    good = {"Authorization": f"Bearer {TOKEN}"}
    for path in posts:
        assert daemon.admin("POST", path, headers=good)[0] == 200, path
    for path in ("/healthz", "/readyz", "/metrics", "/status", "/"):
        assert daemon.admin("GET", path)[0] == 200, path


def test_without_the_token_variable_set_posts_are_open(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    cfg = config({"app": upstream(a)}, admin={"token_env": "SLUICEGATE_ADMIN_TOKEN_UNSET_X"})
    daemon = start_sluicegate(cfg)
    assert daemon.admin("POST", "/upstreams/app/servers/0/drain")[0] == 200


# -- metrics moving ----------------------------------------------------------------------------


def test_exposition_has_every_spec_name_type_and_label_set(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    cfg = config(
        {"app": upstream(a, health_check={"path": "/health", "interval": "100ms"})},
        routes=[
            {
                "name": "all",
                "match": {"path_prefix": "/"},
                "upstream": "app",
                "rate_limit": {"rate": "1/s", "burst": 1},
            }
        ],
    )
    daemon = start_sluicegate(cfg)
    daemon.get("/")
    daemon.get("/")  # rate limited
    wait_for(lambda: metric(daemon, "sluicegate_health_checks_total") > 0, message="a health check")
    families = {f.name: f for f in text_string_to_metric_families(daemon.metrics())}
    for name, (kind, labels) in SPEC_METRICS.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
    for name in SPEC_METRICS:
        if name not in ("sluicegate_retries", "sluicegate_circuit_breaker_transitions"):
            assert families[name].samples, f"{name} has no series after traffic"


def test_request_and_upstream_metrics_move_with_traffic(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    cfg = config(
        {"app": upstream(a)},
        routes=[
            {
                "name": "api",
                "match": {"path_prefix": "/api/"},
                "upstream": "app",
                "strip_prefix": True,
            },
            {"name": "rest", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
    )
    daemon = start_sluicegate(cfg)
    server = server_label(a)
    for _ in range(3):
        assert daemon.get("/api/")[0] == 200
    assert daemon.get("/status/404")[0] == 404
    assert daemon.get("/status/503")[0] == 503
    assert http_request(daemon.port, "POST", "/echo", body=b"hello")[0] == 200
    assert http_request(daemon.port, "HEAD", "/")[0] == 200

    text = daemon.metrics()
    requests = "sluicegate_requests_total"
    assert value(text, requests, route="api", method="GET", status="200") == 3
    assert value(text, requests, route="rest", method="GET", status="404") == 1
    assert value(text, requests, route="rest", method="GET", status="503") == 1
    assert value(text, requests, route="rest", method="POST", status="200") == 1
    assert value(text, requests, route="rest", method="HEAD", status="200") == 1
    assert value(text, "sluicegate_request_duration_seconds_count", route="api") == 3
    assert value(text, "sluicegate_request_duration_seconds_count", route="rest") == 4
    assert value(text, "sluicegate_request_duration_seconds_sum", route="api") > 0
    assert value(text, "sluicegate_request_duration_seconds_bucket", route="api", le="30.0") == 3

    ups = "sluicegate_upstream_requests_total"
    assert value(text, ups, upstream="app", server=server, status="200") == 5
    assert value(text, ups, upstream="app", server=server, status="404") == 1
    assert value(text, ups, upstream="app", server=server, status="503") == 1
    count = value(text, "sluicegate_upstream_response_seconds_count", upstream="app", server=server)
    assert count == 7
    assert (
        value(text, "sluicegate_upstream_response_seconds_sum", upstream="app", server=server) > 0
    )
    # A request no route matches is not a route's; SPEC has no label for it.
    assert value(text, "sluicegate_upstream_in_flight", upstream="app", server=server) == 0


def test_no_route_is_404_and_mints_no_series(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    cfg = config(
        {"app": upstream(a)},
        routes=[{"name": "api", "match": {"path_prefix": "/api/"}, "upstream": "app"}],
    )
    daemon = start_sluicegate(cfg)
    before = daemon.metrics()
    assert daemon.get("/nowhere")[0] == 404
    after = daemon.metrics()
    assert value(after, "sluicegate_requests_total") == value(before, "sluicegate_requests_total")


def test_a_refused_server_counts_error_and_its_breaker_opens(start_sluicegate, spawn_backend):
    _, live = spawn_backend("live")
    dead = closed_port()
    cfg = config(
        {
            "broken": upstream(
                dead,
                circuit_breaker={"failure_threshold": 1, "open_duration": "60s"},
            ),
            "fine": upstream(live),
        },
        routes=[
            {"name": "broken", "match": {"path_prefix": "/broken"}, "upstream": "broken"},
            {"name": "fine", "match": {"path_prefix": "/"}, "upstream": "fine"},
        ],
    )
    daemon = start_sluicegate(cfg)
    server = server_label(dead)
    text = daemon.metrics()
    assert value(text, "sluicegate_circuit_breaker_state", upstream="broken", server=server) == 0
    assert value(text, "sluicegate_circuit_breaker_transitions_total", to="open") is None

    assert daemon.get("/broken")[0] == 502  # refused: error
    assert daemon.get("/broken")[0] == 503  # breaker open: no eligible server
    assert daemon.get("/")[0] == 200

    text = daemon.metrics()
    ups = "sluicegate_upstream_requests_total"
    assert value(text, ups, upstream="broken", server=server, status="error") == 1
    assert value(text, "sluicegate_circuit_breaker_state", upstream="broken", server=server) == 2
    transitions = "sluicegate_circuit_breaker_transitions_total"
    assert value(text, transitions, upstream="broken", server=server, to="open") == 1
    live_label = server_label(live)
    assert value(text, "sluicegate_circuit_breaker_state", upstream="fine", server=live_label) == 0
    # No head came: no response time was observed for the refused attempt.
    count = "sluicegate_upstream_response_seconds_count"
    assert value(text, count, upstream="broken", server=server) == 0
    assert value(text, "sluicegate_requests_total", route="broken", status="502") == 1
    assert value(text, "sluicegate_requests_total", route="broken", status="503") == 1

    broken = daemon.status()["upstreams"]["broken"]["servers"][0]
    assert broken["breaker"] == "open" and broken["failures"] == 1
    assert broken["error_rate"] == 1.0
    status, _, body = daemon.admin("GET", "/readyz")
    assert status == 503 and "broken" in json.loads(body)["reasons"][0]


def test_retries_total_counts_the_reason(start_sluicegate, spawn_backend):
    _, live = spawn_backend("live")
    dead = closed_port()
    cfg = config(
        {
            "app": upstream(
                dead,
                live,
                retry={"tries": 2, "on": ["error", "http_503"]},
                circuit_breaker={"failure_threshold": 1000},
            )
        }
    )
    daemon = start_sluicegate(cfg)
    for _ in range(4):
        status, headers, _ = daemon.get("/")
        assert status == 200 and headers["x-backend"] == "live"
    text = daemon.metrics()
    retried = value(text, "sluicegate_retries_total", upstream="app", reason="error")
    assert retried == 2  # round robin: every other request went to the dead server first
    ups = "sluicegate_upstream_requests_total"
    assert value(text, ups, upstream="app", server=server_label(dead), status="error") == 2
    assert value(text, ups, upstream="app", server=server_label(live), status="200") == 4
    assert value(text, "sluicegate_requests_total", route="all", status="200") == 4


def test_in_flight_gauge_rises_during_a_slow_request_then_returns_to_zero(
    start_sluicegate, spawn_backend
):
    _, a = spawn_backend("a")
    daemon = start_sluicegate(config({"app": upstream(a)}))
    server = server_label(a)
    name = "sluicegate_upstream_in_flight"
    assert metric(daemon, name, upstream="app", server=server) == 0

    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(daemon.get("/delay/1500")[0]))
    worker.start()
    try:
        wait_for(
            lambda: metric(daemon, name, upstream="app", server=server) == 1,
            timeout=5,
            message="in_flight 1",
        )
        assert daemon.status()["upstreams"]["app"]["servers"][0]["in_flight"] == 1
    finally:
        worker.join(10)
    assert results == [200]
    assert metric(daemon, name, upstream="app", server=server) == 0
    assert daemon.status()["upstreams"]["app"]["servers"][0]["in_flight"] == 0


def test_upstream_healthy_follows_the_health_checks(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    check = {
        "path": "/health",
        "interval": "100ms",
        "timeout": "1s",
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
    }
    daemon = start_sluicegate(config({"app": upstream(a, health_check=check)}))
    server = server_label(a)
    healthy = "sluicegate_upstream_healthy"
    checks = "sluicegate_health_checks_total"
    wait_for(
        lambda: daemon.status()["upstreams"]["app"]["servers"][0]["health"] == "up",
        message="health up",
    )
    assert metric(daemon, healthy, upstream="app", server=server) == 1
    passed = metric(daemon, checks, upstream="app", server=server, result="pass")
    assert passed >= 1

    post_backend(a, "/health/fail")
    wait_for(
        lambda: metric(daemon, healthy, upstream="app", server=server) == 0,
        timeout=5,
        message="healthy gauge 0",
    )
    assert daemon.status()["upstreams"]["app"]["servers"][0]["health"] == "down"
    assert metric(daemon, checks, upstream="app", server=server, result="fail") >= 1
    assert daemon.admin("GET", "/readyz")[0] == 503

    post_backend(a, "/health/ok")
    wait_for(
        lambda: metric(daemon, healthy, upstream="app", server=server) == 1,
        timeout=5,
        message="healthy gauge back to 1",
    )
    assert daemon.admin("GET", "/readyz")[0] == 200
    results = {
        s.labels["result"]
        for s in samples(daemon.metrics())
        if s.name == checks and s.labels["server"] == server
    }
    assert results <= {"pass", "fail"}


def test_rate_limited_total_counts_per_route(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    cfg = config(
        {"app": upstream(a)},
        routes=[
            LIMITED_ROUTE,
            {"name": "free", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
    )
    daemon = start_sluicegate(cfg)
    assert metric(daemon, "sluicegate_rate_limited_total", route="limited") == 0
    first = daemon.get("/limited")
    second = daemon.get("/limited")
    assert first[0] == 200 and second[0] == 429
    assert int(second[1]["retry-after"]) >= 1
    assert daemon.get("/")[0] == 200
    text = daemon.metrics()
    assert value(text, "sluicegate_rate_limited_total", route="limited") == 1
    assert value(text, "sluicegate_rate_limited_total", route="free") in (None, 0)
    assert value(text, "sluicegate_requests_total", route="limited", status="429") == 1
    assert value(text, "sluicegate_rate_limit_backend_errors_total") == 0


def test_rate_limit_backend_errors_count_when_redis_is_down(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    cfg = config(
        {"app": upstream(a)},
        routes=[
            {
                "name": "all",
                "match": {"path_prefix": "/"},
                "upstream": "app",
                "rate_limit": {"rate": "100/s", "burst": 100, "on_redis_error": "allow"},
            }
        ],
        redis={"url": f"redis://127.0.0.1:{closed_port()}/0", "timeout": "50ms"},
    )
    daemon = start_sluicegate(cfg)
    for _ in range(3):
        assert daemon.get("/")[0] == 200  # allowed although Redis is unreachable
    assert metric(daemon, "sluicegate_rate_limit_backend_errors_total") >= 1
    assert metric(daemon, "sluicegate_rate_limited_total", route="all") == 0


def _open_keepalive_connections(daemon, count: int) -> list[http.client.HTTPConnection]:
    conns = [http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5) for _ in range(count)]
    for conn in conns:
        conn.request("GET", "/")
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 200
    return conns


def test_open_connections_gauge_counts_client_connections(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    daemon = start_sluicegate(config({"app": upstream(a)}, limits={"keepalive_timeout": "1s"}))
    name = "sluicegate_open_connections"
    assert metric(daemon, name) == 0
    conns = _open_keepalive_connections(daemon, 3)
    assert metric(daemon, name) == 3  # kept alive
    for conn in conns:
        conn.close()
    # The idle timeout closes our side at the latest.
    wait_for(lambda: metric(daemon, name) == 0, timeout=5, message="open_connections back to 0")
    assert daemon.get("/", headers={"Connection": "close"})[0] == 200
    wait_for(lambda: metric(daemon, name) == 0, timeout=2, message="closed after Connection: close")


def test_open_connections_drop_as_soon_as_idle_clients_close(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    daemon = start_sluicegate(config({"app": upstream(a)}))  # keepalive_timeout 75s
    name = "sluicegate_open_connections"
    conns = _open_keepalive_connections(daemon, 3)
    assert metric(daemon, name) == 3
    for conn in conns:
        conn.close()
    wait_for(lambda: metric(daemon, name) == 0, timeout=3, message="open_connections back to 0")


def test_labels_never_carry_paths_hosts_or_client_addresses(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    cfg = config({"app": upstream(a)}, trusted_proxies=["127.0.0.1/32"])
    daemon = start_sluicegate(cfg)

    def burst(start: int, count: int) -> None:
        for i in range(start, start + count):
            status, _, _ = daemon.get(
                f"/bytes/{i}?unique-path={i}",
                headers={
                    "Host": f"host-{i}.example",
                    "X-Forwarded-For": f"10.9.{i // 250}.{i % 250}",
                },
            )
            assert status == 200

    burst(0, 5)
    before = {(s.name, tuple(sorted(s.labels.items()))) for s in samples(daemon.metrics())}
    burst(5, 60)
    text = daemon.metrics()
    after = {(s.name, tuple(sorted(s.labels.items()))) for s in samples(text)}
    assert after == before, sorted(after - before)

    allowed_values = {
        "all",
        "app",
        server_label(a),
        "GET",
        "200",
        "pass",
        "fail",
        "success",
        "failure",
        "closed",
        "open",
        "half_open",
    }
    for sample in samples(text):
        if not sample.name.startswith("sluicegate_"):
            continue
        for label, label_value in sample.labels.items():
            if label == "le":
                continue
            assert "/" not in label_value and "example" not in label_value
            assert not label_value.startswith("10.9."), (sample.name, label, label_value)
            assert label_value in allowed_values, (sample.name, label, label_value)
    assert value(text, "sluicegate_requests_total", route="all", method="GET", status="200") == 65


# -- access log --------------------------------------------------------------------------------


def test_access_log_has_one_line_per_request_with_every_field(start_sluicegate, spawn_backend):
    _, live = spawn_backend("live")
    dead = closed_port()
    cfg = config(
        {
            "app": upstream(
                dead,
                live,
                retry={"tries": 2, "on": ["error"]},
                circuit_breaker={"failure_threshold": 1000},
            )
        },
        routes=[
            LIMITED_ROUTE,
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
    )
    daemon = start_sluicegate(cfg)
    # First request: round robin tries the dead server first, then the live one.
    status, headers, _ = http_request(
        daemon.port, "PUT", "/echo?x=1", body=b"0123456789", headers={"Host": "svc.test"}
    )
    assert status == 200
    request_id = headers["x-request-id"]
    assert daemon.get("/limited")[0] == 200
    assert daemon.get("/limited")[0] == 429

    lines = wait_for(
        lambda: (lines := daemon.access_log()) and len(lines) >= 3 and lines,
        timeout=5,
        message="three access log lines",
    )
    assert len(lines) == 3
    for line in lines:
        for field in ACCESS_LOG_FIELDS:
            assert field in line, (field, line)
        assert line["time"].endswith("Z") and "T" in line["time"]
        assert line["client_ip"] == "127.0.0.1"
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0

    first, allowed, limited = lines
    assert first["request_id"] == request_id
    assert (first["method"], first["host"], first["path"]) == ("PUT", "svc.test", "/echo")
    assert (first["route"], first["upstream"]) == ("all", "app")
    assert first["server"] == server_label(live)
    assert first["status"] == 200 and first["bytes_in"] == 10 and first["bytes_out"] > 0
    assert first["tries"] == 2 and first["rate_limited"] is False
    assert first["upstream_duration_ms"] > 0
    assert first["upstream_duration_ms"] <= first["duration_ms"] + 1
    assert [a["server"] for a in first["attempts"]] == [server_label(dead), server_label(live)]
    assert [a["outcome"] for a in first["attempts"]] == ["error", 200]
    assert all(isinstance(a["ms"], int | float) for a in first["attempts"])

    assert allowed["route"] == "limited" and allowed["status"] == 200
    assert allowed["rate_limited"] is False and allowed["tries"] == 1
    assert limited["route"] == "limited" and limited["status"] == 429
    assert limited["rate_limited"] is True and limited["tries"] == 0
    assert limited["server"] in ("", None) and not limited.get("attempts")


def test_access_log_records_errors(start_sluicegate, spawn_backend):
    dead = closed_port()
    daemon = start_sluicegate(config({"app": upstream(dead)}))
    status, _, body = daemon.get("/x")
    assert status == 502 and json.loads(body)["error"]
    line = wait_for(lambda: daemon.access_log(), timeout=5, message="an access log line")[0]
    assert line["status"] == 502 and line["error"]
    assert line["tries"] == 1 and line["server"] == server_label(dead)
    assert line["attempts"][0]["outcome"] == "error"


def test_latency_shows_in_status_and_histograms(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    daemon = start_sluicegate(config({"app": upstream(a)}))
    started = time.monotonic()
    for _ in range(3):
        assert daemon.get("/delay/60")[0] == 200
    assert time.monotonic() - started >= 0.18
    server = daemon.status()["upstreams"]["app"]["servers"][0]
    assert 45 <= server["p50_ms"] <= 200 and server["p99_ms"] >= server["p50_ms"]
    text = daemon.metrics()
    label = {"upstream": "app", "server": server_label(a)}
    fast = value(text, "sluicegate_upstream_response_seconds_bucket", le="0.05", **label)
    slow = value(text, "sluicegate_upstream_response_seconds_bucket", le="0.1", **label)
    assert fast == 0 and slow == 3
    assert value(text, "sluicegate_request_duration_seconds_bucket", route="all", le="0.05") == 0


def test_admin_paths_on_the_traffic_port_are_proxied(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    daemon = start_sluicegate(config({"app": upstream(a)}))
    for path in ("/healthz", "/status", "/metrics", "/reload"):
        _, headers, _ = daemon.get(path)
        assert headers.get("x-backend") == "a", path  # the backend's, not the admin API


def test_a_slow_server_counts_a_timeout(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    slow = upstream(a, timeouts={"connect": "1s", "read": "200ms"})
    daemon = start_sluicegate(config({"app": slow}))
    assert daemon.get("/delay/2000")[0] == 504
    text = daemon.metrics()
    ups = "sluicegate_upstream_requests_total"
    assert value(text, ups, upstream="app", server=server_label(a), status="timeout") == 1
    assert value(text, "sluicegate_requests_total", route="all", status="504") == 1
    assert value(text, "sluicegate_upstream_in_flight", upstream="app", server=server_label(a)) == 0


# -- decision trace (issue 5, item 6) ----------------------------------------------------------


def test_decision_trace_header_needs_the_admin_token(start_sluicegate, spawn_backend):
    _, live = spawn_backend("live")
    dead = closed_port()
    cfg = config(
        {"app": upstream(dead, live, retry={"tries": 2, "on": ["error"]})},
        admin={"token_env": "SLUICEGATE_ADMIN_TOKEN"},
    )
    daemon = start_sluicegate(cfg, env={"SLUICEGATE_ADMIN_TOKEN": TOKEN})
    for headers in ({}, {"X-Sluicegate-Trace": "wrong"}):
        status, reply_headers, _ = daemon.get("/", headers=headers)
        assert status == 200 and "x-sluicegate-trace" not in reply_headers
    # Round robin: the third request starts on the dead server again.
    status, reply_headers, _ = daemon.get("/", headers={"X-Sluicegate-Trace": TOKEN})
    assert status == 200
    trace = json.loads(reply_headers["x-sluicegate-trace"])
    assert trace["route"] == "all" and trace["policy"] == "round_robin"
    assert {c["server"] for c in trace["candidates"]} == {server_label(dead), server_label(live)}
    assert [a["server"] for a in trace["attempts"]] == [server_label(dead), server_label(live)]
    assert trace["attempts"][0]["outcome"] == "error"
    assert "error" in json.dumps(trace.get("retries", trace))


def test_decision_trace_token_never_reaches_the_upstream(start_sluicegate, spawn_backend):
    _, live = spawn_backend("live")
    cfg = config({"app": upstream(live)}, admin={"token_env": "SLUICEGATE_ADMIN_TOKEN"})
    daemon = start_sluicegate(cfg, env={"SLUICEGATE_ADMIN_TOKEN": TOKEN})
    status, reply_headers, body = daemon.get("/echo", headers={"X-Sluicegate-Trace": TOKEN})
    assert status == 200
    assert TOKEN not in body.decode()
    trace = json.loads(reply_headers["x-sluicegate-trace"])
    assert trace["attempts"][0]["outcome"] == 200
    assert trace["candidates"][0]["eligible"] is True


def test_healthy_gauge_follows_a_reload_that_drops_the_health_check(
    start_sluicegate, spawn_backend
):
    _, a = spawn_backend("a")
    post_backend(a, "/health/fail")
    check = {"path": "/health", "interval": "100ms", "unhealthy_threshold": 1}
    daemon = start_sluicegate(config({"app": upstream(a, health_check=check)}))
    server = server_label(a)
    healthy = "sluicegate_upstream_healthy"
    wait_for(
        lambda: (
            metric(daemon, healthy, upstream="app", server=server) == 0.0
            and daemon.status()["upstreams"]["app"]["servers"][0]["health"] == "down"
        ),
        timeout=5,
        message="server down",
    )
    daemon.write_config({**daemon.config, "upstreams": {"app": upstream(a)}})
    assert daemon.admin("POST", "/reload")[0] == 200
    assert daemon.status()["upstreams"]["app"]["servers"][0]["health"] == "unknown"
    assert metric(daemon, healthy, upstream="app", server=server) == 1
    assert daemon.admin("GET", "/readyz")[0] == 200


def test_readyz_is_503_while_shutting_down(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    daemon = start_sluicegate(config({"app": upstream(a)}))
    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(daemon.get("/delay/1500")[0]))
    worker.start()
    try:
        wait_for(lambda: metric(daemon, "sluicegate_upstream_in_flight") == 1, message="in flight")
        daemon.signal(signal.SIGTERM)
        _, _, body = wait_for(
            lambda: (reply := daemon.admin("GET", "/readyz"))[0] == 503 and reply,
            timeout=2,
            message="readyz 503",
        )
        assert json.loads(body) == {"ready": False, "reasons": ["shutting down"]}
        assert daemon.admin("GET", "/healthz")[0] == 200  # admin stays up until the end
    finally:
        worker.join(10)
    assert results == [200]
    assert daemon.wait_exit(10) == 0


def test_two_workers_merge_status_with_rolling_stats(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    _, b = spawn_backend("b")
    never_open = {"failure_threshold": 1000}
    cfg = config({"app": upstream(a, b, circuit_breaker=never_open)}, workers=2)
    daemon = start_sluicegate(cfg, timeout=30)
    for _ in range(20):
        assert daemon.get("/status/503")[0] == 503
    status = daemon.status()
    servers = status["upstreams"]["app"]["servers"]
    assert sum(s["requests"] for s in servers) == 20
    for server in servers:
        for field in SPEC_SERVER_FIELDS + ROLLING_FIELDS:
            assert field in server
        assert server["error_rate"] == 1.0 and server["p50_ms"] > 0
    # The counters added for the page add up over the workers too.
    assert sum(s["outcomes"]["5xx"] for s in servers) == 20
    assert [s["address"] for s in servers] == [f"127.0.0.1:{a}", f"127.0.0.1:{b}"]
    assert [(r["name"], r["requests"]) for r in status["routes"]] == [("all", 20)]


def test_two_workers_metrics_are_exact_right_after_the_traffic(start_sluicegate, spawn_backend):
    """Workers count request series in memory and flush them every second; a scrape of the
    supervisor makes every worker flush first, so it never shows a stale count."""
    _, a = spawn_backend("a")
    daemon = start_sluicegate(config({"app": upstream(a)}, workers=2), timeout=30)
    for _ in range(30):  # new connections: SO_REUSEPORT spreads them over both workers
        assert daemon.get("/")[0] == 200
    text = daemon.metrics()
    assert value(text, "sluicegate_requests_total", route="all", method="GET", status="200") == 30
    assert value(text, "sluicegate_request_duration_seconds_count", route="all") == 30
    server = {"upstream": "app", "server": f"127.0.0.1:{a}"}
    assert value(text, "sluicegate_upstream_requests_total", status="200", **server) == 30
    assert value(text, "sluicegate_upstream_in_flight", **server) == 0


def test_two_workers_count_a_failed_reload(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    daemon = start_sluicegate(config({"app": upstream(a)}, workers=2), timeout=30)
    assert daemon.admin("POST", "/reload")[0] == 200
    daemon.write_config("upstreams: {app: {servers: []}}\n")
    assert daemon.admin("POST", "/reload")[0] == 400
    text = daemon.metrics()
    assert value(text, "sluicegate_config_reloads_total", result="success") == 1
    assert value(text, "sluicegate_config_reloads_total", result="failure") == 1


def test_status_has_routes_zone_and_what_each_server_answered(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    dead = free_port()
    never_open = {"failure_threshold": 1000}
    cfg = config(
        {
            "app": upstream(a, circuit_breaker=never_open, timeouts={"read": "300ms"}),
            "gone": upstream(dead, circuit_breaker=never_open),
        },
        routes=[
            {"name": "limited", "match": {"path_prefix": "/limited"}, "upstream": "app",
             "strip_prefix": True, "rate_limit": {"rate": "1/m", "burst": 1}},
            {"name": "gone", "match": {"path_prefix": "/gone"}, "upstream": "gone"},
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
        zone="${STATUS_TEST_ZONE}",
    )  # fmt: skip
    cfg["upstreams"]["app"]["servers"][0]["zone"] = "a"
    daemon = start_sluicegate(cfg, env={"STATUS_TEST_ZONE": "eu-1"})
    expected = [("/", 200), ("/", 200), ("/status/404", 404), ("/status/503", 503),
                ("/status/503", 503), ("/delay/2000", 504), ("/gone", 502),
                ("/limited", 200), ("/limited", 429), ("/limited", 429)]  # fmt: skip
    for path, code in expected:
        assert daemon.get(path)[0] == code, path

    status = daemon.status()
    assert status["zone"] == "eu-1"
    assert status["routes"] == [
        {"name": "limited", "upstream": "app", "requests": 3, "rate_limited": 2,
         "limit": {"rate": 1 / 60, "burst": 1, "key": "client_ip", "mode": "enforce"},
         "cache": None},
        {"name": "gone", "upstream": "gone", "requests": 1, "rate_limited": 0,
         "limit": None, "cache": None},
        {"name": "all", "upstream": "app", "requests": 6, "rate_limited": 0,
         "limit": None, "cache": None},
    ]  # fmt: skip
    app, gone = status["upstreams"]["app"], status["upstreams"]["gone"]
    assert app["has_eligible_server"] and gone["has_eligible_server"]
    (server,) = app["servers"]
    assert (server["zone"], server["address"]) == ("a", f"127.0.0.1:{a}")
    assert server["last_check"] is None  # no health check configured
    assert server["outcomes"] == {
        "1xx": 0, "2xx": 3, "3xx": 0, "4xx": 1, "5xx": 2, "errors": 0, "timeouts": 1,
    }  # fmt: skip
    (server,) = gone["servers"]
    assert server["zone"] is None
    assert server["outcomes"]["errors"] == 1 and server["outcomes"]["timeouts"] == 0

    # Route counters survive a reload, as server counters do; a drained upstream says so.
    cfg["routes"].insert(0, {"name": "new", "match": {"path_prefix": "/new"}, "upstream": "app"})
    daemon.write_config(cfg)
    daemon.reload()
    status = wait_for(
        lambda: (s := daemon.status())["routes"][0]["name"] == "new" and s,
        timeout=10,
        message="the reload",
    )
    assert [(r["name"], r["requests"]) for r in status["routes"]] == [
        ("new", 0), ("limited", 3), ("gone", 1), ("all", 6),
    ]  # fmt: skip
    assert daemon.admin("POST", "/upstreams/gone/servers/0/drain")[0] == 200
    assert daemon.status()["upstreams"]["gone"]["has_eligible_server"] is False


def test_status_shows_the_last_health_check_and_why_it_failed(start_sluicegate, spawn_backend):
    _, a = spawn_backend("a")
    dead = free_port()
    checks = {"path": "/health", "interval": "100ms", "unhealthy_threshold": 1}
    cfg = config({"app": upstream(a, dead, health_check=checks)})
    daemon = start_sluicegate(cfg)
    servers = wait_for(
        lambda: all((s := daemon.status()["upstreams"]["app"]["servers"])[i]["last_check"]
                    for i in (0, 1)) and s,
        timeout=10,
        message="both servers to be checked",
    )  # fmt: skip
    alive, down = servers
    assert alive["last_check"]["result"] == "pass" and alive["last_check"]["reason"] is None
    assert down["last_check"]["result"] == "fail"
    assert down["last_check"]["reason"] == "connect refused"
    assert down["last_check"]["at"].endswith("Z") and "T" in down["last_check"]["at"]
