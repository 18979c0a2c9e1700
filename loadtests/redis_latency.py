"""Extra latency of a request rate-limited through Redis, over the same request unlimited.

    python loadtests/redis_latency.py [--requests 2000] [--warmup 200]

Starts a tiny origin, a throwaway redis-server and `sluicegate run` on free loopback ports.
Sends sequential requests on two keep-alive connections, interleaved: one to a route
limited through Redis (one script call per request, a limit never reached), one to an
unlimited route. Prints the median and p99 of both and their difference, checks that every
limited request really went to Redis (no fallback hid the cost), and stops everything.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtests.bench import free_port, spawn, stop_process, wait_port  # noqa: E402

LIMIT = 1_000_000  # per second, and the burst: never reached


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed_get(
    conn: http.client.HTTPConnection, path: str
) -> tuple[float, http.client.HTTPResponse]:
    started = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return time.perf_counter() - started, response


def measure(port: int, requests: int, warmup: int) -> tuple[list[float], list[float]]:
    limited_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    free_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    limited: list[float] = []
    free: list[float] = []
    try:
        for i in range(warmup + requests):
            seconds, response = timed_get(limited_conn, "/api")
            if response.status != 200 or response.getheader("RateLimit-Limit") != str(LIMIT):
                raise RuntimeError(f"limited route answered {response.status}")
            free_seconds, response = timed_get(free_conn, "/free")
            if response.status != 200:
                raise RuntimeError(f"unlimited route answered {response.status}")
            if i >= warmup:
                limited.append(seconds)
                free.append(free_seconds)
    finally:
        limited_conn.close()
        free_conn.close()
    return limited, free


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per route")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        print("redis-server is needed: scripts/ensure-tools.sh bench installs it", file=sys.stderr)
        return 1
    import redis

    workdir = Path(tempfile.mkdtemp(prefix="sluicegate-redis-latency-"))
    origin_port, redis_port, port, admin_port = (free_port() for _ in range(4))
    config = workdir / "limited.yaml"
    config.write_text(
        f"listen: [{{address: '127.0.0.1:{port}'}}]\n"
        f"admin: {{address: '127.0.0.1:{admin_port}'}}\n"
        "logging: {level: warning, access_log: false}\n"
        f"redis: {{url: 'redis://127.0.0.1:{redis_port}/0', timeout: 200ms}}\n"
        f"upstreams: {{origin: {{servers: [{{url: 'http://127.0.0.1:{origin_port}'}}]}}}}\n"
        "routes:\n"
        "  - {name: api, match: {path_prefix: /api}, upstream: origin,\n"
        f"     rate_limit: {{rate: {LIMIT}/s, burst: {LIMIT}, key: route}}}}\n"
        "  - {name: free, match: {path_prefix: /free}, upstream: origin}\n"
    )
    bench = Path(__file__).resolve().parent / "bench.py"
    processes = []
    try:
        origin = spawn(
            [sys.executable, str(bench), "--origin", str(origin_port)], workdir / "o.log"
        )
        processes.append(origin)
        wait_port(origin_port, origin, "origin")
        redis_cmd = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"]
        redis_cmd += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
        redis_server = spawn(redis_cmd, workdir / "redis.log")
        processes.append(redis_server)
        wait_port(redis_port, redis_server, "redis-server")
        proxy = spawn([sys.executable, "-m", "proxy", "run", "-c", str(config)], workdir / "p.log")
        processes.append(proxy)
        wait_port(port, proxy, "sluicegate")

        limited, free = measure(port, args.requests, args.warmup)

        client = redis.Redis(port=redis_port, decode_responses=True)
        calls = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        client.close()
        if calls < args.requests + args.warmup:
            print(f"only {calls} Redis script calls: some checks fell back", file=sys.stderr)
            return 1
        ms = {
            name: (statistics.median(values) * 1000, percentile(values, 0.99) * 1000)
            for name, values in (("limited", limited), ("unlimited", free))
        }
        print(
            f"{args.requests} sequential keep-alive requests each:"
            f"\n  redis-limited  median {ms['limited'][0]:.3f}ms  p99 {ms['limited'][1]:.3f}ms"
            f"\n  unlimited      median {ms['unlimited'][0]:.3f}ms  p99 {ms['unlimited'][1]:.3f}ms"
            f"\n  extra          median {ms['limited'][0] - ms['unlimited'][0]:.3f}ms"
            f"  p99 {ms['limited'][1] - ms['unlimited'][1]:.3f}ms"
        )
        return 0
    finally:
        for process in reversed(processes):
            stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
