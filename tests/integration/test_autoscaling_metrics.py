"""The autoscaling signals on the real daemon: ``sluicegate_in_flight_requests`` follows the
requests being served (summed over workers), ``sluicegate_event_loop_lag_seconds`` samples
the loop four times a second, under load too."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import wait_for


def _config(backend_port: int, **extra) -> dict:
    config = {
        "upstreams": {
            "app": {
                "servers": [{"url": f"http://127.0.0.1:{backend_port}"}],
                "retry": {"tries": 1},
            }
        },
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"}],
        "logging": {"access_log": False},
    }
    config.update(extra)
    return config


def _samples(daemon) -> dict[str, float]:
    """Every sample of the two signals, by name (+ ``le`` for buckets)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(daemon.metrics()):
        if family.name in ("sluicegate_in_flight_requests", "sluicegate_event_loop_lag_seconds"):
            for sample in family.samples:
                key = sample.name + (f"[{sample.labels['le']}]" if "le" in sample.labels else "")
                found[key] = sample.value
    return found


def _in_flight(daemon) -> float:
    return _samples(daemon)["sluicegate_in_flight_requests"]


def _swallow(call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except OSError:
        pass  # the client that gives up


@pytest.mark.parametrize("workers", [1, 2])
def test_in_flight_follows_slow_requests_and_returns_to_zero(
    workers, start_sluicegate, spawn_backend
):
    _, backend = spawn_backend("slow")
    daemon = start_sluicegate(_config(backend, workers=workers), timeout=30)
    wait_for(lambda: daemon.admin("GET", "/readyz")[0] == 200, message="ready")
    assert _in_flight(daemon) == 0
    threads = [
        threading.Thread(target=_swallow, args=(daemon.get, "/delay/2000"), kwargs={"timeout": 10})
        for _ in range(3)
    ]
    # One more that gives up after 300 ms: a request the client abandoned ends too.
    threads.append(
        threading.Thread(target=_swallow, args=(daemon.get, "/delay/1500"), kwargs={"timeout": 0.3})
    )
    for thread in threads:
        thread.start()
    wait_for(lambda: _in_flight(daemon) == 4, timeout=1.5, message="4 in flight")
    wait_for(lambda: _in_flight(daemon) == 3, timeout=3, message="the abandoned one ended")
    for thread in threads:
        thread.join(10)
    wait_for(lambda: _in_flight(daemon) == 0, timeout=3, message="back to 0")


def test_loop_lag_has_sane_observations_under_load(start_sluicegate, spawn_backend):
    _, backend = spawn_backend("b")
    daemon = start_sluicegate(_config(backend))
    before = _samples(daemon)
    started = time.monotonic()
    stop = time.monotonic() + 2.0
    served = [0]

    def load() -> None:
        while time.monotonic() < stop:
            if daemon.get("/")[0] == 200:
                served[0] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    after = _samples(daemon)
    elapsed = time.monotonic() - started
    count = after["sluicegate_event_loop_lag_seconds_count"]
    new = count - before["sluicegate_event_loop_lag_seconds_count"]
    # One sample every 0.25 s: a loop that is late runs fewer, never more.
    assert 0.4 * elapsed / 0.25 <= new <= elapsed / 0.25 + 1, (new, elapsed)
    assert after["sluicegate_event_loop_lag_seconds_bucket[+Inf]"] == count
    lag_sum = after["sluicegate_event_loop_lag_seconds_sum"]
    assert 0 <= lag_sum / count < 0.25  # late, on average, by less than one sample period
    assert served[0] > 50
    print(f"loop lag: {new:.0f} samples in {elapsed:.2f}s, mean {lag_sum / count * 1000:.2f} ms")
