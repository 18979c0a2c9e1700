"""The shared limiter on Redis Sentinel and Redis Cluster: real processes, no stand-ins.

Fixtures ``redis_sentinel`` (master + replica + 3 sentinels) and ``redis_cluster``
(3 masters + 3 replicas) start real ``redis-server`` / ``redis-sentinel`` processes, every
data node with a password the limiters read from ``password_env``. The failover tests
kill a master under a steady stream of checks and time every check.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.config import RedisConfig
from proxy.ratelimit import RateLimiter, RedisBackend
from proxy.ratelimit.limiter import DEFAULT_PROBE_INTERVAL
from tests.support.failover import Rule, limiter_failover
from tests.support.redis_server import PASSWORD_ENV

TIMEOUT = 0.1  # redis.timeout here: roomy for a loaded test machine
# The contract: no check waits more than about twice redis.timeout. The slack is for
# scheduling on a shared machine; a check waiting for a cancelled cluster call to unwind
# (measured at 0.8-1.1s) or for a failover (seconds) is far beyond it.
WAIT_BOUND = 2 * TIMEOUT + 0.15
EXACT_TIMEOUT = 1.0  # redis.timeout where only the counts are asserted
FROZEN = 0.001  # a rate so slow that no whole token refills while a test runs


@pytest.fixture(params=["sentinel", "cluster"])
def redis_set(request, monkeypatch):
    """The Sentinel set or the Cluster, its password in the environment."""
    redis_set = request.getfixturevalue(f"redis_{request.param}")
    monkeypatch.setenv(PASSWORD_ENV, redis_set.password)
    return redis_set


@pytest.fixture
async def make_limiter():
    """Limiters with their own client and pools each (as separate processes have)."""
    limiters = []

    def make(
        redis_set,
        *,
        instances: int = 1,
        errors=None,
        probe_interval=0.05,
        timeout=TIMEOUT,
        **options,
    ) -> RateLimiter:
        config = RedisConfig(**redis_set.redis_config(timeout=timeout, **options))
        limiter = RateLimiter(
            RedisBackend(config),
            instances=instances,
            on_backend_error=None if errors is None else errors.append,
            probe_interval=probe_interval,
        )
        limiters.append(limiter)
        return limiter

    yield make
    for limiter in limiters:
        await limiter.close()


def bucket_of(redis_set, key: str) -> str:
    """The Redis key of route ``api``'s bucket for ``key`` in this mode."""
    if redis_set.redis_config()["mode"] == "cluster":
        return f"sluicegate:rl:{{api:{key}}}"
    return f"sluicegate:rl:api:{key}"


def master_port_of(redis_set, bucket_key: str) -> int:
    if hasattr(redis_set, "master_port"):
        return redis_set.master_port()
    return redis_set.master_of(bucket_key)


def kill_master(
    redis_set, bucket_key: str, *, replicated: bool = False, freeze: bool = False
) -> int:
    """SIGKILL the master holding ``bucket_key``; ``replicated``: once its replica has
    every write so far (the test's choice; the proxy never waits for replication)."""
    port = master_port_of(redis_set, bucket_key)
    if replicated:
        with redis_set.servers[port].client() as client:
            assert client.execute_command("WAIT", 1, 5000) >= 1
    redis_set.kill(port, freeze=freeze)
    return port


async def admitted_by_two(first: RateLimiter, second: RateLimiter, key: str, burst: int):
    """30 checks of one bucket, alternating between two limiters."""
    rule = Rule(rate=FROZEN, burst=burst)
    decisions = []
    for i in range(30):
        limiter = first if i % 2 == 0 else second
        decisions.append(await limiter.check("api", key, rule))
    return decisions


async def test_limit_is_exact_and_shared(redis_set, make_limiter):
    errors: list[Exception] = []
    # Exactness does not depend on the timeout: a roomy one keeps a loaded machine from
    # turning a slow answer into a fallback decision.
    first = make_limiter(redis_set, errors=errors, timeout=EXACT_TIMEOUT)
    second = make_limiter(redis_set, errors=errors, timeout=EXACT_TIMEOUT)
    decisions = await admitted_by_two(first, second, "10.0.0.1", burst=10)
    assert [d.allowed for d in decisions] == [True] * 10 + [False] * 20
    assert [d.remaining for d in decisions[:10]] == list(range(9, -1, -1))
    assert not any(d.backend_failed for d in decisions) and errors == []


async def test_cluster_buckets_carry_a_hash_tag_and_spread_over_the_masters(
    redis_cluster, make_limiter, monkeypatch
):
    monkeypatch.setenv(PASSWORD_ENV, redis_cluster.password)
    limiter = make_limiter(redis_cluster, timeout=EXACT_TIMEOUT)
    keys = [f"10.0.0.{i}" for i in range(12)]
    for key in keys:
        assert (await limiter.check("api", key, Rule(rate=FROZEN, burst=3))).remaining == 2
    holders = set()
    for key in keys:
        bucket = bucket_of(redis_cluster, key)
        port = redis_cluster.master_of(bucket)
        with redis_cluster.servers[port].client() as client:
            assert client.hget(bucket, "tokens") == "2"
        holders.add(port)
    assert len(holders) > 1  # one slot per bucket, not one slot for all


async def test_failover_without_the_script_on_the_new_master(redis_set, make_limiter):
    """The promoted replica never ran the script (Redis replicates its effects only):
    EVALSHA gets NOSCRIPT there, and the check must still be answered from Redis."""
    limiter = make_limiter(redis_set, timeout=EXACT_TIMEOUT)
    rule = Rule(rate=FROZEN, burst=5)
    bucket = bucket_of(redis_set, "k")
    for remaining in (4, 3):
        assert (await limiter.check("api", "k", rule)).remaining == remaining
    old = kill_master(redis_set, bucket, replicated=True)
    await asyncio.to_thread(redis_set.wait_failover, old)
    new = master_port_of(redis_set, bucket)
    assert new != old
    sha = limiter._redis.script_sha
    with redis_set.servers[new].client() as client:
        assert client.script_exists(sha) == [False]
        assert int(float(client.hget(bucket, "tokens"))) == 3

    # The first check after the kill may find its old connection dead (fallback; the
    # probe then brings shared limiting back) or already reach the new master.
    await limiter.check("api", "k", rule)
    first_reached_redis = limiter.shared
    deadline = time.monotonic() + 10
    while not limiter.shared:
        assert time.monotonic() < deadline, "shared limiting did not resume"
        await asyncio.sleep(0.02)
    decision = await limiter.check("api", "k", rule)
    assert decision.allowed and not decision.backend_failed and limiter.shared
    # The replicated bucket, not a fresh or local one.
    assert decision.remaining == (1 if first_reached_redis else 2)
    with redis_set.servers[new].client() as client:
        assert client.script_exists(sha) == [True]


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_master_lost_under_a_steady_stream(redis_set, make_limiter, how, caplog):
    """Every check is answered, none waits much more than 2 x redis.timeout, and once the
    replica is promoted two limiters share one exact limit again. A killed master
    refuses connections at once; a frozen one (SIGSTOP: a hung host) accepts them and
    never answers, so every call to it runs into its deadline."""
    errors: list[Exception] = []
    # The default probe interval, as in production: each cluster probe after a failure
    # refreshes the slot map (tens of ms of CPU on a loaded machine).
    limiters = [
        make_limiter(redis_set, instances=2, errors=errors, probe_interval=DEFAULT_PROBE_INTERVAL)
        for _ in range(2)
    ]
    rule = Rule(rate=20.0, burst=20)
    bucket = bucket_of(redis_set, "stream")
    report = await limiter_failover(
        limiters,
        lambda: kill_master(redis_set, bucket, freeze=how == "frozen"),
        redis_set.wait_failover,
        rule=rule,
        key="stream",
    )
    print(report.summary())
    assert errors, "the kill was never noticed: the stream did not reach the dead master"
    assert report.longest_wait < WAIT_BOUND, report.summary()
    # Each limiter falls back when the master goes and comes back once it is replaced:
    # the probe must not declare Redis back while the dead master still holds slots
    # (then every probe interval would cost another failed batch). Once more at most,
    # for a check that misses its deadline on a loaded machine.
    trips = [r for r in caplog.records if "falls back from redis" in r.getMessage()]
    assert len(trips) <= 2 * len(limiters), [r.getMessage() for r in trips]
    assert report.samples[-1].started - report.killed_at > 1.0
    # Fallback during the failover (burst/instances each), shared buckets before and after.
    assert report.over_admitted <= rule.burst + rule.rate * report.shared_after, report.summary()

    # A run in which a check missed its deadline (a loaded machine) was decided by the
    # fallback, not by Redis: it does not count, a fresh bucket tries again.
    for attempt in range(3):
        errors_before = len(errors)
        decisions = await admitted_by_two(*limiters, key=f"after-failover-{attempt}", burst=10)
        if len(errors) == errors_before:
            break
        await asyncio.sleep(DEFAULT_PROBE_INTERVAL * 2)  # the probe closes the breaker
    assert [d.allowed for d in decisions] == [True] * 10 + [False] * 20
    assert not any(d.backend_failed for d in decisions)


@pytest.mark.parametrize(
    ("missing", "mode"), [("redis-sentinel", "sentinel"), ("redis-cli", "cluster")]
)
def test_under_ci_a_missing_tool_fails_the_test_instead_of_skipping_it(tmp_path, missing, mode):
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("redis-server", "redis-sentinel", "redis-cli"):
        if tool != missing and shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_limit_is_exact_and_shared[{mode}]"],
        env={**os.environ, "PATH": str(tools), "CI": "1"},
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert f"{missing} is not installed, and CI must run the Redis tests" in result.stdout
