"""Slow start: the ramp itself, and its effect in every policy, on an injected clock."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass

import pytest

from proxy.balancing.policies import POLICIES
from proxy.balancing.slowstart import SlowStart, ramped_weight
from tests.support.clock import FakeClock

RAMP = 10.0


@dataclass(eq=False)
class FakeServer:
    label: str
    weight: int = 1
    in_flight: int = 0
    latency: float = 0.0
    ramp_started: float = 0.0
    ramp_ends: float = 0.0
    up: bool = True

    def effective_weight(self, now: float) -> float:
        if now >= self.ramp_ends:
            return self.weight
        return ramped_weight(self.weight, self.ramp_started, self.ramp_ends, now)

    def __repr__(self) -> str:
        return self.label


def is_up(server: FakeServer) -> bool:
    return server.up


class CountingClock(FakeClock):
    reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_ramp_is_linear_from_ten_percent_to_full():
    assert ramped_weight(4, 100.0, 110.0, 100.0) == pytest.approx(0.4)
    assert ramped_weight(4, 100.0, 110.0, 105.0) == pytest.approx(4 * 0.55)
    assert ramped_weight(4, 100.0, 110.0, 109.0) == pytest.approx(4 * 0.91)
    assert ramped_weight(4, 100.0, 110.0, 110.0) == 4


def test_no_ramp_reads_no_clock_and_a_ramp_ends_by_itself():
    clock = CountingClock()
    slow = SlowStart(RAMP, clock=clock)
    for _ in range(100):
        assert slow.ramping() is None
    assert clock.reads == 0
    server = FakeServer("c")
    slow.begin(server)
    assert (server.ramp_started, server.ramp_ends) == (clock.now, clock.now + RAMP)
    assert slow.ramping() == clock.now
    clock.advance(RAMP)
    assert slow.ramping() is None
    reads = clock.reads
    assert slow.ramping() is None
    assert clock.reads == reads  # over: back to no clock at all


def test_slow_start_off_starts_no_ramp():
    clock = CountingClock()
    slow = SlowStart(0.0, clock=clock)
    server = FakeServer("c")
    slow.begin(server)
    assert server.ramp_ends == 0.0
    assert slow.ramping() is None
    assert clock.reads == 0


def build(name: str, clock: FakeClock, *, hash_ring_points: int = 40):
    """Two servers at full weight and `c`, which joined at `clock.now`."""
    slow = SlowStart(RAMP, clock=clock)
    pool = [FakeServer("a"), FakeServer("b"), FakeServer("c")]
    slow.begin(pool[2])
    policy = POLICIES[name](
        pool, rng=random.Random(7), slow_start=slow, hash_ring_points=hash_ring_points
    )
    return policy, pool


def share_of_c(policy, picks: int, *, keys: bool = False) -> float:
    counts: collections.Counter[str] = collections.Counter()
    for i in range(picks):
        counts[policy.select(is_up, f"client-{i}" if keys else None).label] += 1
    return counts["c"] / picks


# c's expected share at a ramp fraction f, with a and b at weight 1: f / (2 + f).
def expected_share(fraction: float) -> float:
    return fraction / (2 + fraction)


@pytest.mark.parametrize("name", ["round_robin", "least_conn", "random", "p2c"])
def test_a_joining_server_ramps_in_every_weighted_policy(name):
    clock = FakeClock()
    policy, _ = build(name, clock)
    picks = 3000 if name in ("random", "p2c") else 2100
    tolerance = 0.03 if name in ("random", "p2c") else 0.005
    shares = []
    for elapsed, fraction in ((0.0, 0.1), (5.0, 0.55), (RAMP, 1.0)):
        clock.now = 1000.0 + elapsed
        share = share_of_c(policy, picks)
        shares.append(share)
        # p2c: idle servers tie and the tie goes to the first draw, so its share follows
        # the weights as random's does.
        assert share == pytest.approx(expected_share(fraction), abs=tolerance), (elapsed, shares)
    assert shares[0] < shares[1] < shares[2]


def test_round_robin_is_exact_while_ramping():
    clock = FakeClock()
    policy, _ = build("round_robin", clock)
    # Weights 1, 1, 0.1: c comes once in 21 picks, smoothly spread.
    sequence = [policy.select(is_up).label for _ in range(21)]
    assert sequence.count("c") == 1
    assert sequence.count("a") == sequence.count("b") == 10


def test_least_conn_divides_in_flight_by_the_ramped_weight():
    clock = FakeClock()
    policy, (a, b, c) = build("least_conn", clock)
    a.in_flight = b.in_flight = 2
    c.in_flight = 1
    # At 10% weight one request on c counts as ten: a or b win.
    assert {policy.select(is_up).label for _ in range(10)} == {"a", "b"}
    clock.advance(RAMP)  # ramp over: c carries the least load
    assert policy.select(is_up).label == "c"


def test_p2c_compares_load_by_ramped_weight():
    clock = FakeClock()
    policy, (a, b, c) = build("p2c", clock)
    a.in_flight = b.in_flight = 2
    c.in_flight = 1
    assert "c" not in {policy.select(is_up).label for _ in range(200)}
    clock.advance(RAMP)
    assert "c" in {policy.select(is_up).label for _ in range(200)}


def test_ip_hash_ramp_moves_keys_only_to_the_joining_server_and_each_once():
    clock = FakeClock()
    policy, pool = build("ip_hash", clock, hash_ring_points=160)
    keys = [f"10.0.{i // 250}.{i % 250}" for i in range(3000)]
    settled = POLICIES["ip_hash"](pool, hash_ring_points=160)  # no ramp: the final map
    final = {key: settled.select(is_up, key).label for key in keys}
    before_c = POLICIES["ip_hash"](pool[:2], hash_ring_points=160)  # the map before c joined
    old = {key: before_c.select(is_up, key).label for key in keys}
    on_c_before: set[str] = set()
    shares = []
    for elapsed in (0.0, 2.5, 5.0, 7.5, RAMP):
        clock.now = 1000.0 + elapsed
        placed = {key: policy.select(is_up, key).label for key in keys}
        on_c = {key for key, label in placed.items() if label == "c"}
        assert on_c_before <= on_c  # a key that moved to c stays there
        for key, label in placed.items():
            # Only c's final keys move, from their old server to c; nothing else does.
            assert label == final[key] if final[key] != "c" else label in ("c", old[key])
        on_c_before = on_c
        shares.append(len(on_c) / len(keys))
    final_share = sum(1 for label in final.values() if label == "c") / len(keys)
    assert shares[-1] == final_share
    # c's share of its own final keys follows the ramp fraction 10% -> 100%.
    for share, fraction in zip(shares, (0.1, 0.325, 0.55, 0.775, 1.0), strict=True):
        assert share / final_share == pytest.approx(fraction, abs=0.05), shares


def test_ip_hash_a_key_still_lands_when_only_ramping_servers_are_eligible():
    clock = FakeClock()
    policy, (a, b, c) = build("ip_hash", clock)
    a.up = b.up = False
    assert all(policy.select(is_up, f"k{i}") is c for i in range(50))
