"""Real Prometheus tooling on real output: ``promtool check metrics`` lints what ``/metrics``
serves after traffic (successes, upstream errors, an open breaker, a retry, rate limits,
health checks, a failed reload), in one process and aggregated over two workers; and
``promtool check config`` validates the shipped scrape config.

promtool comes with the Debian package ``prometheus``. Without it these tests skip, except
under CI (env ``CI`` set), where a missing tool is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import REPO, free_port, wait_for

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


@pytest.fixture
def promtool() -> str:
    if not os.access(PROMTOOL, os.X_OK):
        message = "install prometheus (promtool)"
        if os.environ.get("CI"):
            pytest.fail(f"promtool missing under CI: {message}")
        pytest.skip(message)
    return PROMTOOL


def run_promtool(promtool: str, *args: str, stdin: str | None = None):
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def traffic_config(live: int, **extra) -> dict:
    dead = free_port()
    config = {
        "upstreams": {
            "app": {
                "policy": "round_robin",
                "servers": [
                    {"url": f"http://127.0.0.1:{live}"},
                    {"url": f"http://127.0.0.1:{dead}"},
                ],
                "retry": {"tries": 2, "on": ["error", "http_503"]},
                "circuit_breaker": {"failure_threshold": 2, "open_duration": "60s"},
                "health_check": {"path": "/health", "interval": "200ms"},
            },
            "broken": {
                "servers": [{"url": f"http://127.0.0.1:{free_port()}"}],
                "retry": {"tries": 1},
                "circuit_breaker": {"failure_threshold": 1, "open_duration": "60s"},
            },
        },
        "routes": [
            {
                "name": "limited",
                "match": {"path_prefix": "/limited"},
                "upstream": "app",
                "strip_prefix": True,
                "rate_limit": {"rate": "1/s", "burst": 1},
            },
            {"name": "broken", "match": {"path_prefix": "/broken"}, "upstream": "broken"},
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
    }
    config.update(extra)
    return config


def drive_traffic(daemon) -> None:
    for _ in range(6):
        assert daemon.get("/")[0] == 200
    assert daemon.get("/status/404")[0] == 404
    assert daemon.get("/broken")[0] == 502
    assert daemon.get("/broken")[0] == 503
    statuses = [daemon.get("/limited")[0] for _ in range(3)]
    assert statuses[0] == 200 and 429 in statuses
    # A failed reload shows in config_reloads_total{result="failure"}.
    good = daemon.config_path.read_text()
    daemon.config_path.write_text("upstreams: {app: {servers: []}}\n")
    assert daemon.admin("POST", "/reload")[0] == 400
    daemon.config_path.write_text(good)


def check_exposition(promtool: str, text: str) -> None:
    names = {family.name for family in text_string_to_metric_families(text)}
    for name in (
        "sluicegate_requests",
        "sluicegate_upstream_requests",
        "sluicegate_circuit_breaker_transitions",
        "sluicegate_rate_limited",
        "sluicegate_health_checks",
        "sluicegate_config_reloads",
        "sluicegate_in_flight_requests",
        "sluicegate_event_loop_lag_seconds",
    ):
        assert name in names, name
    result = run_promtool(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout}{result.stderr}"
    # promtool prints lint findings even when it exits 0 on some versions.
    assert not result.stdout.strip(), result.stdout


def test_promtool_accepts_metrics_after_traffic(promtool, start_sluicegate, spawn_backend):
    _, live = spawn_backend("live")
    daemon = start_sluicegate(traffic_config(live))
    drive_traffic(daemon)
    wait_for(lambda: "sluicegate_health_checks_total{" in daemon.metrics(), message="checks")
    text = daemon.metrics()
    assert 'status="error"' in text and 'to="open"' in text
    assert 'sluicegate_rate_limited_total{route="limited"} ' in text
    check_exposition(promtool, text)


def test_promtool_accepts_metrics_aggregated_over_two_workers(
    promtool, start_sluicegate, spawn_backend
):
    _, live = spawn_backend("live")
    daemon = start_sluicegate(traffic_config(live, workers=2), timeout=30)
    for _ in range(4):
        assert daemon.get("/")[0] == 200
    assert daemon.get("/broken")[0] == 502
    # The first health check of each worker comes after a random jitter of up to 200 ms.
    wait_for(lambda: "sluicegate_health_checks_total{" in daemon.metrics(), message="checks")
    check_exposition(promtool, daemon.metrics())


def test_promtool_accepts_the_shipped_scrape_config(promtool):
    result = run_promtool(promtool, "check", "config", str(REPO / "config" / "prometheus.yml"))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"
    assert "SUCCESS" in result.stdout + result.stderr
