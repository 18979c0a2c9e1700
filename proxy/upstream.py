"""Runtime state of upstream servers and the one eligibility rule that selection obeys.

A ``Server`` outlives config generations: on reload, a server with the same upstream name
and URL is carried over with its breaker, health, counters and pooled connections.
``UpstreamGroup`` is rebuilt per generation from those servers and owns the selection
policies (one per tier: primaries, then backups).

Eligible = not draining, health not DOWN (UNKNOWN counts as up), breaker admits requests.
Below ``min_healthy_percent`` of eligible primaries the group panics (as Envoy does): health
is ignored and every primary that is not draining takes traffic.
"""

from __future__ import annotations

import operator
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy.breaker import BreakerState, CircuitBreaker
from proxy.health import HealthStatus, ServerHealth
from proxy.policies import POLICIES
from proxy.pool import ConnectionPool
from proxy.stats import RollingStats

LATENCY_EWMA_WEIGHT = 0.2


class Server:
    __slots__ = (
        "address",
        "backup",
        "breaker",
        "config",
        "draining",
        "errors",
        "failures",
        "health",
        "in_flight",
        "label",
        "latency",
        "metrics",
        "pool",
        "reported_health",
        "requests",
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.url = server_cfg.url
        self.label = f"{server_cfg.host}:{server_cfg.port}"
        # The host:port connected to: differs from the URL's for a server found by DNS.
        self.address = self.label
        self.zone = server_cfg.zone
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
        self.pool = ConnectionPool(server_cfg, upstream_cfg)
        metrics.set_breaker(0)
        metrics.set_healthy(True)

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

    def count_no_answer(self, kind: str) -> None:
        """A try that ended without a response head: ``kind`` is its failure word."""
        if kind == "timeout":
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
        "_panic_fraction",
        "_primary_policy",
        "backups",
        "config",
        "failure_on",
        "hash_key",
        "name",
        "primaries",
        "retry_budget",
        "retry_policy",
        "servers",
    )

    def __init__(
        self,
        config: Any,
        servers: Sequence[Server],
        *,
        retry_policy: Any,
        retry_budget: Any,
        rng: random.Random | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.servers = tuple(servers)
        self.primaries = tuple(s for s in servers if not s.backup)
        self.backups = tuple(s for s in servers if s.backup)
        policy_class = POLICIES[config.policy]
        rng = rng or random.Random()
        self._primary_policy = policy_class(self.primaries, rng=rng)
        self._backup_policy = policy_class(self.backups, rng=rng) if self.backups else None
        self._panic_fraction = config.min_healthy_percent / 100.0
        self.retry_policy = retry_policy
        self.retry_budget = retry_budget
        # Only ip_hash reads a key; other policies ignore hash_key (as SPEC's example shows).
        self.hash_key = (config.hash_key or "client_ip") if config.policy == "ip_hash" else None
        self.failure_on = config.failure_on

    def select(self, key: str | None, tried: Iterable[Server] = ()) -> Server | None:
        if tried:

            def eligible(server: Server) -> bool:
                return server not in tried and server.is_eligible()

        else:
            eligible = _is_eligible  # the first try of every request: no closure to make

        if self._panic_fraction and self._in_panic():

            def eligible(server: Server) -> bool:
                return server not in tried and not server.draining

            return self._primary_policy.select(eligible, key)
        chosen = self._primary_policy.select(eligible, key)
        if chosen is None and self._backup_policy is not None:
            chosen = self._backup_policy.select(eligible, key)
        return chosen

    def _in_panic(self) -> bool:
        primaries = self.primaries
        healthy = sum(1 for s in primaries if s.is_eligible())
        return healthy < self._panic_fraction * len(primaries)

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
