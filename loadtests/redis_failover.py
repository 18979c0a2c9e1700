"""The limiter through a Redis failover: the figures README's "Redis modes" section quotes.

For each mode (Sentinel: 1 master + 1 replica + 3 sentinels; Cluster: 3 masters + 3
replicas), starts real processes in a temp dir, drives two real ``RateLimiter`` objects
(two proxy instances: ``instances: 2``) with one check every 5 ms on one bucket
(rate 20/s, burst 20, ``on_redis_error: local``), and ``--rounds`` times loses the
master that holds the bucket (SIGKILL, or SIGSTOP with ``--freeze``: a hung host) in the
middle of the stream. Prints, per mode, the longest wait for one check and the
over-admission (admitted - what one shared bucket admits over the stream).

    .venv/bin/python loadtests/redis_failover.py [--rounds 3] [--timeout 0.05] [--freeze]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.config import RedisConfig
from proxy.ratelimit import RateLimiter, RedisBackend
from tests.support.failover import FailoverReport, Rule, limiter_failover
from tests.support.redis_server import PASSWORD_ENV, ClusterSet, SentinelSet


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not installed (scripts/ensure-tools.sh test installs it)")
    return path


async def one_round(mode: str, timeout: float, freeze: bool) -> FailoverReport:
    with tempfile.TemporaryDirectory(prefix=f"sg-{mode}-") as workdir:
        if mode == "sentinel":
            redis_set = SentinelSet(
                _binary("redis-server"), _binary("redis-sentinel"), Path(workdir)
            )
            bucket = "sluicegate:rl:api:stream"
        else:
            redis_set = ClusterSet(_binary("redis-server"), _binary("redis-cli"), Path(workdir))
            bucket = "sluicegate:rl:{api:stream}"
        try:
            redis_set.start()
            os.environ[PASSWORD_ENV] = redis_set.password
            config = RedisConfig(**redis_set.redis_config(timeout=timeout))
            limiters = [RateLimiter(RedisBackend(config), instances=2) for _ in range(2)]

            def kill() -> int:
                port = (
                    redis_set.master_port() if mode == "sentinel" else redis_set.master_of(bucket)
                )
                redis_set.kill(port, freeze=freeze)
                return port

            try:
                return await limiter_failover(
                    limiters, kill, redis_set.wait_failover, rule=Rule(), key="stream"
                )
            finally:
                for limiter in limiters:
                    await limiter.close()
        finally:
            redis_set.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=0.05, help="redis.timeout, seconds")
    parser.add_argument("--freeze", action="store_true", help="SIGSTOP the master, not SIGKILL")
    parser.add_argument("--modes", default="sentinel,cluster")
    args = parser.parse_args()
    how = "frozen (SIGSTOP)" if args.freeze else "killed (SIGKILL)"
    print(f"redis.timeout {args.timeout * 1000:g}ms, master {how}, rate 20/s burst 20, "
          "2 limiters (instances: 2), one check every 5ms")  # fmt: skip
    for mode in args.modes.split(","):
        reports = []
        for round_number in range(1, args.rounds + 1):
            report = await one_round(mode, args.timeout, args.freeze)
            reports.append(report)
            print(f"  {mode} round {round_number}: {report.summary()}", flush=True)
        worst_wait = max(report.longest_wait for report in reports)
        overs = [report.over_admitted for report in reports]
        print(
            f"{mode}: longest limiter wait {worst_wait * 1000:.0f}ms over {len(reports)} "
            f"failovers; over-admission {min(overs)}-{max(overs)} (burst {Rule().burst})"
        )


if __name__ == "__main__":
    asyncio.run(main())
