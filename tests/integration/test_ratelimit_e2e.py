"""Rate limiting end to end: the real daemon (``python -m proxy run``), real backends, and
for the shared buckets a real ``redis-server`` (fixture ``redis_server``).

Rates here are tiny (1/m) wherever a count must be exact, so no whole token refills while
a test runs; the one test about refill waits a real second. Timing bounds are loose: they
catch a stall (a request waiting on a dead or slow Redis), not a slow CI machine.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.daemon import Daemon, wait_for
from tests.support.rawupstream import RawUpstream, simple_response

REDIS_TIMEOUT = 0.05  # redis.timeout in these configs: 50ms
# What one request may cost on top of an unlimited one while Redis is dead or slow:
# 2 x redis.timeout by the issue, plus generous room for a loaded test machine.
STALL_BOUND = 0.3
RATELIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")


# -- configs ---------------------------------------------------------------------------------


def _limited(name: str, **rate_limit: Any) -> dict[str, Any]:
    """A route on ``/{name}`` (prefix stripped: the backend sees ``/``) with a rate limit."""
    return {
        "name": name,
        "match": {"path_prefix": f"/{name}"},
        "upstream": "app",
        "strip_prefix": True,
        "rate_limit": rate_limit,
    }


def _config(backend_port: int, *routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Limited ``routes``, and ``free`` on ``/free``: unlimited."""
    config: dict[str, Any] = {
        "upstreams": {
            "app": {
                "servers": [{"url": f"http://127.0.0.1:{backend_port}"}],
                "retry": {"tries": 1},
            }
        },
        "routes": [
            *routes,
            {
                "name": "free",
                "match": {"path_prefix": "/free"},
                "upstream": "app",
                "strip_prefix": True,
            },
        ],
    }
    config.update(extra)
    return config


def _redis(redis_server: Any, **options: Any) -> dict[str, Any]:
    return {"url": redis_server.url, "timeout": f"{REDIS_TIMEOUT * 1000:g}ms", **options}


# -- clients and readings ----------------------------------------------------------------------


def _get(daemon: Daemon, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return daemon.get(path, headers=headers)


def _timed_get(daemon: Daemon, path: str, **headers: str) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    status, response_headers, _ = daemon.get(path, headers=headers)
    return status, response_headers, time.monotonic() - started


def _statuses(daemon: Daemon, path: str, n: int, **headers: str) -> list[int]:
    return [_get(daemon, path, **headers)[0] for _ in range(n)]


def _alternate(daemons: list[Daemon], path: str, n: int, **headers: str) -> list[int]:
    """``n`` requests spread round-robin over ``daemons``; their statuses in order."""
    return [_get(daemons[i % len(daemons)], path, **headers)[0] for i in range(n)]


def _has_no_limit_headers(headers: dict[str, str]) -> bool:
    return not any(name in headers for name in RATELIMIT_HEADERS)


def _assert_error_json(body: bytes, reason: str) -> None:
    payload = json.loads(body)
    assert set(payload) == {"error", "request_id"}, payload
    assert payload["error"] == reason
    assert payload["request_id"]


def _metric(daemon: Daemon, name: str, **labels: str) -> float:
    """A sample's value from ``/metrics`` (0 when absent, as Prometheus reads a counter)."""
    for line in daemon.metrics().splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            return float(value)
    return 0.0


def _shared_limit_again(daemon: Daemon, path: str, burst: int, **headers: str) -> bool:
    _, response_headers, _ = _get(daemon, path, **headers)
    return response_headers.get("ratelimit-limit") == str(burst)


# -- in memory (no redis) ----------------------------------------------------------------------


def test_burst_then_429_with_ratelimit_headers_then_refill(start_sluicegate, spawn_backend):
    _, port = spawn_backend("app")
    daemon = start_sluicegate(_config(port, _limited("api", rate="1/s", burst=3)))

    answers = [_get(daemon, "/api") for _ in range(5)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 429, 429]
    for _, headers, _ in answers:
        assert headers["ratelimit-limit"] == "3"
        assert 0 <= int(headers["ratelimit-reset"]) <= 3
    assert [h["ratelimit-remaining"] for _, h, _ in answers] == ["2", "1", "0", "0", "0"]

    _, headers, body = answers[3]
    _assert_error_json(body, "rate limited")
    assert headers["content-type"].startswith("application/json")
    assert int(headers["retry-after"]) >= 1  # whole seconds, at least 1
    assert "retry-after" not in answers[0][1]

    status, headers, _ = _get(daemon, "/free")  # the unlimited route
    assert status == 200
    assert _has_no_limit_headers(headers)

    time.sleep(1.1)  # rate 1/s: one token back
    assert _statuses(daemon, "/api", 2) == [200, 429]
    assert _metric(daemon, "sluicegate_rate_limited_total", route="api") == 3

    wait_for(  # the access log is written in batches by a background thread
        lambda: [line["rate_limited"] for line in daemon.access_log()].count(True) == 3,
        message="the three 429s in the access log",
    )


def test_client_ip_key_trusts_x_forwarded_for_only_from_trusted_proxies(
    start_sluicegate, spawn_backend
):
    _, port = spawn_backend("app")
    route = _limited("api", rate="1/m", burst=2, key="client_ip")
    trusting = start_sluicegate(
        _config(port, route, trusted_proxies=["127.0.0.1/32"]), name="trusting"
    )
    untrusting = start_sluicegate(_config(port, route), name="untrusting")

    # Behind a trusted proxy, every client address has its own bucket.
    for client in ("203.0.113.1", "203.0.113.2", "10.1.2.3, 203.0.113.3"):
        assert _statuses(trusting, "/api", 3, **{"X-Forwarded-For": client}) == [200, 200, 429]
    # The peer itself (no header) is one more client.
    assert _statuses(trusting, "/api", 3) == [200, 200, 429]

    # Nobody is trusted: X-Forwarded-For is ignored, all of this is one client (the peer).
    statuses = [
        _get(untrusting, "/api", **{"X-Forwarded-For": f"203.0.113.{i}"})[0] for i in range(5)
    ]
    assert statuses == [200, 200, 429, 429, 429]


def test_header_key_separates_clients_and_falls_back_to_the_client_ip(
    start_sluicegate, spawn_backend
):
    _, port = spawn_backend("app")
    daemon = start_sluicegate(
        _config(
            port,
            _limited("api", rate="1/m", burst=2, key="header:X-Api-Key"),
            trusted_proxies=["127.0.0.1/32"],
        )
    )
    xff = "X-Forwarded-For"
    assert _statuses(daemon, "/api", 3, **{"X-Api-Key": "alpha"}) == [200, 200, 429]
    # Same key from another address: still alpha's bucket. Header names are case-blind.
    assert _statuses(daemon, "/api", 1, **{"x-api-key": "alpha", xff: "198.51.100.9"}) == [429]
    assert _statuses(daemon, "/api", 3, **{"X-Api-Key": "beta"}) == [200, 200, 429]

    # No key: the client address decides, so two addresses have two buckets.
    assert _statuses(daemon, "/api", 3, **{xff: "198.51.100.1"}) == [200, 200, 429]
    assert _statuses(daemon, "/api", 3, **{xff: "198.51.100.2"}) == [200, 200, 429]
    # A key that happens to equal an address is still a key, not that address's bucket.
    assert _statuses(daemon, "/api", 1, **{"X-Api-Key": "198.51.100.3"}) == [200]
    assert _statuses(daemon, "/api", 2, **{xff: "198.51.100.3"}) == [200, 200]


def test_cookie_key_separates_sessions(start_sluicegate, spawn_backend):
    _, port = spawn_backend("app")
    daemon = start_sluicegate(
        _config(port, _limited("api", rate="1/m", burst=2, key="cookie:session"))
    )
    assert _statuses(daemon, "/api", 3, Cookie="session=a") == [200, 200, 429]
    assert _statuses(daemon, "/api", 1, Cookie="theme=dark; session=a") == [429]
    assert _statuses(daemon, "/api", 3, Cookie="theme=dark; session=b") == [200, 200, 429]
    # No session cookie: the client address (the peer here) has its own bucket.
    assert _statuses(daemon, "/api", 3, Cookie="theme=dark") == [200, 200, 429]
    assert _statuses(daemon, "/api", 1) == [429]


def test_route_key_is_one_bucket_for_everyone(start_sluicegate, spawn_backend):
    _, port = spawn_backend("app")
    daemon = start_sluicegate(
        _config(
            port,
            _limited("api", rate="1/m", burst=3, key="route"),
            _limited("other", rate="1/m", burst=1, key="route"),
            trusted_proxies=["127.0.0.1/32"],
        )
    )
    statuses = [
        _get(daemon, "/api", **{"X-Forwarded-For": f"203.0.113.{i}", "X-Api-Key": str(i)})[0]
        for i in range(5)
    ]
    assert statuses == [200, 200, 200, 429, 429]
    # Another route has its own bucket.
    assert _statuses(daemon, "/other", 2) == [200, 429]


def test_shadow_mode_counts_but_never_rejects(start_sluicegate, spawn_backend):
    _, port = spawn_backend("app")
    daemon = start_sluicegate(_config(port, _limited("canary", rate="1/m", burst=2, mode="shadow")))
    answers = [_get(daemon, "/canary") for _ in range(6)]
    assert [status for status, _, _ in answers] == [200] * 6
    assert all("retry-after" not in headers for _, headers, _ in answers)
    # The headers tell the client where it stands, as they would when enforced.
    assert [h["ratelimit-remaining"] for _, h, _ in answers] == ["1", "0", "0", "0", "0", "0"]
    assert _metric(daemon, "sluicegate_rate_limited_total", route="canary") == 4
    wait_for(
        lambda: [line["rate_limited"] for line in daemon.access_log()].count(True) == 4,
        message="shadow denials in the access log",
    )


# -- shared in redis ---------------------------------------------------------------------------


def test_two_daemons_share_one_redis_bucket(start_sluicegate, spawn_backend, redis_server):
    _, port = spawn_backend("app")
    config = _config(
        port,
        _limited("api", rate="1/m", burst=10, key="client_ip"),
        redis=_redis(redis_server),
        trusted_proxies=["127.0.0.1/32"],
    )
    a = start_sluicegate(config, name="a")
    b = start_sluicegate(config, name="b")
    one = {"X-Forwarded-For": "203.0.113.1"}
    two = {"X-Forwarded-For": "203.0.113.2"}

    statuses = _alternate([a, b], "/api", 30, **one)
    assert statuses.count(200) == 10, statuses  # the burst once, not once per daemon
    assert statuses[:10] == [200] * 10
    # Each daemon answered its share of the admitted requests: the bucket really is shared.
    assert statuses[0:10:2] == statuses[1:10:2] == [200] * 5

    # Another client has its own bucket, on either daemon.
    status, headers, _ = _get(b, "/api", **two)
    assert (status, headers["ratelimit-remaining"]) == (200, "9")
    assert _alternate([a, b], "/api", 20, **two).count(200) == 9

    keys = set(redis_server.client().keys("sluicegate:rl:*"))
    assert keys == {"sluicegate:rl:api:203.0.113.1", "sluicegate:rl:api:203.0.113.2"}
    for daemon in (a, b):
        assert _metric(daemon, "sluicegate_rate_limit_backend_errors_total") == 0


def test_workers_of_one_daemon_share_the_redis_bucket(
    start_sluicegate, spawn_backend, redis_server
):
    _, port = spawn_backend("app")
    route = _limited("api", rate="1/m", burst=10, key="route")
    # In memory, each worker has buckets of its own (a bucket per process): more than the
    # burst gets through, which also shows that the requests reach both workers.
    apart = start_sluicegate(_config(port, route, workers=2), name="apart", timeout=30)
    assert 10 < _statuses(apart, "/api", 40).count(200) <= 20
    # With Redis, one bucket for both.
    shared = start_sluicegate(
        _config(port, route, workers=2, redis=_redis(redis_server)), name="shared", timeout=30
    )
    assert _statuses(shared, "/api", 40).count(200) == 10
    assert _metric(shared, "sluicegate_rate_limited_total", route="api") == 30


@pytest.mark.parametrize("on_redis_error", ["local", "allow", "deny"])
def test_redis_killed_then_restarted(start_sluicegate, spawn_backend, redis_server, on_redis_error):
    _, port = spawn_backend("app")
    config = _config(
        port,
        _limited("api", rate="1/m", burst=10, key="client_ip", on_redis_error=on_redis_error),
        redis=_redis(redis_server, instances=2),
        trusted_proxies=["127.0.0.1/32"],
    )
    a = start_sluicegate(config, name="a")
    b = start_sluicegate(config, name="b")
    daemons = [a, b]
    client = {"X-Forwarded-For": "203.0.113.1"}
    for daemon in daemons:  # shared: both pools hold a live Redis connection now
        status, headers, _ = _get(daemon, "/api", **client)
        assert (status, headers["ratelimit-limit"]) == (200, "10")

    redis_server.stop()
    limited, free, answers = [], [], []
    for i in range(20):
        daemon = daemons[i % 2]
        status, headers, elapsed = _timed_get(daemon, "/api", **client)
        answers.append((status, headers))
        limited.append(elapsed)
        free.append(_timed_get(daemon, "/free")[2])
    times = f"limited {limited}, unlimited {free}"
    assert max(limited) < STALL_BOUND, times
    assert statistics.median(limited) - statistics.median(free) < 2 * REDIS_TIMEOUT, times

    statuses = [status for status, _ in answers]
    if on_redis_error == "local":
        # Each daemon falls back to its own bucket of burst / instances = 5.
        assert statuses.count(200) == 10, statuses
        assert statuses[:10] == [200] * 10 and statuses[10:] == [429] * 10
        assert {headers["ratelimit-limit"] for _, headers in answers} == {"5"}
    elif on_redis_error == "allow":
        assert statuses == [200] * 20
        assert all(_has_no_limit_headers(headers) for _, headers in answers)
    else:
        assert statuses == [503] * 20
        assert all(_has_no_limit_headers(headers) for _, headers in answers)
        status, headers, body = _get(a, "/api", **client)
        assert status == 503
        _assert_error_json(body, "rate limiter unavailable")
        assert "retry-after" not in headers
        # The limiter was down: nobody was over their limit.
        assert _metric(a, "sluicegate_rate_limited_total", route="api") == 0
    for daemon in daemons:
        assert _metric(daemon, "sluicegate_rate_limit_backend_errors_total") > 0
        # The unlimited route never noticed.
        assert _get(daemon, "/free")[0] == 200

    redis_server.start()  # empty: every bucket starts full again
    poll = {"X-Forwarded-For": "192.0.2.99"}
    for daemon in daemons:
        wait_for(
            lambda daemon=daemon: _shared_limit_again(daemon, "/api", 10, **poll),
            timeout=10,
            message="shared rate limiting to resume",
        )
    # Shared again: the two daemons take from one bucket.
    statuses = _alternate(daemons, "/api", 30, **{"X-Forwarded-For": "203.0.113.50"})
    assert statuses.count(200) == 10, statuses


def test_slow_redis_costs_at_most_the_timeout(start_sluicegate, spawn_backend, redis_server):
    _, port = spawn_backend("app")
    daemon = start_sluicegate(
        _config(
            port,
            _limited("api", rate="1/m", burst=50, key="route"),
            redis=_redis(redis_server, instances=10),  # local fallback: burst 5
        )
    )
    assert _get(daemon, "/api")[1]["ratelimit-limit"] == "50"

    sleeper = threading.Thread(
        target=lambda: redis_server.client().execute_command("DEBUG", "SLEEP", "1.5")
    )
    sleeper.start()
    try:
        time.sleep(0.1)  # let the DEBUG SLEEP reach the server first
        # Requests in flight together all wait on Redis, each for one timeout at most ...
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(lambda _: _timed_get(daemon, "/api"), range(8)))
        # ... then the breaker is open and nobody waits at all.
        sequential = [_timed_get(daemon, "/api") for _ in range(8)]
    finally:
        sleeper.join()
    concurrent_ms = [round(seconds * 1000) for _, _, seconds in concurrent]
    sequential_ms = [round(seconds * 1000) for _, _, seconds in sequential]
    assert max(concurrent_ms + sequential_ms) < STALL_BOUND * 1000, (concurrent_ms, sequential_ms)
    assert max(sequential_ms) < REDIS_TIMEOUT * 1000, sequential_ms
    answers = concurrent + sequential
    assert [status for status, _, _ in answers].count(200) == 5  # the local burst
    assert {headers["ratelimit-limit"] for _, headers, _ in answers} == {"5"}
    assert _metric(daemon, "sluicegate_rate_limit_backend_errors_total") >= 1

    # Awake again: shared limiting resumes by itself.
    wait_for(
        lambda: _shared_limit_again(daemon, "/api", 50),
        timeout=10,
        message="shared rate limiting to resume",
    )
    # The abandoned calls left no stray replies on pooled connections: every answer now
    # continues one shared count. (Calls that timed out may still have taken a token when
    # Redis woke up, so the count itself is not known exactly.)
    remaining = [int(_get(daemon, "/api")[1]["ratelimit-remaining"]) for _ in range(5)]
    assert remaining == list(range(remaining[0], remaining[0] - 5, -1)), remaining
    assert remaining[-1] > 0


def test_redis_down_at_startup_then_up(start_sluicegate, spawn_backend, redis_server):
    _, port = spawn_backend("app")
    redis_server.stop()
    daemon = start_sluicegate(
        _config(
            port,
            _limited("api", rate="1/m", burst=4, key="route"),
            redis=_redis(redis_server, instances=2),
        )
    )
    timed = [_timed_get(daemon, "/api") for _ in range(4)]
    assert [status for status, _, _ in timed] == [200, 200, 429, 429]  # local: burst 2
    assert {headers["ratelimit-limit"] for _, headers, _ in timed} == {"2"}
    assert max(seconds for _, _, seconds in timed) < STALL_BOUND

    redis_server.start()
    wait_for(
        lambda: _shared_limit_again(daemon, "/api", 4),
        timeout=10,
        message="shared rate limiting to begin",
    )
    assert redis_server.client().keys("*") == ["sluicegate:rl:api:"]


def test_reload_that_adds_redis_switches_to_shared_buckets(
    start_sluicegate, spawn_backend, redis_server
):
    _, port = spawn_backend("app")
    config = _config(port, _limited("api", rate="1/m", burst=3, key="route"))
    a = start_sluicegate(config, name="a")
    b = start_sluicegate(config, name="b")
    # In memory: each daemon has a bucket of its own.
    assert _alternate([a, b], "/api", 10).count(200) == 6
    assert redis_server.client().keys("*") == []

    for daemon in (a, b):  # daemon.config: the config with the ports it was given
        daemon.write_config({**daemon.config, "redis": _redis(redis_server)})
        daemon.reload()
    for daemon in (a, b):
        wait_for(
            lambda daemon=daemon: (
                _metric(daemon, "sluicegate_config_reloads_total", result="success") == 1
            ),
            message="reload applied",
        )
    statuses = _alternate([a, b], "/api", 10)
    assert statuses.count(200) == 3, statuses
    assert redis_server.client().keys("*") == ["sluicegate:rl:api:"]


# -- every check goes to Redis ---------------------------------------------------------------------
# (What that costs in latency is measured by loadtests/redis_latency.py, not here.)


def test_every_limited_request_is_one_redis_script_call(
    start_sluicegate, spawn_backend, redis_server
):
    """Keep-alive requests interleaved on a limited and an unlimited route: each limited one
    is checked in Redis (one script call, no fallback), the unlimited ones never are."""
    _, port = spawn_backend("app")
    daemon = start_sluicegate(
        _config(
            port,
            _limited("api", rate="1000000/s", burst=1000000, key="route"),
            redis=_redis(redis_server, timeout="200ms"),
            logging={"access_log": False},
        )
    )
    n = 50
    limited_conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    free_conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)

    def get(conn: http.client.HTTPConnection, path: str) -> http.client.HTTPResponse:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response

    def script_calls() -> int:
        stats = redis_server.client().info("commandstats")
        return stats.get("cmdstat_evalsha", {}).get("calls", 0)

    try:
        assert get(limited_conn, "/api").status == 200  # the script is loaded by now
        before = script_calls()
        for _ in range(n):
            response = get(limited_conn, "/api")
            assert response.status == 200 and response.getheader("RateLimit-Limit") == "1000000"
            response = get(free_conn, "/free")
            assert response.status == 200 and response.getheader("RateLimit-Limit") is None
    finally:
        limited_conn.close()
        free_conn.close()
    assert script_calls() - before == n
    assert _metric(daemon, "sluicegate_rate_limit_backend_errors_total") == 0


def test_a_client_gone_while_redis_decides_is_not_forwarded(start_sluicegate, redis_server):
    """The limited request waits for Redis in a callback, not a task: when the answer
    comes and the client has reset the connection, nothing goes upstream (499 logged)."""
    with RawUpstream(simple_response(b"ok")) as upstream:
        port = int(upstream.url.rsplit(":", 1)[1])
        daemon = start_sluicegate(
            _config(
                port,
                _limited("api", rate="100/s", burst=100, key="route", on_redis_error="allow"),
                redis=_redis(redis_server),
            )
        )
        assert _get(daemon, "/api")[0] == 200
        assert len(upstream.requests) == 1
        sleeper = threading.Thread(
            target=lambda: redis_server.client().execute_command("DEBUG", "SLEEP", "0.5")
        )
        sleeper.start()
        try:
            time.sleep(0.1)  # let the DEBUG SLEEP reach the server first
            with socket.create_connection(("127.0.0.1", daemon.port)) as client:
                client.sendall(b"GET /api HTTP/1.1\r\nHost: h\r\n\r\n")
                time.sleep(0.01)
                # A reset, not a FIN: a half-closed client would still be answered.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            time.sleep(REDIS_TIMEOUT * 4)  # the check times out and decides (allow)
        finally:
            sleeper.join()
        assert _get(daemon, "/free")[0] == 200
        assert len(upstream.requests) == 2  # the first /api and /free: not the abandoned one
        wait_for(lambda: '"status":499' in daemon.logs(), message="a 499 access line")
