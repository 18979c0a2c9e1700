"""Circuit breaker state machine, driven by a fake clock: no sleeps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proxy.balancing.breaker import BreakerState, CircuitBreaker, IllegalTransition
from tests.support.clock import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def transitions() -> list[tuple[str, str, str]]:
    return []


def make(clock, transitions, **kwargs) -> CircuitBreaker:
    def record(old, new, reason):
        transitions.append((old.value, new.value, reason))

    kwargs.setdefault("failure_threshold", 3)
    kwargs.setdefault("open_duration", 30.0)
    return CircuitBreaker(clock=clock, on_transition=record, **kwargs)


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.acquire()
        breaker.record_failure()


def test_gauge_values():
    assert [s.gauge_value for s in (CLOSED, HALF_OPEN, OPEN)] == [0, 1, 2]


def test_starts_closed_and_allows(clock, transitions):
    breaker = make(clock, transitions)
    assert breaker.state is CLOSED
    assert breaker.allows() and breaker.acquire()
    assert transitions == []


def test_opens_after_consecutive_failures(clock, transitions):
    breaker = make(clock, transitions)
    fail(breaker, 2)
    assert breaker.state is CLOSED and breaker.consecutive_failures == 2
    fail(breaker, 1)
    assert breaker.state is OPEN
    assert not breaker.allows()
    assert not breaker.acquire()
    assert transitions == [("closed", "open", "3 consecutive failures")]


def test_success_resets_consecutive_count(clock, transitions):
    breaker = make(clock, transitions)
    fail(breaker, 2)
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    fail(breaker, 2)
    assert breaker.state is CLOSED


def test_open_becomes_half_open_lazily_after_open_duration(clock, transitions):
    breaker = make(clock, transitions)
    fail(breaker, 3)
    clock.advance(29.999)
    assert breaker.state is OPEN and not breaker.allows()
    clock.advance(0.001)
    assert breaker.allows()
    assert breaker.state is HALF_OPEN
    assert transitions[-1] == ("open", "half_open", "open_duration elapsed")


def test_half_open_trial_success_closes(clock, transitions):
    breaker = make(clock, transitions)
    fail(breaker, 3)
    clock.advance(30)
    assert breaker.acquire()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.consecutive_failures == 0
    assert [(old, new) for old, new, _ in transitions] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    fail(breaker, 2)  # counting starts afresh after closing
    assert breaker.state is CLOSED


def test_half_open_trial_failure_reopens_for_a_fresh_duration(clock, transitions):
    breaker = make(clock, transitions)
    fail(breaker, 3)
    clock.advance(45)  # well past open_duration: the new one counts from the reopen
    assert breaker.acquire()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert transitions[-1] == ("half_open", "open", "trial request failed")
    clock.advance(29)
    assert breaker.state is OPEN
    clock.advance(1)
    assert breaker.state is HALF_OPEN


def test_half_open_limits_concurrent_trials(clock, transitions):
    breaker = make(clock, transitions, half_open_requests=2)
    fail(breaker, 3)
    clock.advance(30)
    assert breaker.allows()
    assert breaker.acquire()
    assert breaker.allows()
    assert breaker.acquire()
    assert breaker.trials_in_flight == 2
    assert not breaker.allows()
    assert not breaker.acquire()
    breaker.release()  # a trial ended without a verdict: its slot is free again
    assert breaker.state is HALF_OPEN
    assert breaker.allows() and breaker.acquire()
    assert not breaker.acquire()


def test_allows_is_a_pure_query(clock, transitions):
    breaker = make(clock, transitions, half_open_requests=1)
    fail(breaker, 3)
    clock.advance(30)
    for _ in range(5):
        assert breaker.allows()
    assert breaker.trials_in_flight == 0


def test_release_outside_half_open_changes_nothing(clock, transitions):
    breaker = make(clock, transitions)
    breaker.release()
    assert breaker.state is CLOSED
    fail(breaker, 3)
    breaker.release()
    assert breaker.state is OPEN


def test_late_outcomes_while_open_are_ignored(clock, transitions):
    breaker = make(clock, transitions)
    fail(breaker, 3)
    clock.advance(20)
    breaker.record_failure()  # answer to a request sent before it opened
    breaker.record_success()
    clock.advance(10)  # open_duration still counts from the original trip
    assert breaker.state is HALF_OPEN
    assert len(transitions) == 2


def test_illegal_transition_raises_and_names_states(clock, transitions):
    breaker = make(clock, transitions)
    with pytest.raises(IllegalTransition, match="closed -> half_open") as info:
        breaker._transition(HALF_OPEN, "test")
    assert info.value.from_state is CLOSED and info.value.to_state is HALF_OPEN
    fail(breaker, 3)
    with pytest.raises(IllegalTransition, match="open -> closed"):
        breaker._transition(CLOSED, "test")
    assert breaker.state is OPEN
    assert transitions == [("closed", "open", "3 consecutive failures")]


# -- ratio mode ----------------------------------------------------------------------


def ratio(clock, transitions, **kwargs) -> CircuitBreaker:
    kwargs = {"failure_rate": 0.5, "min_requests": 10, "window": 10.0, **kwargs}
    return make(clock, transitions, **kwargs)


def test_ratio_mode_needs_min_requests(clock, transitions):
    breaker = ratio(clock, transitions)
    fail(breaker, 9)  # 100 % failures but only 9 outcomes: the sample is too small
    assert breaker.state is CLOSED
    fail(breaker, 1)
    assert breaker.state is OPEN
    assert transitions == [("closed", "open", "failure rate 10/10 >= 0.5 over 10s")]


def test_ratio_mode_ignores_consecutive_threshold(clock, transitions):
    breaker = ratio(clock, transitions, failure_threshold=1)
    fail(breaker, 5)
    assert breaker.state is CLOSED


def test_ratio_mode_opens_at_the_rate(clock, transitions):
    breaker = ratio(clock, transitions)
    for _ in range(6):
        breaker.record_success()
    fail(breaker, 5)  # 5/11 < 0.5
    assert breaker.state is CLOSED
    fail(breaker, 1)  # 6/12 >= 0.5
    assert breaker.state is OPEN


def test_ratio_mode_forgets_outcomes_outside_the_window(clock, transitions):
    breaker = ratio(clock, transitions)
    fail(breaker, 9)
    clock.advance(10.0)  # those 9 failures have left the window
    fail(breaker, 9)
    assert breaker.state is CLOSED
    clock.advance(5.0)  # the second 9 are still inside
    fail(breaker, 1)
    assert breaker.state is OPEN


def test_ratio_mode_success_heavy_window_stays_closed(clock, transitions):
    breaker = ratio(clock, transitions)
    for second in range(100):
        clock.now = 1000.0 + second * 0.5
        if second % 3 == 0:
            fail(breaker, 1)
        else:
            breaker.record_success()
    assert breaker.state is CLOSED


def test_ratio_mode_starts_fresh_after_closing(clock, transitions):
    breaker = ratio(clock, transitions)
    fail(breaker, 10)
    clock.advance(30)
    assert breaker.acquire()
    breaker.record_success()
    assert breaker.state is CLOSED
    fail(breaker, 9)  # the 10 old failures were cleared on close
    assert breaker.state is CLOSED


def test_from_config_reads_attribute_names(clock):
    cfg = SimpleNamespace(
        failure_threshold=2,
        open_duration=5.0,
        half_open_requests=3,
        failure_rate=None,
        min_requests=20,
        window=10.0,
    )
    breaker = CircuitBreaker.from_config(cfg, clock=clock)
    assert (breaker.failure_threshold, breaker.open_duration, breaker.half_open_requests) == (
        2,
        5.0,
        3,
    )
    fail(breaker, 2)
    assert breaker.state is OPEN


def breaker_cfg(**overrides) -> SimpleNamespace:
    values = {
        "failure_threshold": 3,
        "open_duration": 30.0,
        "half_open_requests": 1,
        "failure_rate": None,
        "min_requests": 20,
        "window": 10.0,
    }
    return SimpleNamespace(**{**values, **overrides})


def test_reconfigure_keeps_state_and_applies_new_settings(clock, transitions):
    breaker = make(clock, transitions)
    fail(breaker, 3)
    breaker.reconfigure(breaker_cfg(open_duration=5.0, failure_threshold=1))
    assert breaker.state is OPEN  # still open after a reload
    clock.advance(5)  # the new open_duration applies to the current open period
    assert breaker.state is HALF_OPEN
    breaker.record_success()
    fail(breaker, 1)  # the new threshold
    assert breaker.state is OPEN


def test_reconfigure_switches_to_ratio_mode(clock, transitions):
    breaker = make(clock, transitions)
    breaker.reconfigure(breaker_cfg(failure_rate=0.5, min_requests=4))
    fail(breaker, 3)  # 3 consecutive would have tripped the old mode
    assert breaker.state is CLOSED
    fail(breaker, 1)
    assert breaker.state is OPEN


def test_reconfigure_rejects_invalid_settings(clock, transitions):
    breaker = make(clock, transitions)
    with pytest.raises(ValueError):
        breaker.reconfigure(breaker_cfg(failure_threshold=0))
    assert breaker.failure_threshold == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"half_open_requests": 0},
        {"failure_rate": 0.0},
        {"failure_rate": 1.5},
        {"window": 0},
    ],
)
def test_invalid_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)
