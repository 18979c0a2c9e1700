# cython: annotation_typing=False
"""Server selection policies: pure objects, no I/O, registered by name in `POLICIES`.

A policy is built once per tier (primaries, backups) when a config generation is loaded,
from the tier's servers in config order; a reload builds new policies and swaps them in.
`select(is_eligible, key=None)` returns one server for which `is_eligible(server)` holds,
or None when there is none. Eligibility (health, breaker, draining) is the caller's
callback, so a policy never needs rebuilding when a server goes up or down.

Invariants every policy keeps:
- it reads only `weight` (fixed at construction), `in_flight` and `latency` (read per call),
  and `effective_weight(now)` while a slow-start ramp runs (see below);
- weights apply to every policy; a server of weight w gets about w shares of the traffic;
- randomness comes from the injected `rng`, so tests get exact picks;
- `select` allocates nothing on the hot path beyond what the algorithm needs.

Slow start (``proxy.balancing.slowstart``): a policy built with ``slow_start`` asks it once per call
whether a ramp runs; one built without (its upstream has no slow start) tests one
attribute and makes no call. When none does (nearly always) the integer weights fixed at
construction are used, with no clock read and no float arithmetic. While one runs, the
call uses every candidate's ``effective_weight(now)`` instead: round_robin and random
draw by it, least_conn and p2c divide in-flight requests by it. ip_hash keeps its ring
(moving ring points would move other servers' keys): a ramping server accepts a key that
lands on it only when the key's hash, read as a fraction, is below its ramp fraction, and
passes the others on clockwise. So its share grows with the ramp, and a key moves at most
once (to the ramping server, for good) as the fraction rises.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar


class Selectable(Protocol):
    """What a policy reads of a server (`proxy.balancing.servers.Server` has it all)."""

    weight: int
    in_flight: int
    latency: float  # EWMA of seconds to response head

    def effective_weight(self, now: float) -> float: ...  # read only while a ramp runs


S = TypeVar("S", bound=Selectable)

#: Ring points per unit of weight for ip_hash (nginx's `hash ... consistent` uses 160).
DEFAULT_HASH_RING_POINTS = 160


def _server_identity(server: object) -> str:
    """A stable name for hashing: `label` (host:port) if present, else `url`, else str()."""
    for attribute in ("label", "url"):
        value = getattr(server, attribute, None)
        if value:
            return str(value)
    return str(server)


def _hash64(text: str) -> int:
    # blake2b rather than hash(): Python's str hash is salted per process, and every worker
    # and every proxy instance must map a key to the same server.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Policy(Generic[S]):
    """Base class: holds the servers and their weights, fixed at construction."""

    name: ClassVar[str] = ""

    def __init__(
        self,
        servers: Sequence[S],
        *,
        rng: random.Random | None = None,
        hash_ring_points: int = DEFAULT_HASH_RING_POINTS,
        slow_start: Any = None,
    ) -> None:
        self._servers: tuple[S, ...] = tuple(servers)
        self._slow_start = slow_start  # a proxy.balancing.slowstart.SlowStart, or None
        weights = []
        for server in self._servers:
            weight = int(getattr(server, "weight", 1))
            if weight < 1:
                raise ValueError(f"server {_server_identity(server)}: weight must be >= 1")
            weights.append(weight)
        self._weights: tuple[int, ...] = tuple(weights)
        self._rng = rng if rng is not None else random.Random()

    @property
    def servers(self) -> tuple[S, ...]:
        return self._servers

    def _weights_at(self, now: float) -> list[float]:
        return [server.effective_weight(now) for server in self._servers]  # type: ignore[attr-defined]

    def select(self, is_eligible: Callable[[S], bool], key: str | None = None) -> S | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self._servers)} servers>"


class _SmoothWeighted:
    """nginx's smooth weighted round robin (ngx_http_upstream_get_peer).

    Each pick adds every candidate's weight to its running `current`, takes the candidate
    with the largest `current` (first in config order on a tie) and subtracts the total
    weight of the candidates from it. Non-candidates keep their `current` untouched, as
    nginx does for peers that are down. Weights 5,1,1 give `a a b a c a a`.
    """

    __slots__ = ("_current", "_weights")

    def __init__(self, weights: tuple[int, ...]) -> None:
        self._weights = weights
        self._current: list[float] = [0] * len(weights)

    def pick(
        self,
        items: Sequence[Any],
        is_candidate: Callable[[Any], Any],
        weights: Sequence[float] | None = None,
    ) -> int:
        """Index of the chosen item among those where `is_candidate(item)`, or -1.
        `weights`: this pick's weights when they differ from the fixed ones (slow start)."""
        current = self._current
        best = -1
        best_current: float = 0
        total: float = 0
        for index, weight in enumerate(self._weights if weights is None else weights):
            if not is_candidate(items[index]):
                continue
            current[index] += weight
            total += weight
            if best < 0 or current[index] > best_current:
                best = index
                best_current = current[index]
        if best >= 0:
            current[best] -= total
        return best


class RoundRobin(Policy[S]):
    """Smooth weighted round robin over the eligible servers (nginx's algorithm)."""

    name = "round_robin"

    def __init__(self, servers: Sequence[S], **kwargs: Any) -> None:
        super().__init__(servers, **kwargs)
        self._wrr = _SmoothWeighted(self._weights)

    def select(self, is_eligible: Callable[[S], bool], key: str | None = None) -> S | None:
        slow_start = self._slow_start
        now = None if slow_start is None else slow_start.ramping()
        weights = None if now is None else self._weights_at(now)
        index = self._wrr.pick(self._servers, is_eligible, weights)
        return self._servers[index] if index >= 0 else None


class LeastConn(Policy[S]):
    """Fewest `in_flight / weight`; ties broken by smooth weighted round robin (as nginx).

    With idle servers everything ties, so an idle upstream still gets its traffic spread by
    weight and in rotation rather than always on the first server.
    """

    name = "least_conn"

    def __init__(self, servers: Sequence[S], **kwargs: Any) -> None:
        super().__init__(servers, **kwargs)
        self._wrr = _SmoothWeighted(self._weights)
        self._flags = [False] * len(self._servers)  # reused scratch: eligible, then tied

    def select(self, is_eligible: Callable[[S], bool], key: str | None = None) -> S | None:
        servers = self._servers
        slow_start = self._slow_start
        now = None if slow_start is None else slow_start.ramping()
        weights: Sequence[float] = self._weights if now is None else self._weights_at(now)
        flags = self._flags
        # Pass 1: the least load, compared by cross-multiplying to stay in integers.
        best_load = -1
        best_weight: float = 1
        for index, server in enumerate(servers):
            ok = flags[index] = bool(is_eligible(server))
            if not ok:
                continue
            load = server.in_flight
            if best_load < 0 or load * best_weight < best_load * weights[index]:
                best_load = load
                best_weight = weights[index]
        if best_load < 0:
            return None
        # Pass 2: rotate among the eligible servers tied at that load.
        for index, server in enumerate(servers):
            if flags[index]:
                load = server.in_flight
                flags[index] = load * best_weight == best_load * weights[index]
        index = self._wrr.pick(flags, bool, None if now is None else weights)
        return servers[index] if index >= 0 else None


class IpHash(Policy[S]):
    """Consistent hashing of `key` on a weighted ring (ketama-style).

    Every server owns `hash_ring_points * weight` points on a 64-bit ring. A key is hashed
    onto the ring and served by the owner of the next point clockwise that is eligible.
    So the same key lands on the same server while the eligible set is unchanged, and when
    a server leaves only the keys it held move (to their next server clockwise). A None key
    is hashed as "".
    """

    name = "ip_hash"

    def __init__(
        self,
        servers: Sequence[S],
        *,
        hash_ring_points: int = DEFAULT_HASH_RING_POINTS,
        **kwargs: Any,
    ) -> None:
        super().__init__(servers, hash_ring_points=hash_ring_points, **kwargs)
        points: list[tuple[int, int]] = []
        for index, server in enumerate(self._servers):
            identity = _server_identity(server)
            for point in range(hash_ring_points * self._weights[index]):
                points.append((_hash64(f"{identity}#{point}"), index))
        points.sort()
        self._ring_hashes: list[int] = [point for point, _ in points]
        self._ring_owners: tuple[int, ...] = tuple(owner for _, owner in points)
        self._identities = tuple(_server_identity(server) for server in self._servers)
        self._index_of = {id(server): index for index, server in enumerate(self._servers)}

    def select(self, is_eligible: Callable[[S], bool], key: str | None = None) -> S | None:
        slow_start = self._slow_start
        now = None if slow_start is None else slow_start.ramping()
        if now is None:
            return self._select(is_eligible, key)
        # A ramping server takes the keys whose hash fraction is below its ramp fraction;
        # the others go on clockwise. Should every eligible server refuse, the first one
        # asked serves (the key must land somewhere).
        refused: list[S] = []
        index_of = self._index_of

        def accepts(server: S) -> bool:
            if not is_eligible(server):
                return False
            index = index_of[id(server)]
            full = self._weights[index]
            weight = server.effective_weight(now)  # type: ignore[attr-defined]
            if weight >= full:
                return True
            fraction = _hash64(f"{key or ''}@{self._identities[index]}") / 2.0**64
            if fraction < weight / full:
                return True
            refused.append(server)
            return False

        chosen = self._select(accepts, key)
        if chosen is None and refused:
            chosen = refused[0]
        return chosen

    def _select(self, is_eligible: Callable[[S], bool], key: str | None) -> S | None:
        owners = self._ring_owners
        size = len(owners)
        if size == 0:
            return None
        servers = self._servers
        position = bisect.bisect_left(self._ring_hashes, _hash64(key or ""))
        last_checked = -1
        for step in range(size):
            owner = owners[(position + step) % size]
            if owner == last_checked:  # consecutive points of one server: ask once
                continue
            if is_eligible(servers[owner]):
                return servers[owner]
            last_checked = owner
            if step >= len(servers):
                # Many ineligible servers: finish with one pass that asks each server once.
                return self._walk_remembering(position + step + 1, is_eligible)
        return None

    def _walk_remembering(self, start: int, is_eligible: Callable[[S], bool]) -> S | None:
        owners = self._ring_owners
        size = len(owners)
        servers = self._servers
        verdicts: dict[int, bool] = {}
        for step in range(size):
            owner = owners[(start + step) % size]
            ok = verdicts.get(owner)
            if ok is None:
                ok = verdicts[owner] = is_eligible(servers[owner])
                if ok:
                    return servers[owner]
                if len(verdicts) == len(servers):
                    return None
        return None


class _WeightedRandomPick:
    """Weighted random index among candidates, exact and O(log n) in the common case.

    Draw from all servers by cumulative weight; if the draw is not a candidate, draw again
    among the candidates only. The two stages together pick each candidate with probability
    weight / (total candidate weight), exactly.
    """

    __slots__ = ("_cumulative", "_rng", "_total", "_weights")

    def __init__(self, weights: tuple[int, ...], rng: random.Random) -> None:
        self._weights = weights
        self._rng = rng
        cumulative = []
        running = 0
        for weight in weights:
            running += weight
            cumulative.append(running)
        self._cumulative = cumulative
        self._total = running

    def pick(
        self,
        items: Sequence[Any],
        is_candidate: Callable[[Any], Any],
        weights: Sequence[float] | None = None,
    ) -> int:
        """Index of a randomly chosen item among those where `is_candidate(item)`, or -1.
        `weights`: this pick's weights when they differ from the fixed ones (slow start)."""
        if weights is not None:
            return self._pick_among(items, is_candidate, weights)
        if self._total == 0:
            return -1
        weights = self._weights
        index = bisect.bisect_right(self._cumulative, self._rng.random() * self._total)
        index = min(index, len(weights) - 1)  # guards the float edge random() * total == total
        if is_candidate(items[index]):
            return index
        return self._pick_among(items, is_candidate, weights)

    def _pick_among(
        self, items: Sequence[Any], is_candidate: Callable[[Any], Any], weights: Sequence[float]
    ) -> int:
        candidates_total: float = 0
        for i, weight in enumerate(weights):
            if is_candidate(items[i]):
                candidates_total += weight
        if candidates_total == 0:
            return -1
        draw = self._rng.random() * candidates_total
        chosen = -1
        for i, weight in enumerate(weights):
            if is_candidate(items[i]):
                chosen = i
                draw -= weight
                if draw < 0:
                    break
        return chosen


class WeightedRandom(Policy[S]):
    """Weighted random pick among the eligible servers, using the injected rng."""

    name = "random"

    def __init__(self, servers: Sequence[S], **kwargs: Any) -> None:
        super().__init__(servers, **kwargs)
        self._picker = _WeightedRandomPick(self._weights, self._rng)

    def select(self, is_eligible: Callable[[S], bool], key: str | None = None) -> S | None:
        slow_start = self._slow_start
        now = None if slow_start is None else slow_start.ramping()
        weights = None if now is None else self._weights_at(now)
        index = self._picker.pick(self._servers, is_eligible, weights)
        return self._servers[index] if index >= 0 else None


class PowerOfTwoChoices(Policy[S]):
    """Power of two random choices: two distinct eligible servers drawn by weight; the one
    with the lower `in_flight / weight` wins, then the lower `latency`, then the first draw.
    """

    name = "p2c"

    def __init__(self, servers: Sequence[S], **kwargs: Any) -> None:
        super().__init__(servers, **kwargs)
        self._picker = _WeightedRandomPick(self._weights, self._rng)
        self._eligible = [False] * len(self._servers)  # reused scratch

    def select(self, is_eligible: Callable[[S], bool], key: str | None = None) -> S | None:
        servers = self._servers
        eligible = self._eligible
        for index, server in enumerate(servers):
            eligible[index] = bool(is_eligible(server))
        slow_start = self._slow_start
        now = None if slow_start is None else slow_start.ramping()
        ramped = None if now is None else self._weights_at(now)
        first = self._picker.pick(eligible, bool, ramped)
        if first < 0:
            return None
        eligible[first] = False  # the second draw must be a different server
        second = self._picker.pick(eligible, bool, ramped)
        if second < 0:
            return servers[first]
        a, b = servers[first], servers[second]
        weights: Sequence[float] = self._weights if ramped is None else ramped
        load_a = a.in_flight * weights[second]
        load_b = b.in_flight * weights[first]
        if load_b < load_a or (load_b == load_a and b.latency < a.latency):
            return b
        return a


#: Policies by their config name (`upstreams.*.policy`).
POLICIES: dict[str, type[Policy[Any]]] = {
    policy.name: policy
    for policy in (RoundRobin, LeastConn, IpHash, WeightedRandom, PowerOfTwoChoices)
}
