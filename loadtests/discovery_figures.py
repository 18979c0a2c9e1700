"""Figures for upstreams that come and go: the slow-start ramp as measured in traffic, and
how long an address DNS adds or removes takes to show in traffic.

    python loadtests/discovery_figures.py [--ramp 5] [--rounds 5]

Starts the test DNS server (tests/support/dnsserver.py), three demo backends on
127.0.0.2-4 (one port), and `sluicegate run` with `resolve: 200ms`, `slow_start: RAMP`,
round_robin. Four client threads send requests throughout and note which backend
answered each. Then:

- ramp: 127.0.0.4 is added; its share of each second's requests, relative to its fair
  share (1/3), next to what the ramp predicts (weight fraction f against two servers at
  full weight: 3f / (2 + f), f taken mid-second);
- add/remove: in each round 127.0.0.4 is removed and added again; the time from the DNS
  change to the last request it got (removal) and to its first one (addition).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.backends import free_port, spawn_backend_process, stop_process  # noqa: E402
from tests.support.daemon import http_request, start_daemon  # noqa: E402
from tests.support.dnsserver import DnsServer  # noqa: E402

PERIOD = 0.2


class Traffic:
    """Client threads that keep asking; `hits` is (time, backend) of each answer."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.hits: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, headers, _ = http_request(self.port, "GET", "/")
            if status == 200:
                self.hits.append((time.monotonic(), headers.get("x-backend", "")))

    def since(self, t: float) -> list[tuple[float, str]]:
        return [hit for hit in list(self.hits) if hit[0] >= t]


def ramp_share(traffic: Traffic, dns: DnsServer, ramp: float) -> None:
    dns.set("api.test", "127.0.0.2", "127.0.0.3", "127.0.0.4")
    changed = time.monotonic()
    time.sleep(ramp + 2.0)
    hits = traffic.since(changed)
    first = next(t for t, name in hits if name == "b4")
    print(
        f"\nslow start over {ramp:g}s (first request on the new address "
        f"{(first - changed) * 1000:.0f} ms after the DNS change)"
    )
    print("  second   requests   new server's share / fair share   predicted")
    for second in range(int(ramp) + 2):
        window = [name for t, name in hits if first + second <= t < first + second + 1]
        if not window:
            continue
        relative = window.count("b4") / len(window) * 3
        fraction = min(1.0, 0.1 + 0.9 * (second + 0.5) / ramp)
        predicted = 3 * fraction / (2 + fraction)
        print(f"  {second}-{second + 1}s   {len(window):8d}   {relative:30.2f}   {predicted:9.2f}")


def add_remove(traffic: Traffic, dns: DnsServer, rounds: int) -> None:
    removals, additions = [], []
    for _ in range(rounds):
        dns.set("api.test", "127.0.0.2", "127.0.0.3")
        changed = time.monotonic()
        time.sleep(1.5)
        last = max((t for t, name in traffic.since(changed) if name == "b4"), default=changed)
        removals.append(last - changed)
        dns.set("api.test", "127.0.0.2", "127.0.0.3", "127.0.0.4")
        changed = time.monotonic()
        time.sleep(1.5)
        first = min(t for t, name in traffic.since(changed) if name == "b4")
        additions.append(first - changed)

    def describe(values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return f"median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms"

    print(f"\nresolve: {PERIOD * 1000:.0f}ms, {rounds} rounds")
    print(f"  removed address: last request {describe(removals)} after the DNS change")
    print(f"  added address:   first request {describe(additions)} after the DNS change")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ramp", type=float, default=5.0, help="slow_start in seconds")
    parser.add_argument("--rounds", type=int, default=5, help="add/remove rounds")
    args = parser.parse_args()
    dns = DnsServer().start()
    dns.set("api.test", "127.0.0.2", "127.0.0.3")
    port = free_port()
    backends = [
        spawn_backend_process(f"b{octet}", host=f"127.0.0.{octet}", port=port)[0]
        for octet in (2, 3, 4)
    ]
    config = {
        "logging": {"access_log": False},
        "upstreams": {
            "api": {
                "servers": [{"url": f"http://api.test:{port}", "resolve": f"{PERIOD}s"}],
                "resolvers": [dns.address],
                "slow_start": f"{args.ramp}s",
            }
        },
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "api"}],
    }
    with tempfile.TemporaryDirectory() as tmp:
        daemon = start_daemon(Path(tmp), config)
        try:
            with Traffic(daemon.port) as traffic:
                time.sleep(0.5)
                ramp_share(traffic, dns, args.ramp)
                add_remove(traffic, dns, args.rounds)
        finally:
            daemon.stop()
            for proc in backends:
                stop_process(proc)
            dns.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
