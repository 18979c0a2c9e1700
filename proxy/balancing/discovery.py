"""DNS discovery: a server entry with ``resolve`` is one server per address of its name.

Theory of operation. ``Discovery`` runs one loop per such entry: look the name up (A and
AAAA, through ``resolvers`` when given, else the system's DNS servers from
/etc/resolv.conf: /etc/hosts is not read), hand the addresses to ``on_addresses``, sleep
``resolve``, again. What to do with the addresses (new servers that ramp up, vanished ones
that drain) is the owner's business: the runtime's, which keeps servers per address.

A lookup has one of three results, counted in ``sluicegate_dns_resolutions_total``:
``success`` (addresses; the set is applied), ``empty`` (the name exists with no address,
or not at all) and ``failure`` (timeout, SERVFAIL, refused, or one of A/AAAA failed while
the other answered). Empty and failed lookups keep the last good set: a DNS outage must
not empty an upstream, and a half answer must not shrink one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from proxy.observability import metrics

log = logging.getLogger("sluicegate")

#: Longest a lookup may take, whatever the period (a short period gets at least 1 s).
MAX_LOOKUP_SECONDS = 5.0
Address = tuple[str, int]


class LookupFailed(Exception):
    """The DNS servers did not answer usably; the message says how."""


def address_order(address: Address) -> tuple[int, int, int]:
    """Sort key: IPv4 before IPv6, numerically (so .10 follows .9), then port."""
    ip = ipaddress.ip_address(address[0])
    return (ip.version, int(ip), address[1])


class DnsLookup:
    """Addresses of a name: A and AAAA, asked in parallel."""

    def __init__(self, resolvers: Iterable[str], *, timeout: float) -> None:
        """``resolvers``: "host:port" strings (``upstreams.*.resolvers``); empty: the
        system's. ``timeout``: seconds for the whole lookup."""
        resolvers = tuple(resolvers)
        self._broken: str | None = None
        try:
            resolver = dns.asyncresolver.Resolver(configure=not resolvers)
        except dns.resolver.NoResolverConfiguration as error:
            resolver = dns.asyncresolver.Resolver(configure=False)
            self._broken = f"no system DNS configuration ({error})"
        if resolvers:
            resolver.nameservers = [_nameserver(text) for text in resolvers]
        else:
            resolver.use_search_by_default = True  # short names, as getaddrinfo does
        resolver.lifetime = timeout
        resolver.timeout = timeout
        self._resolver = resolver

    async def addresses(self, host: str) -> list[str]:
        """The IPs of ``host`` (empty when it has none); LookupFailed when DNS failed."""
        if self._broken is not None:
            raise LookupFailed(self._broken)
        try:
            return [str(ipaddress.ip_address(host))]  # a literal needs no lookup
        except ValueError:
            pass
        answers = await asyncio.gather(
            self._ask(host, "A"), self._ask(host, "AAAA"), return_exceptions=True
        )
        found: list[str] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                if isinstance(answer, asyncio.CancelledError):
                    raise answer
                raise LookupFailed(_describe(answer))
            found.extend(answer)
        return found

    async def _ask(self, host: str, rdtype: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(host, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [rdata.address for rdata in answer]


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    host, _, port = text.rpartition(":")
    return dns.nameserver.Do53Nameserver(host.strip("[]"), int(port))


def _describe(error: BaseException) -> str:
    if isinstance(error, dns.exception.Timeout):
        return "timed out"
    if isinstance(error, dns.resolver.NoNameservers):
        return "no DNS server answered usably (SERVFAIL or refused)"
    return str(error) or type(error).__name__


class ResolvedEntry:
    """One server entry with ``resolve``: where it is, and how to look it up."""

    __slots__ = ("failing", "host", "index", "lookup", "period", "port", "upstream")

    def __init__(self, upstream: str, index: int, server_cfg: Any, lookup: DnsLookup) -> None:
        self.upstream = upstream
        self.index = index  # in the upstream's `servers` list
        self.host = server_cfg.host
        self.port = server_cfg.port
        self.period = float(server_cfg.resolve)
        self.lookup = lookup
        self.failing = False  # logged once when lookups start failing, once when they recover

    async def resolve(self) -> list[Address] | None:
        """One lookup, counted; the addresses, or None when the last good set stays."""
        try:
            found = await self.lookup.addresses(self.host)
        except LookupFailed as error:
            metrics.dns_resolution(self.upstream, "failure")
            self._note_failing(f"failed ({error})")
            return None
        if not found:
            metrics.dns_resolution(self.upstream, "empty")
            self._note_failing("found no address")
            return None
        metrics.dns_resolution(self.upstream, "success")
        if self.failing:
            self.failing = False
            log.info(
                "DNS lookups of %s for upstream %s answer again",
                self.host,
                self.upstream,
                extra={"event": "dns", "upstream": self.upstream},
            )
        return sorted({(ip, self.port) for ip in found}, key=address_order)

    def _note_failing(self, what: str) -> None:
        if self.failing:
            return  # said once; the metric counts every one
        self.failing = True
        log.warning(
            "DNS lookup of %s for upstream %s %s: keeping its addresses until one succeeds",
            self.host,
            self.upstream,
            what,
            extra={"event": "dns", "upstream": self.upstream},
        )


OnAddresses = Callable[[ResolvedEntry, list[Address], bool], None]


class Discovery:
    """The lookup loops of one config generation's resolved entries."""

    def __init__(self, upstreams: dict[str, Any], on_addresses: OnAddresses) -> None:
        """``on_addresses(entry, addresses, ramp)``: apply a successful lookup; ``ramp``
        is False only for the first lookups at daemon start."""
        self.entries: list[ResolvedEntry] = []
        for name, upstream_cfg in upstreams.items():
            resolved = [cfg for cfg in upstream_cfg.servers if cfg.resolve]
            if not resolved:
                continue
            shortest = min(cfg.resolve for cfg in resolved)
            lookup = DnsLookup(
                upstream_cfg.resolvers, timeout=min(max(shortest, 1.0), MAX_LOOKUP_SECONDS)
            )
            for index, server_cfg in enumerate(upstream_cfg.servers):
                if server_cfg.resolve:
                    self.entries.append(ResolvedEntry(name, index, server_cfg, lookup))
        self._on_addresses = on_addresses
        self._tasks: list[asyncio.Task[None]] = []

    async def first_lookups(self, entries: Iterable[ResolvedEntry], *, ramp: bool) -> None:
        """Look ``entries`` up once, together, and apply what answered."""

        async def first(entry: ResolvedEntry) -> None:
            found = await entry.resolve()
            if found is not None:
                self._on_addresses(entry, found, ramp)

        await asyncio.gather(*(first(entry) for entry in entries))

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(entry), name=f"dns {entry.upstream} {entry.host}")
            for entry in self.entries
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, entry: ResolvedEntry) -> None:
        while True:
            await asyncio.sleep(entry.period)
            found = await entry.resolve()
            if found is not None:
                try:
                    self._on_addresses(entry, found, True)
                except Exception:  # one bad apply must not end discovery for good
                    log.exception("applying DNS addresses of %s failed", entry.host)
