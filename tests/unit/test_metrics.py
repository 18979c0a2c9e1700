"""Metric names and label sets exactly as SPEC lists them; children cached; workers merged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proxy.balancing.breaker import BreakerState
from proxy.observability import metrics

# SPEC "Metrics": family name as exposed -> (type, label names).
SPEC_METRICS = {
    "sluicegate_requests_total": ("counter", {"route", "method", "status"}),
    "sluicegate_request_duration_seconds": ("histogram", {"route"}),
    "sluicegate_upstream_requests_total": ("counter", {"upstream", "server", "status"}),
    "sluicegate_upstream_response_seconds": ("histogram", {"upstream", "server"}),
    "sluicegate_upstream_in_flight": ("gauge", {"upstream", "server"}),
    "sluicegate_upstream_healthy": ("gauge", {"upstream", "server"}),
    "sluicegate_circuit_breaker_state": ("gauge", {"upstream", "server"}),
    "sluicegate_circuit_breaker_transitions_total": ("counter", {"upstream", "server", "to"}),
    "sluicegate_retries_total": ("counter", {"upstream", "reason"}),
    "sluicegate_rate_limited_total": ("counter", {"route"}),
    "sluicegate_rate_limit_backend_errors_total": ("counter", set()),
    "sluicegate_health_checks_total": ("counter", {"upstream", "server", "result"}),
    "sluicegate_config_reloads_total": ("counter", {"result"}),
    "sluicegate_open_connections": ("gauge", set()),
}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def exercise_everything(route: str = "spec-route", upstream: str = "spec-up") -> None:
    route_metrics = metrics.RouteMetrics(route)
    route_metrics.observe("GET", 200, 0.012)
    route_metrics.rate_limited()
    server = metrics.ServerMetrics(upstream, "10.0.0.1:8080")
    server.in_flight_inc()
    server.response(200, 0.01)
    server.set_healthy(True)
    server.set_breaker(BreakerState.CLOSED)
    server.breaker_transition(BreakerState.OPEN)
    server.health_check("success")
    metrics.retry(upstream, "timeout")
    metrics.rate_limit_backend_error()
    metrics.config_reload(True)
    metrics.open_connections_inc()
    metrics.open_connections_dec()


def parsed_families(body: bytes) -> dict:
    return {family.name: family for family in text_string_to_metric_families(body.decode("utf-8"))}


def test_rendered_names_types_and_label_sets_match_spec():
    exercise_everything()
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    exposition = body.decode()
    for name, (kind, _labels) in SPEC_METRICS.items():
        assert f"# TYPE {name} {kind}" in exposition, name
    families = parsed_families(body)
    for name, (kind, labels) in SPEC_METRICS.items():
        family_name = name.removesuffix("_total")  # the parser drops counters' suffix
        family = families[family_name]
        assert family.type == kind
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)


def test_no_created_series_are_exported():
    exercise_everything()
    assert b"_created" not in metrics.render()[0]


def test_route_metrics_count_requests_and_durations():
    route = metrics.RouteMetrics("route-a")
    route.observe("GET", 200, 0.004)
    route.observe("GET", 200, 0.2)
    route.observe("POST", 502, 1.5)
    route.rate_limited()
    assert value("sluicegate_requests_total", route="route-a", method="GET", status="200") == 2
    assert value("sluicegate_requests_total", route="route-a", method="POST", status="502") == 1
    assert value("sluicegate_request_duration_seconds_count", route="route-a") == 3
    assert value("sluicegate_request_duration_seconds_bucket", route="route-a", le="0.005") == 1
    assert value("sluicegate_rate_limited_total", route="route-a") == 1


def test_histogram_buckets_span_a_millisecond_to_thirty_seconds():
    assert metrics.LATENCY_BUCKETS[0] == 0.001
    assert metrics.LATENCY_BUCKETS[-1] == 30
    assert list(metrics.LATENCY_BUCKETS) == sorted(metrics.LATENCY_BUCKETS)


def test_unusual_methods_fold_into_other():
    route = metrics.RouteMetrics("route-methods")
    for method in ("PROPFIND", "BREW", "X" * 100):
        route.observe(method, 200, 0.01)
    assert value("sluicegate_requests_total", route="route-methods", method="OTHER", status="200")
    assert len(route._requests) == 1


def test_children_are_resolved_once_and_cached(monkeypatch):
    route = metrics.RouteMetrics("route-cache")
    server = metrics.ServerMetrics("up-cache", "h:1")
    route.observe("GET", 200, 0.01)
    server.response(200, 0.01)
    server.response("timeout", None)
    server.breaker_transition(BreakerState.OPEN)
    server.health_check("failure")
    metrics.retry("up-cache", "error")

    def no_labels(*args, **kwargs):
        raise AssertionError("labels() called on the hot path")

    for metric in (
        metrics.REQUESTS,
        metrics.REQUEST_DURATION,
        metrics.UPSTREAM_REQUESTS,
        metrics.UPSTREAM_RESPONSE,
        metrics.UPSTREAM_IN_FLIGHT,
        metrics.BREAKER_TRANSITIONS,
        metrics.HEALTH_CHECKS,
        metrics.RETRIES,
        metrics.RATE_LIMITED,
        metrics.CONFIG_RELOADS,
    ):
        monkeypatch.setattr(metric, "labels", no_labels)
    for _ in range(3):
        route.observe("GET", 200, 0.01)
        route.rate_limited()
        server.in_flight_inc()
        server.in_flight_dec()
        server.response(200, 0.01)
        server.response("timeout", None)
        server.breaker_transition(BreakerState.OPEN)
        server.health_check("failure")
        metrics.retry("up-cache", "error")
        metrics.config_reload(False)
    assert value("sluicegate_requests_total", route="route-cache", method="GET", status="200") == 4


def test_server_metrics():
    server = metrics.ServerMetrics("up-s", "10.0.0.9:80")
    labels = {"upstream": "up-s", "server": "10.0.0.9:80"}
    assert value("sluicegate_upstream_healthy", **labels) == 1  # unchecked counts as up
    server.in_flight_inc()
    server.in_flight_inc()
    server.in_flight_dec()
    assert value("sluicegate_upstream_in_flight", **labels) == 1
    server.response(503, 0.02)
    server.response("timeout", None)
    assert value("sluicegate_upstream_requests_total", status="503", **labels) == 1
    assert value("sluicegate_upstream_requests_total", status="timeout", **labels) == 1
    assert value("sluicegate_upstream_response_seconds_count", **labels) == 1  # no head, no time
    server.set_healthy(False)
    assert value("sluicegate_upstream_healthy", **labels) == 0
    server.breaker_transition(BreakerState.HALF_OPEN)
    assert value("sluicegate_circuit_breaker_transitions_total", to="half_open", **labels) == 1
    server.health_check("timeout")
    assert value("sluicegate_health_checks_total", result="timeout", **labels) == 1


@pytest.mark.parametrize(
    ("state", "expected"),
    [(BreakerState.CLOSED, 0), (BreakerState.HALF_OPEN, 1), (BreakerState.OPEN, 2)],
)
def test_breaker_state_gauge_values(state, expected):
    server = metrics.ServerMetrics("up-b", "h:2")
    server.set_breaker(state)
    assert value("sluicegate_circuit_breaker_state", upstream="up-b", server="h:2") == expected


def test_breaker_gauge_and_transition_label_come_from_the_breaker_state():
    server = metrics.ServerMetrics("up-e", "h:3")
    server.set_breaker(BreakerState.OPEN)
    server.breaker_transition(BreakerState.OPEN)
    assert value("sluicegate_circuit_breaker_state", upstream="up-e", server="h:3") == 2
    labels = {"upstream": "up-e", "server": "h:3", "to": "open"}
    assert value("sluicegate_circuit_breaker_transitions_total", **labels) == 1


def test_a_server_that_stays_across_reload_keeps_its_series():
    first = metrics.ServerMetrics("up-r", "h:4")
    first.response(200, 0.01)
    second = metrics.ServerMetrics("up-r", "h:4")  # the next config generation
    second.response(200, 0.01)
    labels = {"upstream": "up-r", "server": "h:4", "status": "200"}
    assert value("sluicegate_upstream_requests_total", **labels) == 2


def test_retire_drops_the_gauges_of_a_removed_server():
    server = metrics.ServerMetrics("up-gone", "h:5")
    server.set_healthy(False)
    server.retire()
    labels = {"upstream": "up-gone", "server": "h:5"}
    assert REGISTRY.get_sample_value("sluicegate_upstream_healthy", labels) is None
    assert REGISTRY.get_sample_value("sluicegate_circuit_breaker_state", labels) is None


def test_module_helpers():
    before = value("sluicegate_config_reloads_total", result="failure")
    metrics.config_reload(False)
    assert value("sluicegate_config_reloads_total", result="failure") == before + 1
    assert REGISTRY.get_sample_value("sluicegate_config_reloads_total", {"result": "success"})
    errors = value("sluicegate_rate_limit_backend_errors_total")
    metrics.rate_limit_backend_error()
    assert value("sluicegate_rate_limit_backend_errors_total") == errors + 1
    connections = value("sluicegate_open_connections")
    metrics.open_connections_inc()
    assert value("sluicegate_open_connections") == connections + 1
    metrics.open_connections_dec()
    metrics.retry("up-h", "http_503")
    assert value("sluicegate_retries_total", upstream="up-h", reason="http_503") == 1


def test_mark_process_dead_is_a_no_op_in_one_process():
    assert not metrics.multiprocess_enabled()
    metrics.mark_process_dead(12345)


# -- multiprocess mode: the mode is chosen when prometheus_client is imported, so each
# -- "worker" is a real subprocess with PROMETHEUS_MULTIPROC_DIR set from the start.

WORKER = textwrap.dedent(
    """
    import json, sys
    from proxy.observability import metrics
    from proxy.balancing.breaker import BreakerState
    action = sys.argv[1]
    if action == "work":
        route = metrics.RouteMetrics("api")
        route.observe("GET", 200, 0.01)
        server = metrics.ServerMetrics("api", "10.0.0.1:8080")
        server.in_flight_inc()
        server.set_healthy(sys.argv[2] == "up")
        server.set_breaker(BreakerState(sys.argv[3]))
        metrics.open_connections_inc()
        metrics.config_reload(True)
        metrics.flush()  # as a worker does every second, on render, and when it stops
    elif action == "reload":  # the supervisor counts reloads and never flushes
        metrics.config_reload(sys.argv[2] == "ok")
    elif action == "render":
        for pid in sys.argv[2:]:
            metrics.mark_process_dead(int(pid))
        body, content_type = metrics.render()
        sys.stdout.write(json.dumps({"body": body.decode(), "type": content_type}))
    """
)


def run_worker(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-c", WORKER, *args],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def start_worker(tmp_path: Path, *args: str) -> int:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, *args], env=env, cwd=Path(__file__).resolve().parents[2]
    )
    assert process.wait(timeout=60) == 0
    return process.pid


def rendered_samples(tmp_path: Path, *dead_pids: int) -> dict:
    output = json.loads(run_worker(tmp_path, "render", *map(str, dead_pids)).stdout)
    assert output["type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(output["body"]):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


SERVER = {"upstream": "api", "server": "10.0.0.1:8080"}


def test_multiprocess_render_sums_workers(tmp_path):
    start_worker(tmp_path, "work", "up", "closed")
    start_worker(tmp_path, "work", "up", "closed")
    samples = rendered_samples(tmp_path)
    requests = {"route": "api", "method": "GET", "status": "200"}
    assert sample(samples, "sluicegate_requests_total", **requests) == 2
    assert sample(samples, "sluicegate_request_duration_seconds_count", route="api") == 2
    assert sample(samples, "sluicegate_config_reloads_total", result="success") == 2
    assert sample(samples, "sluicegate_upstream_in_flight", **SERVER) == 2
    assert sample(samples, "sluicegate_open_connections") == 2


def test_multiprocess_gauges_show_the_worst_state_across_workers(tmp_path):
    start_worker(tmp_path, "work", "up", "closed")
    start_worker(tmp_path, "work", "down", "open")
    samples = rendered_samples(tmp_path)
    assert sample(samples, "sluicegate_upstream_healthy", **SERVER) == 0
    assert sample(samples, "sluicegate_circuit_breaker_state", **SERVER) == 2


def test_multiprocess_dead_workers_leave_live_gauges_but_keep_counters(tmp_path):
    start_worker(tmp_path, "work", "up", "closed")
    dead = start_worker(tmp_path, "work", "down", "open")
    samples = rendered_samples(tmp_path, dead)
    requests = {"route": "api", "method": "GET", "status": "200"}
    assert sample(samples, "sluicegate_requests_total", **requests) == 2
    assert sample(samples, "sluicegate_upstream_in_flight", **SERVER) == 1
    assert sample(samples, "sluicegate_open_connections") == 1
    assert sample(samples, "sluicegate_upstream_healthy", **SERVER) == 1
    assert sample(samples, "sluicegate_circuit_breaker_state", **SERVER) == 0


def test_methods_as_raw_bytes_get_their_own_label():
    # The HTTP engine hands the method over as the bytes of the request line.
    route = metrics.RouteMetrics("route-bytes")
    route.observe(b"GET", 200, 0.01)
    route.observe(b"POST", 201, 0.01)
    route.observe(b"BREW", 200, 0.01)
    assert value("sluicegate_requests_total", route="route-bytes", method="GET", status="200") == 1
    assert value("sluicegate_requests_total", route="route-bytes", method="POST", status="201") == 1
    assert (
        value("sluicegate_requests_total", route="route-bytes", method="OTHER", status="200") == 1
    )


def test_multiprocess_hot_series_reach_the_files_on_flush(tmp_path):
    """Workers count request series in memory (a file write per update cost 11 us per
    request) and flush: what a worker counted shows once it flushed, not before."""
    script = textwrap.dedent(
        """
        import json, sys
        from proxy.observability import metrics
        route = metrics.RouteMetrics("api")
        route.observe("GET", 200, 0.01)
        before = metrics.render()[0].decode()
        route.observe("GET", 200, 0.01)
        metrics.flush()
        metrics.flush()  # a second flush adds nothing
        sys.stdout.write(json.dumps({"before": before, "after": metrics.render()[0].decode()}))
        """
    )
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    output = json.loads(result.stdout)
    line = 'sluicegate_requests_total{method="GET",route="api",status="200"}'
    assert f"{line} 1.0" in output["before"]  # render flushes first
    assert f"{line} 2.0" in output["after"]


def test_a_failure_kind_is_counted_under_its_config_word():
    from proxy.balancing.retry import FailureKind

    server = metrics.ServerMetrics("up-k", "h:6")
    server.response(FailureKind.TIMEOUT, None)
    server.response("timeout", None)  # the same series, whichever form arrives
    labels = {"upstream": "up-k", "server": "h:6", "status": "timeout"}
    assert value("sluicegate_upstream_requests_total", **labels) == 2


def test_prometheus_client_is_left_unpatched():
    # Our series are plain numbers read by a collector: the library's own value class
    # (with its lock) stays in place for anything else that uses prometheus-client.
    from prometheus_client import values

    assert values.ValueClass.__module__ == "prometheus_client.values"
    assert type(metrics.in_flight_requests).__module__ == "proxy.observability.metrics"


def test_a_scrape_reads_the_series_as_they_are_now():
    route = metrics.RouteMetrics("route-now")
    route.observe("GET", 200, 40.0)  # beyond the last bound: the +Inf bucket only
    labels = {"route": "route-now"}
    assert value("sluicegate_request_duration_seconds_bucket", le="30.0", **labels) == 0
    assert value("sluicegate_request_duration_seconds_bucket", le="+Inf", **labels) == 1
    assert value("sluicegate_request_duration_seconds_sum", **labels) == 40.0
    route.observe("GET", 200, 0.001)  # on a bound: counted in that bucket (le is <=)
    assert value("sluicegate_request_duration_seconds_bucket", le="0.001", **labels) == 1
    assert value("sluicegate_request_duration_seconds_count", **labels) == 2


def test_multiprocess_counts_off_the_request_path_need_no_flush(tmp_path):
    start_worker(tmp_path, "reload", "ok")
    start_worker(tmp_path, "reload", "failed")
    samples = rendered_samples(tmp_path)
    assert sample(samples, "sluicegate_config_reloads_total", result="success") == 1
    assert sample(samples, "sluicegate_config_reloads_total", result="failure") == 1
