"""Token-bucket arithmetic with exact numbers: times and rates chosen to be exact floats."""

import math

import pytest

from proxy.ratelimit.bucket import Decision, take


def test_new_bucket_starts_full_and_takes_one():
    decision, left = take(tokens=5, updated_at=100.0, now=100.0, rate=1.0, burst=5)
    assert decision == Decision(allowed=True, limit=5, remaining=4, reset_after=1.0, retry_after=0)
    assert left == 4.0


def test_burst_then_denied_with_retry_after():
    tokens, now = 3.0, 0.0
    for expected_remaining in (2, 1, 0):
        decision, tokens = take(tokens, now, now, rate=2.0, burst=3)
        assert decision.allowed and decision.remaining == expected_remaining
    decision, tokens = take(tokens, now, now, rate=2.0, burst=3)
    assert not decision.allowed
    assert decision.remaining == 0
    assert decision.retry_after == 0.5  # one token at 2/s
    assert decision.reset_after == 1.5  # three tokens at 2/s
    assert tokens == 0.0  # a denial takes nothing


def test_refill_over_a_long_gap_is_capped_at_burst():
    decision, left = take(tokens=0.0, updated_at=0.0, now=1e6, rate=10.0, burst=7)
    assert decision.allowed
    assert left == 6.0
    assert decision.remaining == 6


def test_fractional_refill_is_kept_not_rounded():
    # 0.25 s at 2/s = 0.5 token: not enough, and the half token is kept.
    decision, left = take(tokens=0.0, updated_at=0.0, now=0.25, rate=2.0, burst=4)
    assert not decision.allowed
    assert left == 0.5
    assert decision.retry_after == 0.25
    assert decision.reset_after == 1.75
    # Another 0.25 s completes the token: allowed, nothing left over.
    decision, left = take(left, 0.25, 0.5, rate=2.0, burst=4)
    assert decision.allowed
    assert left == 0.0


def test_many_small_refills_do_not_drift():
    # 1000 steps of 1 ms at 1/s: the stored fractions add up to one token, to the ulp.
    tokens, now = 0.0, 0.0
    for _ in range(999):
        decision, tokens = take(tokens, now, now + 0.001, rate=1.0, burst=1, cost=1)
        now += 0.001
        assert not decision.allowed
    decision, tokens = take(tokens, now, now + 0.001, rate=1.0, burst=1)
    assert decision.allowed
    assert tokens == pytest.approx(0.0, abs=1e-9)


def test_cost_greater_than_one():
    decision, left = take(tokens=5.0, updated_at=0.0, now=0.0, rate=1.0, burst=5, cost=3)
    assert decision.allowed and decision.remaining == 2 and left == 2.0
    decision, left = take(left, 0.0, 0.0, rate=1.0, burst=5, cost=3)
    assert not decision.allowed
    assert decision.retry_after == 1.0  # needs 3, has 2
    assert left == 2.0


def test_cost_greater_than_burst_is_never_allowed():
    decision, left = take(tokens=5.0, updated_at=0.0, now=1e9, rate=1.0, burst=5, cost=6)
    assert not decision.allowed
    assert decision.retry_after == math.inf
    assert decision.remaining == 5
    assert decision.reset_after == 0.0
    assert left == 5.0


def test_clock_going_backwards_counts_as_no_time():
    decision, left = take(tokens=1.0, updated_at=10.0, now=4.0, rate=100.0, burst=5)
    assert decision.allowed
    assert left == 0.0


def test_tokens_above_a_lowered_burst_are_clamped():
    # After a reload lowers the burst, a stored bucket never holds more than the new one.
    decision, left = take(tokens=100.0, updated_at=0.0, now=0.0, rate=1.0, burst=10)
    assert decision.limit == 10 and left == 9.0


@pytest.mark.parametrize(("rate", "burst", "cost"), [(0.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0)])
def test_invalid_parameters_raise(rate, burst, cost):
    with pytest.raises(ValueError):
        take(1.0, 0.0, 0.0, rate=rate, burst=burst, cost=cost)
