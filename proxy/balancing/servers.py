# cython: annotation_typing=False
"""Runtime state of upstream servers and the one eligibility rule that selection obeys.

A ``Server`` outlives config generations: on reload, a server with the same upstream name,
URL and address is carried over with its breaker, health, counters and pooled connections.
``UpstreamGroup`` is rebuilt per generation from those servers and owns the selection
policies (one per tier: primaries, then backups; and the primaries of this instance's zone
under zone affinity).

Each configured server entry is a list of servers: one for a plain URL, one per address
for an entry with ``resolve`` (DNS discovery), sorted by address, possibly none. When DNS
changes an entry, ``set_entry`` rebuilds the tiers, policies and sticky table and swaps
them in; requests under way keep the server they hold. ``servers`` is the flat list in
config order, and what ``/status`` lists and drain indexes count.

Eligible = not draining, health not DOWN (UNKNOWN counts as up), breaker admits requests.
Below ``min_healthy_percent`` of eligible primaries the group panics (as Envoy does): health
is ignored and every primary that is not draining takes traffic.

Selection order: the server a sticky cookie names, while it is eligible; in panic, any
primary not draining; else under zone affinity the primaries of this instance's zone,
while at least ``zone_affinity.min_healthy_percent`` of them are eligible; else every
primary; then the backups.
"""

from __future__ import annotations

import operator
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy.balancing.breaker import BreakerState, CircuitBreaker
from proxy.balancing.health import HealthStatus, ServerHealth
from proxy.balancing.policies import POLICIES
from proxy.balancing.retry import FailureKind
from proxy.balancing.slowstart import SlowStart, ramped_weight
from proxy.balancing.sticky import StickyTable
from proxy.dataplane.upstream import ConnectionPool
from proxy.observability.stats import RollingStats

LATENCY_EWMA_WEIGHT = 0.2
_TIMEOUT = FailureKind.TIMEOUT


def server_label(server_cfg: Any, address: tuple[str, int] | None = None) -> str:
    """ "host:port" of a server: the URL's, or the address DNS found for it."""
    if address is None:
        return f"{server_cfg.host}:{server_cfg.port}"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    __slots__ = (
        "address",
        "backup",
        "breaker",
        "check_host",
        "check_url",
        "config",
        "connect_to",
        "discovered",
        "draining",
        "errors",
        "failures",
        "health",
        "in_flight",
        "label",
        "latency",
        "metrics",
        "pool",
        "ramp_ends",
        "ramp_started",
        "reported_health",
        "requests",
        "slow_start",
        "stats",
        "status_classes",
        "timeouts",
        "upstream",
        "url",
        "weight",
        "zone",
    )

    def __init__(
        self,
        upstream: str,
        server_cfg: Any,
        upstream_cfg: Any,
        *,
        metrics: Any,
        on_breaker_transition: Callable[[Server, BreakerState, BreakerState, str], None],
        address: tuple[str, int] | None = None,
        slow_start: SlowStart | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``address``: the (ip, port) DNS discovery found for the entry's name, or None."""
        self.upstream = upstream
        self.url = server_cfg.url
        self.label = server_label(server_cfg, address)
        self.discovered = address is not None
        self.connect_to = address or (server_cfg.host, server_cfg.port)
        if address is None:
            self.check_url = server_cfg.url
            self.check_host: str | None = None
        else:
            # Checks go to the address, naming the host as the URL does (Host and SNI).
            self.check_url = f"{server_cfg.scheme}://{self.label}"
            self.check_host = server_cfg.host
        # The host:port connected to: differs from the URL's for a server found by DNS.
        self.address = self.label
        self.zone = server_cfg.zone
        self.slow_start = slow_start
        self.ramp_started = 0.0
        self.ramp_ends = 0.0  # no ramp: effective_weight is the weight
        self.config = server_cfg
        self.weight = server_cfg.weight
        self.backup = server_cfg.backup
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        # Upstream answers by status class (index status // 100: 1..5 are reported; llhttp
        # reads three digits, so 10 slots hold any code), and tries that got no answer.
        self.status_classes = [0] * 10
        self.errors = 0
        self.timeouts = 0
        self.draining = False
        self.latency = 0.0
        self.metrics = metrics
        self.reported_health = "unknown"
        self.stats = RollingStats(clock=clock)
        self.health: ServerHealth | None = (
            ServerHealth.from_config(upstream_cfg.health_check, clock=clock)
            if upstream_cfg.health_check
            else None
        )
        self.breaker = CircuitBreaker.from_config(
            upstream_cfg.circuit_breaker,
            clock=clock,
            on_transition=lambda old, new, reason: on_breaker_transition(self, old, new, reason),
        )
        self.pool = ConnectionPool(server_cfg, upstream_cfg, connect_to=address)
        metrics.set_breaker(BreakerState.CLOSED)
        metrics.set_healthy(True)

    def effective_weight(self, now: float) -> float:
        """The weight the policies use at ``now``: ``weight``, or less during slow start."""
        if now >= self.ramp_ends:
            return self.weight
        return ramped_weight(self.weight, self.ramp_started, self.ramp_ends, now)

    def start_ramp(self) -> None:
        """The server (re)joins: slow start, when the upstream has it."""
        if self.slow_start is not None:
            self.slow_start.begin(self)

    def set_draining(self, draining: bool) -> None:
        """Drain (no new requests) or undrain; undrained, it rejoins with slow start."""
        if self.draining and not draining:
            self.start_ramp()
        self.draining = draining

    def retire(self) -> None:
        """The server left for good (DNS lost its address): no new requests, pooled
        connections close now and busy ones when their request ends, gauges go."""
        self.draining = True
        self.pool.close()
        self.metrics.retire()

    def is_eligible(self) -> bool:
        if self.draining:
            return False
        health = self.health
        if health is not None and not health.eligible:
            return False
        return self.breaker.allows()

    def observe_latency(self, seconds: float) -> None:
        if self.latency:
            self.latency += LATENCY_EWMA_WEIGHT * (seconds - self.latency)
        else:
            self.latency = seconds

    def count_no_answer(self, kind: FailureKind) -> None:
        """A try that ended without a response head: ``kind`` is its failure word."""
        if kind is _TIMEOUT:
            self.timeouts += 1
        else:
            self.errors += 1

    def health_word(self) -> str:
        return self.health.status.value if self.health is not None else HealthStatus.UNKNOWN.value

    def status(self) -> dict[str, Any]:
        status = {
            "url": self.url,
            "weight": self.weight,
            "backup": self.backup,
            "health": self.health_word(),
            "breaker": self.breaker.state.value,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "draining": self.draining,
            "zone": self.zone,
            "address": self.address,
            "outcomes": self.outcomes(),
            "last_check": self.health.last_check_status() if self.health is not None else None,
        }
        status.update(self.stats.snapshot())
        return status

    def outcomes(self) -> dict[str, int]:
        classes = self.status_classes
        outcomes = {f"{n}xx": classes[n] for n in range(1, 6)}
        outcomes["errors"] = self.errors
        outcomes["timeouts"] = self.timeouts
        return outcomes

    def reconfigure(self, server_cfg: Any, upstream_cfg: Any, old_upstream_cfg: Any) -> None:
        """Apply a reloaded config while keeping live state (breaker, health, pool)."""
        self.config = server_cfg
        self.weight = server_cfg.weight
        self.backup = server_cfg.backup
        self.zone = server_cfg.zone
        if upstream_cfg.circuit_breaker != old_upstream_cfg.circuit_breaker:
            self.breaker.reconfigure(upstream_cfg.circuit_breaker)
        if upstream_cfg.health_check != old_upstream_cfg.health_check:
            self.health = (
                ServerHealth.from_config(upstream_cfg.health_check)
                if upstream_cfg.health_check
                else None
            )
        self.pool.reconfigure(server_cfg, upstream_cfg)


_is_eligible = operator.methodcaller("is_eligible")


class UpstreamGroup:
    """One upstream of one config generation: its servers, policies and retry budget."""

    __slots__ = (
        "_backup_policy",
        "_entries",
        "_local_fraction",
        "_local_policy",
        "_panic_fraction",
        "_primary_policy",
        "_rng",
        "backups",
        "config",
        "failure_on",
        "hash_key",
        "local",
        "name",
        "primaries",
        "retry_budget",
        "retry_policy",
        "servers",
        "slow_start",
        "sticky",
        "zone",
    )

    def __init__(
        self,
        config: Any,
        entries: Sequence[Sequence[Server]],
        *,
        retry_policy: Any,
        retry_budget: Any,
        zone: str | None = None,
        slow_start: SlowStart | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``entries``: per configured server, its servers (one, or one per address).
        ``zone``: this instance's zone (top-level ``zone``), for zone affinity."""
        self.name = config.name
        self.config = config
        self._rng = rng or random.Random()
        self.slow_start = slow_start
        self._panic_fraction = config.min_healthy_percent / 100.0
        affinity = config.zone_affinity
        self.zone = zone if affinity is not None else None
        self._local_fraction = affinity.min_healthy_percent / 100.0 if affinity else 0.0
        self.retry_policy = retry_policy
        self.retry_budget = retry_budget
        # Only ip_hash reads a key; other policies ignore hash_key (as SPEC's example shows).
        self.hash_key = (config.hash_key or "client_ip") if config.policy == "ip_hash" else None
        self.failure_on = config.failure_on
        self._entries = [tuple(entry) for entry in entries]
        self._rebuild()

    def entry(self, index: int) -> tuple[Server, ...]:
        """The servers of the ``index``-th configured server entry."""
        return self._entries[index]

    def set_entry(self, index: int, servers: Sequence[Server]) -> None:
        """DNS changed an entry's addresses: new tiers, policies and sticky ids, swapped in."""
        self._entries[index] = tuple(servers)
        self._rebuild()

    def _rebuild(self) -> None:
        servers = tuple(server for entry in self._entries for server in entry)
        primaries = tuple(s for s in servers if not s.backup)
        backups = tuple(s for s in servers if s.backup)
        local = tuple(s for s in primaries if s.zone == self.zone) if self.zone else ()
        policy_class = POLICIES[self.config.policy]
        slow_start = self.slow_start
        if slow_start is not None and slow_start.duration <= 0:
            slow_start = None  # off: the policies never even ask
        options = {"rng": self._rng, "slow_start": slow_start}
        # Assigned last, together: a request reads one consistent generation of them.
        self._primary_policy = policy_class(primaries, **options)
        self._backup_policy = policy_class(backups, **options) if backups else None
        self._local_policy = policy_class(local, **options) if local else None
        sticky = self.config.sticky
        self.sticky = StickyTable(self.name, sticky, servers) if sticky is not None else None
        self.local = local
        self.primaries = primaries
        self.backups = backups
        self.servers = servers

    def select(
        self, key: str | None, tried: Iterable[Server] = (), pinned: Server | None = None
    ) -> Server | None:
        """A server for the next try: ``pinned`` (a sticky cookie's server) while it is
        eligible and untried, else the policies' pick; None when there is none."""
        if pinned is not None and pinned not in tried and pinned.is_eligible():
            return pinned
        if tried:

            def eligible(server: Server) -> bool:
                return server not in tried and server.is_eligible()

        else:
            eligible = _is_eligible  # the first try of every request: no closure to make

        if self._panic_fraction and self._in_panic():

            def eligible(server: Server) -> bool:
                return server not in tried and not server.draining

            return self._primary_policy.select(eligible, key)
        local_policy = self._local_policy
        if local_policy is not None and self._zone_healthy():
            chosen = local_policy.select(eligible, key)
            if chosen is not None:
                return chosen
        chosen = self._primary_policy.select(eligible, key)
        if chosen is None and self._backup_policy is not None:
            chosen = self._backup_policy.select(eligible, key)
        return chosen

    def _in_panic(self) -> bool:
        primaries = self.primaries
        healthy = sum(1 for s in primaries if s.is_eligible())
        return healthy < self._panic_fraction * len(primaries)

    def _zone_healthy(self) -> bool:
        """Zone affinity holds: enough of this zone's primaries are eligible."""
        local = self.local
        eligible = sum(1 for s in local if s.is_eligible())
        return eligible > 0 and eligible >= self._local_fraction * len(local)

    def has_eligible_server(self) -> bool:
        if any(s.is_eligible() for s in self.servers):
            return True
        # In panic every primary that is not draining takes traffic, whatever its health.
        return bool(self._panic_fraction) and any(not s.draining for s in self.primaries)

    def status(self) -> dict[str, Any]:
        return {
            "policy": self.config.policy,
            "has_eligible_server": self.has_eligible_server(),
            "servers": [server.status() for server in self.servers],
        }
