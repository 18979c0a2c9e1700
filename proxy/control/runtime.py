"""One loaded config generation: compiled routes, upstream groups, and what requests need.

A reload builds a new ``Runtime`` next to the running one, then the daemon swaps the
reference. Requests read the reference once, so each finishes on the generation it began
with. Servers are the exception that makes reloads painless: a server with the same
upstream name and URL is carried over (breaker, health, counters, pooled connections).
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from proxy.balancing.breaker import BreakerState
from proxy.balancing.discovery import Discovery, address_order
from proxy.balancing.health import HealthChecker
from proxy.balancing.retry import RetryPolicy
from proxy.balancing.servers import Server, UpstreamGroup, server_label
from proxy.balancing.slowstart import SlowStart
from proxy.cache.serve import RouteCache, SharedCache
from proxy.dataplane.client import ConnectionLimits
from proxy.http.clientip import ClientAddressResolver
from proxy.observability import metrics
from proxy.observability.accessline import json_line
from proxy.pipeline.compress import CompressRule
from proxy.pipeline.compression_filter import CompressionFilter
from proxy.pipeline.filters import request_filters
from proxy.pipeline.routing import Router
from proxy.pipeline.state import ExchangeState

log = logging.getLogger("sluicegate")


class RouteCounters:
    """What one route has seen, for ``/status``. Carried across reloads by route name, as
    servers are, so a reload does not zero the page. (The cache's own figures are its
    ``RouteCache.status()``.)"""

    __slots__ = ("rate_limited", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.rate_limited = 0  # over the limit, in either mode (shadow counts too)


class RouteRuntime:
    """A route as the pipeline needs it: resolved group, prepared bytes, metric children."""

    __slots__ = (
        "cache",
        "compress",
        "compression",
        "counters",
        "group",
        "limit_key_kind",
        "limit_key_name",
        "metrics",
        "name",
        "rate_limit",
        "request_filters",
        "strip_prefix",
    )

    def __init__(self, cfg: Any, group: UpstreamGroup, counters: RouteCounters) -> None:
        self.name = cfg.name
        self.group = group
        self.counters = counters
        prefix = cfg.match.path_prefix or "/"
        self.strip_prefix = prefix.rstrip("/").encode() if cfg.strip_prefix else b""
        self.rate_limit = cfg.rate_limit
        self.limit_key_kind = "client_ip"
        self.limit_key_name = b""
        if cfg.rate_limit is not None:
            kind, _, name = cfg.rate_limit.key.partition(":")
            self.limit_key_kind = kind
            self.limit_key_name = name.lower().encode() if kind == "header" else name.encode()
        self.metrics = metrics.RouteMetrics(cfg.name)
        self.compress = CompressRule(cfg.compress) if cfg.compress is not None else None
        # The response filter the rule makes (the encoder a head asks for), counted here.
        self.compression = (
            CompressionFilter(self.compress, self.metrics) if self.compress is not None else None
        )
        self.cache: Any = None  # a RouteCache when the route is cached (set by Runtime)
        # What runs before the request goes upstream (rate limit, cache lookup): composed
        # by the Runtime once the cache is set (``proxy.pipeline.filters``).
        self.request_filters: tuple[Any, ...] = ()

    def status(self) -> dict[str, Any]:
        """The route's entry in ``/status``: ``limit`` and ``cache`` are null when the route
        has none."""
        limit = self.rate_limit
        counters = self.counters
        return {
            "name": self.name,
            "upstream": self.group.name,
            "requests": counters.requests,
            "rate_limited": counters.rate_limited,
            "limit": None
            if limit is None
            else {"rate": limit.rate, "burst": limit.burst, "key": limit.key, "mode": limit.mode},
            "cache": self.cache.status() if self.cache is not None else None,
        }


class Refusal(ExchangeState):
    """The outcome, for the access log, of a request the connection answered itself
    before any route saw it (400 malformed, 413 declared too large, 431, 408): nginx
    logs those too. An exchange's fields (``ExchangeState``), as a routed request has."""

    def __init__(self, status: int, reason: str, bytes_out: int) -> None:
        self.status = status
        self.error = reason
        self.bytes_out = bytes_out
        self.route = self.upstream = self.server = self.cache_status = ""
        self.upstream_seconds = 0.0
        self.tries = 0
        self.rate_limited = False
        self.attempts = ()


class Runtime:
    def __init__(
        self,
        config: Any,
        *,
        previous: Runtime | None = None,
        limiter: Any,
        access_log: Any,
        balancing_clock: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``balancing_clock``: what breakers, slow start and server statistics measure
        time by (monotonic seconds); tests/pipeline hands its event loop's virtual clock
        here, so that ``open_duration`` and a ramp pass without a real wait. ``clock``:
        what requests are timed by (durations, tries, the retry time budget, which the
        retry policies measure by the same clock)."""
        self.config = config
        self._balancing_clock = balancing_clock
        self.loaded_at = time.time()
        self.limiter = limiter
        self.access_log = access_log
        self.clock = clock
        self.metrics = metrics
        self.connection_limits = ConnectionLimits(config.limits)
        self._resolver = ClientAddressResolver(config.trusted_proxies)
        self._trusts_proxies = bool(config.trusted_proxies)
        self._id_prefix = os.urandom(5).hex().encode()
        token = os.environ.get(config.admin.token_env) if config.admin.token_env else None
        # Decision traces are for whoever holds the admin token; without one, none are given.
        self.trace_token = token.encode() if token else None
        self._id_counter = itertools.count(1)
        # Servers by (upstream, URL, address): a resolved entry has one per address.
        self.servers: dict[tuple[str, str, str], Server] = {}
        self.groups: dict[str, UpstreamGroup] = {}
        self.slow_starts: dict[str, SlowStart] = {}
        self._reloaded = previous is not None
        carried = previous.servers if previous is not None else {}
        carried_slow_starts = previous.slow_starts if previous is not None else {}
        previous_upstreams = previous.config.upstreams if previous is not None else {}
        for name, upstream_cfg in config.upstreams.items():
            slow_start = carried_slow_starts.get(name) or SlowStart(
                upstream_cfg.slow_start, clock=balancing_clock
            )
            slow_start.duration = upstream_cfg.slow_start
            self.slow_starts[name] = slow_start
            entries = []
            for server_cfg in upstream_cfg.servers:
                if server_cfg.resolve:
                    # Addresses the last generation knew stay until a lookup says otherwise.
                    kept = [
                        s
                        for (upstream, url, _), s in carried.items()
                        if upstream == name and url == server_cfg.url and s.discovered
                    ]
                    previous_cfg = previous_upstreams.get(name)
                    for server in kept:
                        self._carry(server, server_cfg, upstream_cfg, previous_cfg, slow_start)
                    entries.append(sorted(kept, key=lambda s: address_order(s.connect_to)))
                    continue
                key = (name, server_cfg.url, f"{server_cfg.host}:{server_cfg.port}")
                server = carried.get(key)
                if server is not None and not server.discovered and key not in self.servers:
                    previous_cfg = previous_upstreams[name]
                    self._carry(server, server_cfg, upstream_cfg, previous_cfg, slow_start)
                else:
                    server = self._new_server(name, server_cfg, upstream_cfg, None)
                    if self._reloaded:
                        server.start_ramp()  # added by a reload: it joins
                self.servers[key] = server
                entries.append([server])
            retry_policy = RetryPolicy.from_config(upstream_cfg.retry, clock=clock)
            old_group = previous.groups.get(name) if previous is not None else None
            budget = (
                old_group.retry_budget
                if old_group is not None and old_group.config.retry == upstream_cfg.retry
                else retry_policy.new_budget()
            )
            self.groups[name] = UpstreamGroup(
                upstream_cfg,
                entries,
                retry_policy=retry_policy,
                retry_budget=budget,
                zone=config.zone,
                slow_start=slow_start,
            )
        self.discovery = Discovery(config.upstreams, self._addresses_found)
        carried_counters = previous.route_counters if previous is not None else {}
        self.route_counters = {
            cfg.name: carried_counters.get(cfg.name) or RouteCounters() for cfg in config.routes
        }
        self.routes = [
            RouteRuntime(cfg, self.groups[cfg.upstream], self.route_counters[cfg.name])
            for cfg in config.routes
        ]
        # The response cache: one store for every cached route, kept across reloads while
        # the `cache` section stays the same.
        self.cache: SharedCache | None = None
        if config.cache is not None:
            self.cache = SharedCache(
                config.cache, previous.cache if previous else None, redis_config=config.redis
            )
            for route, cfg in zip(self.routes, config.routes, strict=True):
                if cfg.cache is not None:
                    route.cache = RouteCache(cfg, self.cache, route.metrics)
        for route in self.routes:
            route.request_filters = request_filters(route)
        self.router = Router(
            (route, cfg.match) for route, cfg in zip(self.routes, config.routes, strict=True)
        )
        self._checkers: dict[str, HealthChecker] = {}

    def _new_server(
        self, name: str, server_cfg: Any, upstream_cfg: Any, address: tuple[str, int] | None
    ) -> Server:
        return Server(
            name,
            server_cfg,
            upstream_cfg,
            metrics=metrics.ServerMetrics(name, server_label(server_cfg, address)),
            on_breaker_transition=_breaker_transition,
            address=address,
            slow_start=self.slow_starts[name],
            clock=self._balancing_clock,
        )

    def _carry(
        self, server: Server, server_cfg: Any, upstream_cfg: Any, old_cfg: Any, slow_start: Any
    ) -> None:
        """A server of the last generation stays: new settings, same live state."""
        server.reconfigure(server_cfg, upstream_cfg, old_cfg)
        server.slow_start = slow_start
        self.servers[(server.upstream, server.url, server.address)] = server
        # A changed (or removed) health check starts over: the gauge follows.
        health = server.health
        server.metrics.set_healthy(health is None or health.eligible)

    # -- DNS discovery ---------------------------------------------------------------------

    async def first_lookups(self) -> None:
        """Look up the resolved entries that have no address yet (all of them at daemon
        start, new ones on reload) before this generation serves. At daemon start they
        join at full weight; on reload, with slow start."""
        waiting = [
            entry
            for entry in self.discovery.entries
            if not self.groups[entry.upstream].entry(entry.index)
        ]
        await self.discovery.first_lookups(waiting, ramp=self._reloaded)

    def _addresses_found(self, entry: Any, addresses: list[tuple[str, int]], ramp: bool) -> None:
        """Apply a successful lookup: new addresses join (ramping), vanished ones drain."""
        name = entry.upstream
        group = self.groups[name]
        upstream_cfg = self.config.upstreams[name]
        server_cfg = upstream_cfg.servers[entry.index]
        current = {server.connect_to: server for server in group.entry(entry.index)}
        servers = []
        joined = []
        for address in addresses:
            server = current.pop(address, None)
            if server is None:
                server = self._new_server(name, server_cfg, upstream_cfg, address)
                self.servers[(name, server.url, server.address)] = server
                if ramp:
                    server.start_ramp()
                joined.append(server)
            servers.append(server)
        if not joined and not current:
            return
        group.set_entry(entry.index, servers)
        checker = self._checkers.get(name)
        for server in current.values():
            # In-flight requests finish on it; its connections close as they come back.
            del self.servers[(name, server.url, server.address)]
            server.retire()
            if checker is not None:
                checker.remove(server)
        if checker is not None:
            for server in joined:
                checker.add(server)
        log.info(
            "DNS: upstream %s %s now %s (joined: %s; left: %s)",
            name,
            entry.host,
            ", ".join(s.address for s in servers),
            ", ".join(s.address for s in joined) or "none",
            ", ".join(s.address for s in current.values()) or "none",
            extra={"event": "dns", "upstream": name},
        )

    def start_discovery(self) -> None:
        self.discovery.start()

    async def stop_discovery(self) -> None:
        await self.discovery.stop()

    def retired_servers(self, successor: Runtime) -> list[Server]:
        return [s for key, s in self.servers.items() if successor.servers.get(key) is not s]

    # -- per request -----------------------------------------------------------------------

    def new_request_id(self) -> bytes:
        return b"%s%08x" % (self._id_prefix, next(self._id_counter))

    def wants_trace(self, request: Any) -> bool:
        presented = request.trace
        return (
            presented is not None
            and self.trace_token is not None
            and hmac.compare_digest(presented.strip(), self.trace_token)
        )

    def client_ip(self, request: Any) -> str:
        """The client's address; the rate-limit key, ip_hash and the access log all ask."""
        address = request.client_ip
        if address is None:
            forwarded_for = request.forwarded_for
            address = request.client_ip = (
                self._resolver.resolve(request.conn.peer, forwarded_for)
                if forwarded_for is not None and self._trusts_proxies
                else request.conn.peer
            )
        return address

    def log_access(self, conn: Any, request: Any, outcome: Any, duration: float) -> None:
        access_log = self.access_log
        if access_log.fmt == "json":
            client_ip = request.client_ip  # resolved already when a limit or ip_hash asked
            if client_ip is None:
                client_ip = self.client_ip(request)
            access_log.log_line(json_line(request, outcome, client_ip, duration))
            return
        body = request.body
        record = {
            "request_id": request.request_id.decode("latin-1") if request.request_id else "",
            "client_ip": self.client_ip(request),
            "method": request.method.decode("latin-1"),
            "host": request.host.decode("latin-1") if request.host else "",
            "path": request.path.decode("latin-1"),
            "route": outcome.route,
            "upstream": outcome.upstream,
            "server": outcome.server,
            "status": outcome.status,
            "bytes_in": body.received if body is not None else 0,
            "bytes_out": outcome.bytes_out,
            "duration_ms": round(duration * 1000, 3),
            "upstream_duration_ms": round(outcome.upstream_seconds * 1000, 3),
            "tries": outcome.tries,
            "rate_limited": outcome.rate_limited,
            "error": outcome.error,
            "cache": outcome.cache_status,
        }
        if outcome.attempts:
            record["attempts"] = outcome.attempts
        access_log.log(record)

    # -- health checks -----------------------------------------------------------------------

    def start_health_checks(self) -> None:
        for name, group in self.groups.items():
            cfg = group.config.health_check
            if cfg is None:
                continue
            checker = HealthChecker(name, group.servers, cfg, on_result=_health_result)
            checker.start()
            self._checkers[name] = checker

    async def stop_health_checks(self) -> None:
        checkers, self._checkers = self._checkers, {}
        for checker in checkers.values():
            await checker.stop()

    # -- admin views ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The generation's part of ``/status``: ``zone``, ``routes`` and ``upstreams``."""
        return {
            "zone": self.config.zone,
            "routes": [route.status() for route in self.routes],
            "upstreams": {name: group.status() for name, group in self.groups.items()},
        }

    def unready_reasons(self) -> list[str]:
        return [
            f"upstream {name}: no eligible server"
            + ("" if group.servers else " (no address found for it in DNS yet)")
            for name, group in self.groups.items()
            if not group.has_eligible_server()
        ]


def _breaker_transition(server: Server, old: BreakerState, new: BreakerState, reason: str) -> None:
    log.warning(
        "circuit breaker %s -> %s for %s/%s: %s",
        old.value,
        new.value,
        server.upstream,
        server.label,
        reason,
        extra={"upstream": server.upstream, "server": server.label, "event": "breaker"},
    )
    server.metrics.set_breaker(new)
    server.metrics.breaker_transition(new)
    if new is BreakerState.CLOSED:
        server.start_ramp()  # back from a failure: it rejoins


def _health_result(server: Server, ok: bool, reason: str) -> None:
    server.metrics.health_check("pass" if ok else "fail")
    health = server.health
    if health is None:
        return
    up = health.eligible
    server.metrics.set_healthy(up)
    word = health.status.value
    if server.reported_health != word:
        if server.reported_health == "down" and up:
            server.start_ramp()  # back from down: it rejoins
        server.reported_health = word
        log.info(
            "health of %s/%s is now %s (%s)",
            server.upstream,
            server.label,
            word,
            reason,
            extra={"upstream": server.upstream, "server": server.label, "event": "health"},
        )
