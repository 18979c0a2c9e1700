"""Selection policies: exact sequences, weight shares, consistent-hash stability."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass

import pytest

from proxy.balancing.policies import (
    POLICIES,
    IpHash,
    LeastConn,
    PowerOfTwoChoices,
    RoundRobin,
    WeightedRandom,
)


@dataclass(eq=False)
class FakeServer:
    label: str
    weight: int = 1
    in_flight: int = 0
    latency: float = 0.0
    up: bool = True

    def __repr__(self) -> str:
        return self.label


def servers(*spec: tuple[str, int] | str) -> list[FakeServer]:
    return [FakeServer(s) if isinstance(s, str) else FakeServer(s[0], s[1]) for s in spec]


def is_up(server: FakeServer) -> bool:
    return server.up


def labels(policy, n: int, key: str | None = None) -> str:
    return " ".join(policy.select(is_up, key).label for _ in range(n))


def test_registry_names_every_policy():
    assert set(POLICIES) == {"round_robin", "least_conn", "ip_hash", "random", "p2c"}
    for name, cls in POLICIES.items():
        assert cls.name == name
        policy = cls(servers("a", "b"), rng=random.Random(1), hash_ring_points=10)
        assert policy.select(is_up) is not None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_server_or_none_eligible_gives_none(name):
    assert POLICIES[name]([], rng=random.Random(1)).select(is_up) is None
    pool = servers("a", "b")
    for s in pool:
        s.up = False
    assert POLICIES[name](pool, rng=random.Random(1)).select(is_up, "k") is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_only_eligible_servers_are_chosen(name):
    pool = servers(("a", 3), ("b", 1), ("c", 2))
    pool[0].up = False
    policy = POLICIES[name](pool, rng=random.Random(7))
    chosen = {policy.select(is_up, f"key{i}").label for i in range(300)}
    assert chosen == {"b", "c"}


def test_weight_below_one_is_rejected():
    with pytest.raises(ValueError, match="weight"):
        RoundRobin(servers(("a", 0)))


# -- round robin ---------------------------------------------------------------------


def test_round_robin_nginx_smooth_sequence():
    policy = RoundRobin(servers(("a", 5), ("b", 1), ("c", 1)))
    assert labels(policy, 14) == "a a b a c a a a a b a c a a"


def test_round_robin_equal_weights_rotates():
    policy = RoundRobin(servers("a", "b", "c"))
    assert labels(policy, 6) == "a b c a b c"


def test_round_robin_skips_ineligible_and_resumes():
    pool = servers(("a", 5), ("b", 1), ("c", 1))
    policy = RoundRobin(pool)
    assert labels(policy, 3) == "a a b"
    # Running weights now a=1 b=-4 c=3. a leaves: only b and c take part, and b first
    # pays back the debt of its last pick, as in nginx.
    pool[0].up = False
    assert labels(policy, 4) == "c c c c"
    pool[0].up = True  # a returns with the running weight it had (1), not reset
    assert labels(policy, 7) == "a a b a a c a"


def test_round_robin_equal_weights_one_leaves_and_returns():
    pool = servers("a", "b", "c")
    policy = RoundRobin(pool)
    assert labels(policy, 3) == "a b c"
    pool[1].up = False
    assert labels(policy, 4) == "a c a c"
    pool[1].up = True
    assert labels(policy, 6) == "a b c a b c"


def test_round_robin_weights_2_1():
    assert labels(RoundRobin(servers(("a", 2), ("b", 1))), 6) == "a b a a b a"


# -- least conn ----------------------------------------------------------------------


def test_least_conn_picks_lowest_load_per_weight():
    pool = servers(("a", 1), ("b", 2), ("c", 1))
    pool[0].in_flight = 2  # 2.0 per weight
    pool[1].in_flight = 3  # 1.5 per weight
    pool[2].in_flight = 2  # 2.0 per weight
    assert LeastConn(pool).select(is_up) is pool[1]


def test_least_conn_ties_rotate_instead_of_first():
    policy = LeastConn(servers("a", "b", "c"))
    assert labels(policy, 6) == "a b c a b c"


def test_least_conn_ties_rotate_among_tied_only():
    pool = servers("a", "b", "c")
    pool[1].in_flight = 5
    assert labels(LeastConn(pool), 4) == "a c a c"


def test_least_conn_idle_ties_follow_weights():
    policy = LeastConn(servers(("a", 5), ("b", 1), ("c", 1)))
    assert labels(policy, 7) == "a a b a c a a"


def test_least_conn_follows_changing_load():
    pool = servers("a", "b")
    policy = LeastConn(pool)
    first = policy.select(is_up)
    first.in_flight += 1
    second = policy.select(is_up)
    assert second is not first
    second.in_flight += 1
    first.in_flight -= 1
    assert policy.select(is_up) is first


# -- ip hash -------------------------------------------------------------------------


def test_ip_hash_same_key_same_server():
    policy = IpHash(servers("a", "b", "c"))
    for i in range(100):
        key = f"10.0.0.{i}"
        assert len({policy.select(is_up, key).label for _ in range(5)}) == 1


def test_ip_hash_is_stable_across_instances_and_order_of_construction():
    # Stable hash (not Python's salted hash()): another worker maps keys identically.
    one = IpHash(servers("a", "b", "c"))
    two = IpHash(list(reversed(servers("a", "b", "c"))))
    for i in range(200):
        assert one.select(is_up, f"k{i}").label == two.select(is_up, f"k{i}").label


def test_ip_hash_none_key_is_empty_string():
    policy = IpHash(servers("a", "b", "c"))
    assert policy.select(is_up, None) is policy.select(is_up, "")


def test_ip_hash_only_keys_of_removed_server_move():
    pool = servers("a", "b", "c", "d", "e")
    policy = IpHash(pool)
    keys = [f"192.168.{i // 256}.{i % 256}" for i in range(10_000)]
    before = {key: policy.select(is_up, key) for key in keys}
    removed = pool[2]
    removed.up = False
    after = {key: policy.select(is_up, key) for key in keys}
    moved = [key for key in keys if before[key] is not after[key]]
    assert all(before[key] is removed for key in moved)
    assert all(after[key] is not removed for key in keys)
    assert {key for key in keys if before[key] is removed} == set(moved)
    assert 0.12 < len(moved) / len(keys) < 0.28  # about 1/N = 0.2
    removed.up = True  # coming back restores the original mapping exactly
    assert all(policy.select(is_up, key) is before[key] for key in keys)


def test_ip_hash_shares_follow_weights():
    pool = servers(("a", 1), ("b", 2), ("c", 3))
    policy = IpHash(pool)
    counts = collections.Counter(policy.select(is_up, f"client-{i}").label for i in range(10_000))
    for label, weight in (("a", 1), ("b", 2), ("c", 3)):
        assert counts[label] / 10_000 == pytest.approx(weight / 6, abs=0.05)


def test_ip_hash_walks_past_many_ineligible_servers():
    pool = servers(*[f"s{i}" for i in range(20)])
    policy = IpHash(pool, hash_ring_points=4)
    for s in pool[:-1]:
        s.up = False
    assert all(policy.select(is_up, f"k{i}") is pool[-1] for i in range(50))


# -- random and p2c ------------------------------------------------------------------


def test_random_is_weighted_and_reproducible():
    pool = servers(("a", 1), ("b", 3))
    policy = WeightedRandom(pool, rng=random.Random(42))
    picks = [policy.select(is_up).label for _ in range(8000)]
    assert picks.count("b") / len(picks) == pytest.approx(0.75, abs=0.03)
    again = WeightedRandom(pool, rng=random.Random(42))
    assert [again.select(is_up).label for _ in range(8000)] == picks


def test_random_shares_stay_weighted_among_eligible():
    pool = servers(("a", 6), ("b", 1), ("c", 3))
    pool[0].up = False
    policy = WeightedRandom(pool, rng=random.Random(3))
    counts = collections.Counter(policy.select(is_up).label for _ in range(8000))
    assert counts["a"] == 0
    assert counts["c"] / 8000 == pytest.approx(0.75, abs=0.03)


class ScriptedRandom(random.Random):
    """An rng whose random() returns the given values, for exact p2c picks."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_p2c_less_loaded_of_two_wins():
    pool = servers("a", "b", "c")
    pool[0].in_flight = 4
    pool[2].in_flight = 1
    # draws: 0.1 -> a, then 0.9 -> c; c has fewer in flight
    policy = PowerOfTwoChoices(pool, rng=ScriptedRandom(0.1, 0.9))
    assert policy.select(is_up) is pool[2]


def test_p2c_load_is_per_weight():
    pool = servers(("a", 4), ("b", 1))
    pool[0].in_flight = 3  # 0.75 per weight
    pool[1].in_flight = 1  # 1.0 per weight
    policy = PowerOfTwoChoices(pool, rng=ScriptedRandom(0.95, 0.1))  # b first, then a
    assert policy.select(is_up) is pool[0]


def test_p2c_tie_goes_to_lower_latency_then_first_draw():
    pool = servers("a", "b")
    pool[0].latency = 0.050
    pool[1].latency = 0.010
    policy = PowerOfTwoChoices(pool, rng=ScriptedRandom(0.1, 0.9))  # a, then b
    assert policy.select(is_up) is pool[1]
    pool[1].latency = 0.050
    policy = PowerOfTwoChoices(pool, rng=ScriptedRandom(0.9, 0.1))  # b, then a: all equal
    assert policy.select(is_up) is pool[1]


def test_p2c_two_draws_are_distinct():
    pool = servers("a", "b")
    pool[0].in_flight = 10
    # The first draw is a; the second draw would hit a again, so it must be redrawn among
    # the remaining servers: b wins on load. 100 times, never a.
    policy = PowerOfTwoChoices(pool, rng=random.Random(5))
    assert {policy.select(is_up).label for _ in range(100)} == {"b"}


def test_p2c_single_eligible_server():
    pool = servers("a", "b")
    pool[1].up = False
    policy = PowerOfTwoChoices(pool, rng=random.Random(1))
    assert {policy.select(is_up).label for _ in range(20)} == {"a"}


def test_p2c_avoids_a_loaded_server():
    pool = servers("a", "b", "c", "d")
    pool[0].in_flight = 100
    policy = PowerOfTwoChoices(pool, rng=random.Random(11))
    counts = collections.Counter(policy.select(is_up).label for _ in range(4000))
    # The two draws are distinct servers, and a is more loaded than any other: never a.
    assert counts["a"] == 0
