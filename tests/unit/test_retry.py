"""Retry decision rules and the retry budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proxy.balancing.retry import (
    IDEMPOTENT_METHODS,
    FailureKind,
    NoRetry,
    RetryBudget,
    RetryPolicy,
    status_word,
)
from tests.support.clock import FakeClock

DEFAULT_ON = frozenset({"error", "timeout", "http_502", "http_503", "http_504"})


def policy(clock=None, **kwargs) -> RetryPolicy:
    kwargs = {"tries": 3, "timeout": 10.0, "on": DEFAULT_ON, **kwargs}
    return RetryPolicy(clock=clock or FakeClock(500.0), **kwargs)


def attempt(**overrides) -> dict:
    """Arguments of should_retry for a first failed GET that may be retried."""
    return {
        "attempts_done": 1,
        "started_at": 500.0,
        "method": "GET",
        "has_idempotency_key": False,
        "body_replayable": True,
        "response_started": False,
        **overrides,
    }


def test_failure_words():
    assert FailureKind.ERROR == "error"
    assert FailureKind.TIMEOUT.value == "timeout"
    assert str(FailureKind.INVALID_HEADER) == "invalid_header"
    assert status_word(502) == "http_502"
    assert {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"} == IDEMPOTENT_METHODS


def test_listed_failure_is_retried():
    rules = policy()
    assert rules.should_retry("error", **attempt()) is None
    assert rules.should_retry(FailureKind.TIMEOUT, **attempt()) is None
    assert rules.should_retry(status_word(503), **attempt()) is None


def test_unlisted_failure_is_not_retried():
    rules = policy()
    assert rules.should_retry("http_500", **attempt()) == "not_listed"
    assert rules.should_retry(FailureKind.INVALID_HEADER, **attempt()) is NoRetry.NOT_LISTED


def test_tries_count_the_first_attempt():
    rules = policy(tries=3)
    assert rules.should_retry("error", **attempt(attempts_done=2)) is None
    assert rules.should_retry("error", **attempt(attempts_done=3)) == "tries_exhausted"
    assert policy(tries=1).should_retry("error", **attempt()) == "tries_exhausted"


def test_deadline_covers_all_attempts():
    clock = FakeClock(500.0)
    rules = policy(clock, timeout=10.0)
    clock.now = 509.9
    assert rules.should_retry("timeout", **attempt(started_at=500.0)) is None
    assert rules.remaining(500.0) == pytest.approx(0.1)
    clock.now = 510.0
    assert rules.should_retry("timeout", **attempt(started_at=500.0)) == "deadline"
    assert rules.remaining(500.0) == 0.0


def test_no_deadline_when_timeout_is_none():
    clock = FakeClock(1e9)
    rules = policy(clock, timeout=None)
    assert rules.should_retry("error", **attempt(started_at=0.0)) is None
    assert rules.remaining(0.0) == float("inf")


@pytest.mark.parametrize("method", [*sorted(IDEMPOTENT_METHODS), "get"])
def test_idempotent_methods_may_be_retried(method):
    assert policy().may_retry_method(method, has_idempotency_key=False)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT"])
def test_non_idempotent_methods_are_not_retried_by_default(method):
    rules = policy()
    assert not rules.may_retry_method(method, has_idempotency_key=False)
    assert rules.should_retry("error", **attempt(method=method)) == "non_idempotent"
    # A key alone is not enough: retry.on must list idempotency_key.
    keyed = attempt(method=method, has_idempotency_key=True)
    assert rules.should_retry("error", **keyed) == "non_idempotent"


def test_non_idempotent_listed_allows_every_method():
    rules = policy(on=DEFAULT_ON | {"non_idempotent"})
    assert rules.should_retry("error", **attempt(method="POST")) is None


def test_idempotency_key_listed_allows_keyed_requests_only():
    rules = policy(on=DEFAULT_ON | {"idempotency_key"})
    assert rules.should_retry("error", **attempt(method="POST", has_idempotency_key=True)) is None
    assert rules.should_retry("error", **attempt(method="POST")) == "non_idempotent"


def test_unbuffered_body_cannot_be_replayed():
    assert policy().should_retry("error", **attempt(body_replayable=False)) == "body_not_buffered"


def test_nothing_is_retried_once_the_response_started():
    assert policy().should_retry("error", **attempt(response_started=True)) == "response_started"


def test_reasons_are_checked_in_documented_order():
    clock = FakeClock(600.0)  # past the deadline too
    everything_wrong = attempt(
        attempts_done=9,
        method="POST",
        body_replayable=False,
        response_started=True,
    )
    rules = policy(clock)
    assert rules.should_retry("http_500", **everything_wrong) == "not_listed"
    assert rules.should_retry("error", **everything_wrong) == "response_started"
    everything_wrong["response_started"] = False
    assert rules.should_retry("error", **everything_wrong) == "non_idempotent"
    everything_wrong["method"] = "GET"
    assert rules.should_retry("error", **everything_wrong) == "body_not_buffered"
    everything_wrong["body_replayable"] = True
    assert rules.should_retry("error", **everything_wrong) == "tries_exhausted"
    everything_wrong["attempts_done"] = 1
    assert rules.should_retry("error", **everything_wrong) == "deadline"


def test_from_config_and_budget():
    cfg = SimpleNamespace(tries=2, timeout=5.0, on=DEFAULT_ON, max_body_bytes=1024, budget=0.5)
    rules = RetryPolicy.from_config(cfg, clock=FakeClock(500.0))
    assert (rules.tries, rules.timeout, rules.max_body_bytes) == (2, 5.0, 1024)
    budget = rules.new_budget()
    assert budget.fraction == 0.5 and budget.min_concurrent == 3


def test_tries_below_one_rejected():
    with pytest.raises(ValueError):
        RetryPolicy(tries=0)


# -- budget --------------------------------------------------------------------------


def test_budget_allows_min_concurrent_retries_when_idle():
    budget = RetryBudget(0.2, min_concurrent=3)
    assert [budget.try_acquire_retry() for _ in range(4)] == [True, True, True, False]
    budget.release_retry()
    assert budget.try_acquire_retry()


def test_budget_scales_with_requests_in_flight():
    budget = RetryBudget(0.2, min_concurrent=3)
    for _ in range(50):
        budget.request_started()
    assert budget.limit() == 10
    assert sum(budget.try_acquire_retry() for _ in range(20)) == 10
    assert budget.retries_in_flight == 10
    for _ in range(30):
        budget.request_finished()  # 20 in flight: the limit drops to 4, no new retries
    assert not budget.try_acquire_retry()
    for _ in range(7):
        budget.release_retry()
    assert budget.retries_in_flight == 3
    assert budget.try_acquire_retry()
    assert not budget.try_acquire_retry()


def test_budget_counters_never_go_negative():
    budget = RetryBudget(0.2)
    budget.request_finished()
    budget.release_retry()
    assert (budget.requests_in_flight, budget.retries_in_flight) == (0, 0)
