"""HealthChecker against real aiohttp servers on 127.0.0.1 ephemeral ports.

Intervals are 50 ms: these are real network timings, so every wait is bounded by a
deadline and asserts on state, never on how many checks happened in a given time.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from aiohttp import web

from proxy.balancing.health import USER_AGENT, HealthChecker, HealthStatus, ServerHealth

UP, DOWN, UNKNOWN = HealthStatus.UP, HealthStatus.DOWN, HealthStatus.UNKNOWN


class HealthEndpoint:
    """A server whose /health answers as `mode` says: "ok" 200, "fail" 500, "hang"."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.user_agents: list[str] = []
        self.release = asyncio.Event()  # lets hanging handlers finish at teardown
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.user_agents.append(request.headers.get("User-Agent", ""))
        if self.mode == "hang":
            await self.release.wait()
        return web.Response(status=200 if self.mode == "ok" else 500, text=self.mode)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass(eq=False)
class FakeServer:
    url: str
    health: ServerHealth = field(default_factory=lambda: ServerHealth(2, 2))
    check_host: str | None = None  # set for an address found by DNS

    @property
    def check_url(self) -> str:
        return self.url


@pytest.fixture
async def endpoint():
    server = HealthEndpoint()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def checkers():
    started: list[HealthChecker] = []
    yield started
    for checker in started:
        await checker.stop()


def config(**overrides) -> SimpleNamespace:
    values = {"path": "/health", "interval": 0.05, "timeout": 0.2, "expect_status": (200, 399)}
    return SimpleNamespace(**{**values, **overrides})


def start_checker(checkers, servers, results=None, **cfg) -> HealthChecker:
    """Start a checker; each result is appended to `results` as (server, ok, reason, status
    right after the check), so tests can assert exact sequences whatever the timing."""

    def on_result(server, ok, reason):
        if results is not None:
            results.append((server, ok, reason, server.health.status))

    checker = HealthChecker(
        "api", servers, config(**cfg), on_result=on_result, rng=random.Random(1)
    )
    checker.start()
    checkers.append(checker)
    return checker


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def refused_url() -> str:
    # Bind then close: nothing listens on this port afterwards (the OS does not reuse an
    # ephemeral port that quickly).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_healthy_server_goes_up_after_healthy_threshold(endpoint, checkers):
    server = FakeServer(endpoint.url)
    results: list = []
    start_checker(checkers, [server], results)
    await wait_until(lambda: server.health.status is UP)
    assert [status for *_, status in results[:2]] == [UNKNOWN, UP]  # threshold 2
    assert all(ok and reason == "status 200" for _, ok, reason, _ in results)
    assert results[0][0] is server
    assert set(endpoint.user_agents) == {USER_AGENT}


async def test_server_answering_500_goes_down(endpoint, checkers):
    endpoint.mode = "fail"
    server = FakeServer(endpoint.url)
    results: list = []
    start_checker(checkers, [server], results)
    await wait_until(lambda: server.health.status is DOWN)
    assert (server, False, "status 500", DOWN) in results
    assert not server.health.eligible


async def test_expect_status_range_is_honoured(endpoint, checkers):
    endpoint.mode = "fail"
    server = FakeServer(endpoint.url)
    start_checker(checkers, [server], expect_status=(200, 599))
    await wait_until(lambda: server.health.status is UP)


async def test_hanging_server_times_out_and_goes_down(endpoint, checkers):
    endpoint.mode = "hang"
    server = FakeServer(endpoint.url)
    results: list = []
    start_checker(checkers, [server], results, timeout=0.1)
    await wait_until(lambda: server.health.status is DOWN)
    assert {reason for _, _, reason, _ in results} == {"timeout"}


async def test_refused_port_goes_down(checkers):
    server = FakeServer(refused_url())
    results: list = []
    start_checker(checkers, [server], results)
    await wait_until(lambda: server.health.status is DOWN)
    assert {(ok, reason) for _, ok, reason, _ in results} == {(False, "connect refused")}


async def test_recovery_back_to_up(endpoint, checkers):
    endpoint.mode = "fail"
    server = FakeServer(endpoint.url)
    results: list = []
    start_checker(checkers, [server], results)
    await wait_until(lambda: server.health.status is DOWN)
    endpoint.mode = "ok"
    await wait_until(lambda: server.health.status is UP)
    assert server.health.eligible
    after_recovery = [(ok, status) for _, ok, _, status in results if ok]
    assert after_recovery[:2] == [(True, DOWN), (True, UP)]  # hysteresis on the way back


async def test_each_server_is_checked_on_its_own(endpoint, checkers):
    good = FakeServer(endpoint.url)
    dead = FakeServer(refused_url())
    start_checker(checkers, [good, dead])
    await wait_until(lambda: good.health.status is UP and dead.health.status is DOWN)


async def test_stop_ends_checks_and_is_idempotent(endpoint, checkers):
    server = FakeServer(endpoint.url)
    results: list = []
    checker = start_checker(checkers, [server], results)
    await wait_until(lambda: len(results) >= 2)
    await checker.stop()
    assert not checker.running
    seen = len(results)
    await asyncio.sleep(0.2)  # several intervals: nothing more may arrive
    assert len(results) == seen
    await checker.stop()


async def test_a_failing_result_hook_does_not_stop_the_checks(endpoint, checkers):
    server = FakeServer(endpoint.url)
    calls = []

    def broken_hook(server, ok, reason):
        calls.append(ok)
        raise RuntimeError("metrics exploded")

    checker = HealthChecker("api", [server], config(), on_result=broken_hook)
    checker.start()
    checkers.append(checker)
    await wait_until(lambda: len(calls) >= 3)
    assert server.health.status is UP


async def test_start_twice_is_an_error(endpoint, checkers):
    checker = start_checker(checkers, [FakeServer(endpoint.url)])
    with pytest.raises(RuntimeError):
        checker.start()


async def test_each_result_is_kept_on_the_server_with_its_time_and_reason(checkers):
    server = FakeServer(refused_url())
    checker = HealthChecker(
        "api", [server], config(), rng=random.Random(1), wall_clock=lambda: 1_700_000_000.5
    )
    checker.start()
    checkers.append(checker)
    await wait_until(lambda: server.health.last_check is not None)
    assert server.health.last_check_status() == {
        "result": "fail",
        "at": "2023-11-14T22:13:20.500Z",
        "reason": "connect refused",
    }
