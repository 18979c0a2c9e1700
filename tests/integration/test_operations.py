"""Operations on the real daemon: reload (SIGHUP, POST /reload), graceful shutdown, workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.support.daemon import REPO, free_port, http_request, wait_for


def _config(*ports: int, **extra) -> dict:
    config = {
        "upstreams": {
            "app": {
                "policy": "round_robin",
                "servers": [{"url": f"http://127.0.0.1:{port}"} for port in ports],
                "circuit_breaker": {"failure_threshold": 1, "open_duration": "60s"},
                "retry": {"tries": 1},
            }
        },
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"}],
    }
    config.update(extra)
    return config


def _backend_name(daemon, path="/") -> str:
    status, headers, _ = daemon.get(path)
    assert status == 200
    return headers["x-backend"]


def _metric_value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def test_sighup_applies_a_valid_file_to_new_requests(start_sluicegate, spawn_backend):
    _, first = spawn_backend("first")
    _, second = spawn_backend("second")
    daemon = start_sluicegate(_config(first))
    assert {_backend_name(daemon) for _ in range(3)} == {"first"}

    config = dict(daemon.config)
    config["upstreams"] = _config(second)["upstreams"]
    daemon.write_config(config)
    daemon.reload()
    wait_for(lambda: _backend_name(daemon) == "second", timeout=10, message="reload applied")
    assert _metric_value(daemon.metrics(), "sluicegate_config_reloads_total", result="success") == 1


def test_invalid_file_changes_nothing_and_reload_endpoint_says_400(start_sluicegate, spawn_backend):
    _, port = spawn_backend("only")
    daemon = start_sluicegate(_config(port))
    daemon.config_path.write_text("upstreams: {app: {servers: [{url: http://x, weight: 0}]}}\n")
    status, _, body = daemon.admin("POST", "/reload")
    assert status == 400
    assert "weight" in json.loads(body)["error"]
    daemon.reload()  # the signal path too: logged and counted, nothing changes
    wait_for(
        lambda: (
            _metric_value(daemon.metrics(), "sluicegate_config_reloads_total", result="failure")
            == 2
        ),
        message="two failed reloads counted",
    )
    assert _backend_name(daemon) == "only"
    assert "reload failed" in daemon.logs()


def test_servers_that_stay_keep_their_breaker_state(start_sluicegate, spawn_backend):
    _, alive = spawn_backend("alive")
    dead = free_port()  # nothing listens: the first attempt there opens its breaker
    daemon = start_sluicegate(_config(alive, dead))
    for _ in range(4):
        daemon.get("/")
    breakers = [s["breaker"] for s in daemon.status()["upstreams"]["app"]["servers"]]
    assert breakers == ["closed", "open"]

    config = dict(daemon.config)
    config["routes"] = [
        {"name": "renamed", "match": {"path_prefix": "/"}, "upstream": "app"},
    ]
    daemon.write_config(config)
    status, _, _ = daemon.admin("POST", "/reload")
    assert status == 200
    servers = daemon.status()["upstreams"]["app"]["servers"]
    assert [s["breaker"] for s in servers] == ["closed", "open"]
    assert servers[0]["requests"] >= 2  # counters carried over too


def test_reload_opens_a_new_listener_and_closes_the_old(start_sluicegate, spawn_backend):
    _, port = spawn_backend("b")
    daemon = start_sluicegate(_config(port))
    old_port = daemon.port
    new_port = free_port()
    config = dict(daemon.config)
    config["listen"] = [{"address": f"127.0.0.1:{new_port}"}]
    daemon.write_config(config)
    status, _, body = daemon.admin("POST", "/reload")
    assert status == 200, body
    assert http_request(new_port, "GET", "/")[0] == 200
    with pytest.raises(OSError):
        http_request(old_port, "GET", "/", timeout=2)


def test_sigterm_finishes_in_flight_requests_then_exits_zero(start_sluicegate, spawn_backend):
    _, port = spawn_backend("slow")
    daemon = start_sluicegate(_config(port, shutdown_timeout="10s"))
    results: list[int] = []

    def slow_request() -> None:
        results.append(daemon.get("/delay/1200", timeout=10)[0])

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    daemon.signal(signal.SIGTERM)
    wait_for(
        lambda: daemon.admin("GET", "/readyz")[0] == 503,
        timeout=2,
        message="readyz 503 while draining",
    )
    with pytest.raises(OSError):  # the traffic listener is closed at once
        http_request(daemon.port, "GET", "/", timeout=1)
    thread.join(10)
    assert results == [200]
    assert daemon.wait_exit(10) == 0


def test_shutdown_timeout_cuts_what_is_left(start_sluicegate, spawn_backend):
    _, port = spawn_backend("slow")
    daemon = start_sluicegate(_config(port, shutdown_timeout="300ms"))
    errors: list[BaseException] = []

    def slow_request() -> None:
        try:
            daemon.get("/delay/5000", timeout=10)
        except Exception as error:  # the cut
            errors.append(error)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(5) == 0
    assert time.monotonic() - started < 3
    thread.join(5)
    assert errors


def test_second_signal_stops_at_once(start_sluicegate, spawn_backend):
    _, port = spawn_backend("slow")
    daemon = start_sluicegate(_config(port, shutdown_timeout="30s"))
    thread = threading.Thread(target=lambda: _swallow(daemon.get, "/delay/5000"))
    thread.start()
    time.sleep(0.3)
    daemon.signal(signal.SIGTERM)
    time.sleep(0.2)
    started = time.monotonic()
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit(5) == 0
    assert time.monotonic() - started < 3
    thread.join(5)


def _swallow(function, *args) -> None:
    try:
        function(*args, timeout=10)
    except Exception:
        pass


def test_run_reports_a_port_in_use_in_one_line(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "busy.yaml"
        config.write_text(
            f"listen: [{{address: 127.0.0.1:{port}}}]\n"
            f"admin: {{address: 127.0.0.1:{free_port()}}}\n"
            "upstreams: {a: {servers: [{url: http://127.0.0.1:9}]}}\n"
            "routes: [{name: r, upstream: a}]\n"
        )
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=REPO,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "address already in use" in result.stderr


def test_run_reports_a_missing_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "-c", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr


# -- workers -----------------------------------------------------------------------------------


def _worker_pids(daemon) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(daemon.pid)], capture_output=True, text=True)
    return {int(pid) for pid in out.stdout.split()}


def _kill_a_worker_and_wait_for_its_replacement(daemon) -> None:
    victim = sorted(_worker_pids(daemon))[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(_worker_pids(daemon)) == 2 and victim not in _worker_pids(daemon),
        timeout=15,
        message="a replacement worker",
    )
    wait_for(lambda: daemon.admin("GET", "/readyz")[0] == 200, timeout=15, message="ready again")


def test_two_workers_share_the_port_and_metrics_aggregate(start_sluicegate, spawn_backend):
    _, port = spawn_backend("w")
    daemon = start_sluicegate(_config(port, workers=2), timeout=30)
    assert len(_worker_pids(daemon)) == 2
    for _ in range(40):
        assert daemon.get("/")[0] == 200
    text = daemon.metrics()
    total = _metric_value(text, "sluicegate_requests_total", route="all", status="200")
    assert total == 40
    status = daemon.status()
    assert status["workers"] == 2
    assert status["upstreams"]["app"]["servers"][0]["requests"] == 40


def test_supervisor_restarts_a_dead_worker_and_stops_cleanly(start_sluicegate, spawn_backend):
    _, port = spawn_backend("w")
    daemon = start_sluicegate(_config(port, workers=2), timeout=30)
    _kill_a_worker_and_wait_for_its_replacement(daemon)
    assert daemon.get("/")[0] == 200
    assert daemon.stop(signal.SIGTERM) == 0


def test_a_restarted_worker_loads_what_its_siblings_run_not_an_edit_never_reloaded(
    start_sluicegate, spawn_backend
):
    """Workers load the bytes the supervisor last validated, not the file as it is now:
    an edit nobody reloaded must not reach the one worker that happened to restart."""
    _, port = spawn_backend("w")
    daemon = start_sluicegate(_config(port, workers=2), timeout=30)
    edited = dict(daemon.config)
    edited["routes"] = [{"name": "other", "match": {"path_prefix": "/other/"}, "upstream": "app"}]
    daemon.write_config(edited)  # not reloaded
    _kill_a_worker_and_wait_for_its_replacement(daemon)
    # Each request a new connection: the kernel spreads them over both workers.
    assert [daemon.get("/")[0] for _ in range(16)] == [200] * 16

    daemon.reload()  # SIGHUP: now the edit applies, in every worker
    wait_for(lambda: daemon.get("/")[0] == 404, message="the edit applied")
    assert [daemon.get("/")[0] for _ in range(16)] == [404] * 16


def test_drain_through_the_supervisor_reaches_every_worker(start_sluicegate, spawn_backend):
    _, first = spawn_backend("first")
    _, second = spawn_backend("second")
    daemon = start_sluicegate(_config(first, second, workers=2), timeout=30)
    status, _, body = daemon.admin("POST", "/upstreams/app/servers/0/drain")
    assert status == 200 and json.loads(body)["draining"] is True
    assert {_backend_name(daemon) for _ in range(20)} == {"second"}
