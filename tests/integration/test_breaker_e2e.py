"""Per-server circuit breakers through the real daemon: open, half-open trial, close, reopen.

Retries are off (``tries: 1``) unless a test says otherwise, so each client request is one
attempt and the hit counts show exactly which server the breaker let traffic reach.
Servers are picked round robin: with two servers a fresh daemon alternates a, b, a, ...
"""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.support.daemon import wait_for
from tests.support.faulty import (
    hits,
    lb_config,
    metric_value,
    server_status,
    timed_request,
)

BREAKER = {"failure_threshold": 2, "open_duration": "1s"}
NO_RETRY = {"tries": 1}


def breaker_metric(daemon, server) -> float | None:
    return metric_value(
        daemon.metrics(), "sluicegate_circuit_breaker_state", upstream="app", server=server.address
    )


def transitions(daemon, server, to: str) -> float:
    value = metric_value(
        daemon.metrics(),
        "sluicegate_circuit_breaker_transitions_total",
        upstream="app",
        server=server.address,
        to=to,
    )
    return value or 0.0


def open_breaker_of_first(daemon, bad, good) -> None:
    """a, b, a: the second failure on `bad` opens its breaker."""
    statuses = [timed_request(daemon)[0] for _ in range(3)]
    assert statuses == [503, 200, 503]
    assert hits(bad, good) == [2, 1]
    assert server_status(daemon, 0)["breaker"] == "open"


def wait_half_open(daemon, index: int = 0) -> None:
    wait_for(
        lambda: server_status(daemon, index)["breaker"] == "half_open",
        timeout=3,
        interval=0.1,
        message="breaker half_open",
    )


def test_consecutive_failures_open_the_breaker(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "status", status=503), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], breaker=BREAKER, retry=NO_RETRY))

    open_breaker_of_first(daemon, bad, good)

    status = daemon.status()["upstreams"]["app"]["servers"]
    assert [s["breaker"] for s in status] == ["open", "closed"]
    assert status[0]["failures"] == 2
    assert breaker_metric(daemon, bad) == 2
    assert breaker_metric(daemon, good) == 0
    assert transitions(daemon, bad, "open") == 1
    # An open breaker takes the server out: everything goes to the other one.
    answers = [timed_request(daemon)[2] for _ in range(6)]
    assert answers == [b"good\n"] * 6
    assert hits(bad, good) == [2, 7]
    events = [line for line in daemon.log_lines() if line.get("event") == "breaker"]
    assert events and events[0]["server"] == bad.address and events[0]["upstream"] == "app"
    assert "consecutive failures" in events[0]["message"]


def test_open_breaker_on_the_only_server_gives_503_without_traffic(start_sluicegate, fault_server):
    bad = fault_server("bad", "reset")
    daemon = start_sluicegate(lb_config([bad], breaker=BREAKER, retry=NO_RETRY))

    assert [timed_request(daemon)[0] for _ in range(2)] == [502, 502]
    assert server_status(daemon, 0)["breaker"] == "open"
    status, _, body, seconds = timed_request(daemon)

    assert status == 503
    assert b"no eligible server" in body
    assert seconds < 0.5
    assert hits(bad) == [2]


def test_half_open_trial_success_closes(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "status", status=503), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], breaker=BREAKER, retry=NO_RETRY))
    open_breaker_of_first(daemon, bad, good)

    wait_half_open(daemon)
    assert breaker_metric(daemon, bad) == 1
    bad.mode = "ok"  # recovered
    for _ in range(3):
        timed_request(daemon)
        if bad.requests == 3:
            break

    assert bad.requests == 3  # exactly one trial
    assert server_status(daemon, 0)["breaker"] == "closed"
    assert breaker_metric(daemon, bad) == 0
    assert transitions(daemon, bad, "closed") == 1
    # Closed again: back in the rotation.
    before = bad.requests
    answers = [timed_request(daemon)[2] for _ in range(4)]
    assert answers.count(b"bad\n") == 2
    assert bad.requests == before + 2


def test_half_open_trial_failure_reopens(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "status", status=503), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], breaker=BREAKER, retry=NO_RETRY))
    open_breaker_of_first(daemon, bad, good)

    wait_half_open(daemon)
    statuses = []
    for _ in range(3):
        statuses.append(timed_request(daemon)[0])
        if bad.requests == 3:
            break

    assert bad.requests == 3
    assert statuses[-1] == 503  # the failed trial's answer
    assert server_status(daemon, 0)["breaker"] == "open"
    assert breaker_metric(daemon, bad) == 2
    assert transitions(daemon, bad, "open") == 2
    answers = [timed_request(daemon)[2] for _ in range(4)]
    assert answers == [b"good\n"] * 4
    assert bad.requests == 3


def test_half_open_admits_one_trial_at_a_time(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "status", status=503), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], breaker=BREAKER, retry=NO_RETRY, read="2s"))
    open_breaker_of_first(daemon, bad, good)
    wait_half_open(daemon)
    bad.mode, bad.delay = "slow", 0.5  # the trial is slow: others arrive while it runs

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: timed_request(daemon)[0], range(8)))

    assert results == [200] * 8
    assert bad.requests == 3  # two failures, then one trial
    assert good.requests == 1 + 7
    assert server_status(daemon, 0)["breaker"] == "closed"


@pytest.mark.parametrize(
    ("failure_on", "opens"),
    [(["error", "timeout"], False), (["error", "timeout", "http_500"], True)],
    ids=["500-not-listed", "500-listed"],
)
def test_failure_on_decides_what_counts(start_sluicegate, fault_server, failure_on, opens):
    bad, good = fault_server("bad", "status", status=500), fault_server("good")
    config = lb_config([bad, good], breaker=BREAKER, retry=NO_RETRY, failure_on=failure_on)
    daemon = start_sluicegate(config)

    statuses = [timed_request(daemon)[0] for _ in range(8)]

    if opens:
        assert statuses == [500, 200, 500] + [200] * 5
        assert hits(bad, good) == [2, 6]
        assert server_status(daemon, 0)["breaker"] == "open"
    else:
        assert statuses == [500, 200] * 4
        assert hits(bad, good) == [4, 4]
        assert server_status(daemon, 0)["breaker"] == "closed"
        assert server_status(daemon, 0)["failures"] == 0


def test_retried_attempts_count_against_the_breaker(start_sluicegate, fault_server):
    bad = fault_server("bad", "reset")
    good = fault_server("good")
    # `good` as a backup: every request tries `bad` first while its breaker lets it.
    config = lb_config([bad, {"url": good.url, "backup": True}], breaker=BREAKER)
    daemon = start_sluicegate(config)

    statuses = [timed_request(daemon)[0] for _ in range(5)]

    assert statuses == [200] * 5  # the clients never notice
    assert hits(bad, good) == [2, 5]
    assert server_status(daemon, 0)["breaker"] == "open"


@pytest.mark.parametrize(
    ("breaker", "opens_at"),
    [
        ({"failure_rate": 0.5, "min_requests": 5, "window": "10s", "open_duration": "5s"}, 5),
        ({"failure_threshold": 2, "open_duration": "5s"}, None),
    ],
    ids=["ratio", "consecutive"],
)
def test_ratio_mode(start_sluicegate, fault_server, breaker, opens_at):
    # fail, ok, fail, ok, fail: never 2 failures in a row, but 3/5 = 60% failed.
    server = fault_server("flaky", "status", status=503)
    daemon = start_sluicegate(lb_config([server], breaker=breaker, retry=NO_RETRY))

    for n in range(1, 6):
        server.mode = "status" if n % 2 else "ok"
        status = timed_request(daemon)[0]
        assert status == (503 if n % 2 else 200)
        expected = "open" if opens_at is not None and n >= opens_at else "closed"
        assert server_status(daemon, 0)["breaker"] == expected, n

    server.mode = "ok"
    status, _, body, _ = timed_request(daemon)
    if opens_at is not None:
        assert status == 503 and b"no eligible server" in body
        assert hits(server) == [5]  # refused by the proxy: no traffic
        event = next(line for line in daemon.log_lines() if line.get("event") == "breaker")
        assert "failure rate 3/5" in event["message"]
    else:
        assert status == 200 and hits(server) == [6]
