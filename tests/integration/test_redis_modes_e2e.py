"""Daemons (``sluicegate run``) limiting through Redis Sentinel and Redis Cluster.

Real daemons, a real demo backend, and the real Sentinel set or Cluster of
``tests/support/redis_server.py``, their password handed to the daemons through
``password_env`` only. Counts are exact where no whole token can refill (rate 1/m).
"""

from __future__ import annotations

import http.client
import threading
import time
from typing import Any

import pytest

from tests.support.daemon import Daemon, wait_for
from tests.support.redis_server import PASSWORD_ENV

TIMEOUT = 0.1  # redis.timeout in these configs
# A request's whole latency through the proxy: the limiter's share is bounded by about
# 2 x redis.timeout; the rest is room for HTTP and a loaded test machine. Waiting for a
# failover (seconds) or for a cancelled cluster call to unwind (about 1s) is far beyond.
LATENCY_BOUND = 2 * TIMEOUT + 0.25


@pytest.fixture(params=["sentinel", "sentinel_with_password", "cluster"])
def redis_set(request):
    """``sentinel_with_password``: sentinels with ``requirepass`` (the data nodes'
    password, as Helm charts set them up); the proxy sends them the password. Plain
    ``sentinel`` refuses the AUTH, and the proxy asks again without."""
    return request.getfixturevalue(f"redis_{request.param}")


def _config(backend_port: int, redis: dict[str, Any], burst: int, rate: str) -> dict[str, Any]:
    """Route ``exact`` on ``/exact``: burst 10 at 1/m; route ``api`` on ``/``: as given."""

    def route(name: str, prefix: str, rate: str, burst: int) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"path_prefix": prefix},
            "upstream": "app",
            "strip_prefix": prefix != "/",
            "rate_limit": {"rate": rate, "burst": burst, "key": "header:X-Client"},
        }

    return {
        "redis": redis,
        "upstreams": {"app": {"servers": [{"url": f"http://127.0.0.1:{backend_port}"}]}},
        "routes": [route("exact", "/exact", "1/m", 10), route("api", "/", rate, burst)],
    }


def _start_two(start_sluicegate, spawn_backend, redis_set, *, burst=20, rate="20/s", **redis):
    _, port = spawn_backend("app")
    config = _config(port, redis_set.redis_config(timeout=f"{TIMEOUT * 1000:g}ms", **redis),
                     burst, rate)  # fmt: skip
    env = {PASSWORD_ENV: redis_set.password}
    first = start_sluicegate(config, name="first", env=env)
    second = start_sluicegate(config, name="second", env=env)
    return first, second


def _statuses(daemons: list[Daemon], client: str, count: int, path: str = "/exact") -> list[int]:
    return [
        daemons[i % len(daemons)].get(path, headers={"X-Client": client})[0] for i in range(count)
    ]


def _shared_again(daemon: Daemon) -> bool:
    """The daemon's last word on Redis is that it answers again (the breaker closed)."""
    events = [
        line
        for line in daemon.logs().splitlines()
        if "falls back from redis" in line or "answers again" in line
    ]
    return not events or "answers again" in events[-1]


def _backend_errors(*daemons: Daemon) -> float:
    return sum(_metric(d, "sluicegate_rate_limit_backend_errors_total") for d in daemons)


def _metric(daemon: Daemon, name: str) -> float:
    for line in daemon.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _assert_password_never_shown(password: str, *daemons: Daemon) -> None:
    for daemon in daemons:
        assert password not in daemon.logs()
        assert password not in daemon.admin("GET", "/status")[2].decode()
        assert password not in daemon.metrics()


def test_two_daemons_share_one_exact_limit(start_sluicegate, spawn_backend, redis_set):
    first, second = _start_two(start_sluicegate, spawn_backend, redis_set)
    assert _statuses([first, second], "alice", 30) == [200] * 10 + [429] * 20
    assert _statuses([second, first], "bob", 12) == [200] * 10 + [429] * 2
    assert _metric(first, "sluicegate_rate_limit_backend_errors_total") == 0
    assert "rate limits are shared through redis" in first.logs()
    _assert_password_never_shown(redis_set.password, first, second)


def test_wrong_password_falls_back_and_is_never_shown(start_sluicegate, spawn_backend, redis_set):
    _, port = spawn_backend("app")
    config = _config(port, redis_set.redis_config(timeout=f"{TIMEOUT * 1000:g}ms"), 20, "20/s")
    wrong = "wrong-" + redis_set.password
    daemon = start_sluicegate(config, env={PASSWORD_ENV: wrong})
    # Redis refuses the password: every request is still answered, by the local bucket.
    assert _statuses([daemon], "carol", 12) == [200] * 10 + [429] * 2
    assert _metric(daemon, "sluicegate_rate_limit_backend_errors_total") >= 1
    assert "rate limiting falls back from redis" in daemon.logs()
    _assert_password_never_shown(wrong, daemon)
    _assert_password_never_shown(redis_set.password, daemon)


def test_requests_stay_fast_while_the_master_fails_over(start_sluicegate, spawn_backend, redis_set):
    """A steady stream of limited requests through two daemons while the master holding
    their bucket hangs (SIGSTOP) and its replica is promoted: every request is answered,
    none much slower than 2 x redis.timeout, and the shared limit holds again after."""
    first, second = _start_two(start_sluicegate, spawn_backend, redis_set)
    bucket = (
        "sluicegate:rl:{api:stream}"
        if redis_set.redis_config()["mode"] == "cluster"
        else "sluicegate:rl:api:stream"
    )
    assert _statuses([first, second], "stream", 2, path="/") == [200, 200]
    latencies: list[float] = []
    statuses: list[int] = []
    stop = threading.Event()

    def client(daemon: Daemon) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        while not stop.is_set():
            started = time.monotonic()
            connection.request("GET", "/", headers={"X-Client": "stream"})
            response = connection.getresponse()
            response.read()
            latencies.append(time.monotonic() - started)
            statuses.append(response.status)
            time.sleep(0.01)
        connection.close()

    threads = [threading.Thread(target=client, args=(d,)) for d in (first, second) * 2]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        if redis_set.redis_config()["mode"] == "cluster":
            old = redis_set.master_of(bucket)
        else:
            old = redis_set.master_port()
        redis_set.kill(old, freeze=True)
        redis_set.wait_failover(old)
        time.sleep(2.0)  # the probes find the new master; the stream goes on
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert len(statuses) > 200 and set(statuses) <= {200, 429}
    assert max(latencies) < LATENCY_BOUND, f"slowest request {max(latencies):.3f}s"
    assert _metric(first, "sluicegate_rate_limit_backend_errors_total") >= 1
    # After the failover: one shared, exact bucket again (a fresh client key), once each
    # daemon's probe has found the new master. A run in which a check still missed its
    # deadline (a loaded machine, the client refreshing its slot map) was decided by the
    # fallback, not by Redis: it does not count, a fresh key tries again.
    for daemon in (first, second):
        wait_for(lambda d=daemon: _shared_again(d), timeout=15)
    for attempt in range(3):
        errors_before = _backend_errors(first, second)
        after = _statuses([first, second], f"after-{attempt}", 14)
        if _backend_errors(first, second) == errors_before:
            break
        time.sleep(0.5)
    assert after == [200] * 10 + [429] * 4
    _assert_password_never_shown(redis_set.password, first, second)
