"""Server health: pure hysteresis and flap damping, plus the active `HealthChecker`.

Pure parts (clock injected, no I/O):
- `Hysteresis` starts UNKNOWN and counts consecutive passes and fails. `healthy_threshold`
  passes in a row make it UP, `unhealthy_threshold` fails in a row make it DOWN (from
  UNKNOWN as from the other state). `observe` returns True when the status changed.
- `FlapDamper` counts UP<->DOWN flips. More than `max_flips` within `window` holds the
  server DOWN for `hold_down`; each further hold-down doubles it, until a calm period of
  2 * window without one resets it to `hold_down`.
- `ServerHealth` combines them: `status` is DOWN while held down, else the hysteresis
  status; `eligible` is True for UP and UNKNOWN (a server not yet checked takes traffic).
  It also keeps the last check's `CheckResult` (passed, when, and why it failed) for
  `/status`.

`HealthChecker` runs one asyncio task per server: a first check after a random delay in
[0, interval) (so servers and workers do not check in lockstep), then one every
interval ± 10 %. A check is `GET url+path` on a session the checker owns; it passes when
the status is within `expect_status` before `timeout`. The result goes to
`server.health.observe(ok, reason=..., at=...)` (`at`: wall-clock seconds) and to
`on_result(server, ok, reason)`.

Reload: a checker is bound to one server list. On reload, `await old.stop()` and
`new.start()`; health state survives because it lives in each server's `ServerHealth`,
which the runtime carries over for servers that stay.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger("sluicegate.health")

USER_AGENT = "sluicegate-health"


class HealthStatus(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Hysteresis:
    """Consecutive-result counter that flips status only after a run of equal results."""

    __slots__ = ("_fails", "_passes", "healthy_threshold", "status", "unhealthy_threshold")

    def __init__(self, healthy_threshold: int = 2, unhealthy_threshold: int = 3) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("thresholds must be >= 1")
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.status = HealthStatus.UNKNOWN
        self._passes = 0
        self._fails = 0

    def observe(self, ok: bool) -> bool:
        """Count one check result; True when it changed `status`."""
        if ok:
            self._passes += 1
            self._fails = 0
            if self.status is not HealthStatus.UP and self._passes >= self.healthy_threshold:
                self.status = HealthStatus.UP
                return True
        else:
            self._fails += 1
            self._passes = 0
            if self.status is not HealthStatus.DOWN and self._fails >= self.unhealthy_threshold:
                self.status = HealthStatus.DOWN
                return True
        return False

    @property
    def consecutive_passes(self) -> int:
        return self._passes

    @property
    def consecutive_fails(self) -> int:
        return self._fails


class FlapDamper:
    """Holds a flapping server down; the hold-down doubles for repeat offenders."""

    def __init__(
        self,
        max_flips: int,
        window: float,
        hold_down: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_flips < 1 or window <= 0 or hold_down <= 0:
            raise ValueError("max_flips >= 1, window > 0 and hold_down > 0 required")
        self.max_flips = max_flips
        self.window = window
        self.hold_down = hold_down
        self._clock = clock
        # Only the last max_flips + 1 flips can matter, so the deque stays bounded.
        self._flips: collections.deque[float] = collections.deque(maxlen=max_flips + 1)
        self._held_until: float | None = None
        self._next_hold = hold_down

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> FlapDamper:
        return cls(cfg.max_flips, cfg.window, cfg.hold_down, **kwargs)

    @property
    def held_down(self) -> bool:
        return self._held_until is not None and self._clock() < self._held_until

    @property
    def current_hold_down(self) -> float:
        """The length the next hold-down would have now (after any calm-period reset)."""
        return self._hold_length(self._clock())

    def record_flip(self) -> bool:
        """Note one UP<->DOWN flip; True when it starts a hold-down."""
        now = self._clock()
        if self.held_down:
            return False  # flips while held are the reason for the hold, not new evidence
        self._flips.append(now)
        while self._flips and now - self._flips[0] > self.window:
            self._flips.popleft()
        if len(self._flips) <= self.max_flips:
            return False
        length = self._hold_length(now)
        self._held_until = now + length
        self._next_hold = length * 2
        self._flips.clear()
        return True

    def _hold_length(self, now: float) -> float:
        if self._held_until is not None and now - self._held_until >= 2 * self.window:
            return self.hold_down  # calm long enough: forgive the past
        return self._next_hold


class CheckResult(NamedTuple):
    """One active check as `/status` shows it."""

    ok: bool
    reason: str  # "status 200", "timeout", "connect refused", ...
    at: float | None  # wall-clock seconds (time.time()) the check ended

    def status(self) -> dict[str, Any]:
        """``result`` pass|fail, ``at`` (ISO 8601 UTC, ms), ``reason`` (only when it failed)."""
        return {
            "result": "pass" if self.ok else "fail",
            "at": _iso_time(self.at) if self.at is not None else None,
            "reason": None if self.ok else self.reason,
        }


def _iso_time(seconds: float) -> str:
    whole = int(seconds)
    millis = min(999, int((seconds - whole) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class ServerHealth:
    """One server's health as seen by selection and `/status`."""

    def __init__(
        self,
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 3,
        *,
        flap_damping: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`flap_damping`: None, or an object with `max_flips`, `window`, `hold_down`."""
        self.hysteresis = Hysteresis(healthy_threshold, unhealthy_threshold)
        self.damper = (
            FlapDamper.from_config(flap_damping, clock=clock) if flap_damping is not None else None
        )
        self._reported = HealthStatus.UNKNOWN
        self.last_check: CheckResult | None = None

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> ServerHealth:
        """Build from a `HealthCheckConfig`-like object; `kwargs` may add `clock`."""
        return cls(
            cfg.healthy_threshold,
            cfg.unhealthy_threshold,
            flap_damping=getattr(cfg, "flap_damping", None),
            **kwargs,
        )

    @property
    def held_down(self) -> bool:
        return self.damper is not None and self.damper.held_down

    @property
    def status(self) -> HealthStatus:
        if self.held_down:
            return HealthStatus.DOWN
        return self.hysteresis.status

    @property
    def eligible(self) -> bool:
        return self.status is not HealthStatus.DOWN

    def last_check_status(self) -> dict[str, Any] | None:
        return self.last_check.status() if self.last_check is not None else None

    def observe(self, ok: bool, *, reason: str = "", at: float | None = None) -> bool:
        """Count one check result; True when `status` differs from the last observe.

        `reason` and `at` (wall-clock seconds) are kept as the last check for `/status`.
        A hold-down that ended between two checks is reported by the next one.
        """
        self.last_check = CheckResult(ok, reason, at)
        before = self.hysteresis.status
        if (
            self.hysteresis.observe(ok)
            and before is not HealthStatus.UNKNOWN  # the first verdict is not a flip
            and self.damper is not None
        ):
            self.damper.record_flip()
        status = self.status
        flipped = status is not self._reported
        self._reported = status
        return flipped


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts subclass it too
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if exc.os_error.errno == errno.ECONNREFUSED:
            return "connect refused"
        return f"connect error: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ClientError):
        return f"error: {type(exc).__name__}"
    return f"error: {exc!r}"


class HealthChecker:
    """Active checks for one upstream's servers (each has `.health`, and `.check_url` with
    `.check_host`: the URL to probe and the name it stands for, or None when the URL names
    it already). DNS discovery changes the servers: ``add`` and ``remove``."""

    def __init__(
        self,
        upstream_name: str,
        servers: Sequence[Any],
        cfg: Any,
        *,
        on_result: Callable[[Any, bool, str], None] | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`cfg`: a `HealthCheckConfig`-like object (path, interval, timeout, expect_status).
        `wall_clock`: stamps each result with the time of day `/status` shows."""
        self.upstream_name = upstream_name
        self.servers = tuple(servers)
        self.path = cfg.path if cfg.path.startswith("/") else "/" + cfg.path
        self.interval = float(cfg.interval)
        self.timeout = float(cfg.timeout)
        self.expect_low, self.expect_high = cfg.expect_status
        self.on_result = on_result
        self._rng = rng if rng is not None else random.Random()
        self._wall_clock = wall_clock
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[Any, asyncio.Task[None]] = {}

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        """Open the session and spawn one check loop per server (needs a running loop)."""
        if self._tasks:
            raise RuntimeError("health checker already started")
        # Own connections, closed after each check: a check must prove that a new
        # connection works, and must not hold idle sockets the data plane would want.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            auto_decompress=False,
        )
        self._tasks = {server: self._spawn(server) for server in self.servers}

    def _spawn(self, server: Any) -> asyncio.Task[None]:
        name = f"health {self.upstream_name} {server.check_url}"
        return asyncio.create_task(self._loop(server), name=name)

    def add(self, server: Any) -> None:
        """Check one more server (found by DNS), from now on."""
        if self._session is not None and server not in self._tasks:
            self._tasks[server] = self._spawn(server)

    def remove(self, server: Any) -> None:
        """Stop checking a server that left."""
        task = self._tasks.pop(server, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        """Cancel the loops and close the session; safe to call twice."""
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def check(self, server: Any) -> tuple[bool, str]:
        """One check of one server: (passed, reason)."""
        assert self._session is not None, "start() first"
        url = server.check_url.rstrip("/") + self.path
        name = server.check_host
        options: dict[str, Any] = {}
        if name is not None:  # an address found by DNS: Host and SNI name the URL's host
            options["headers"] = {"Host": urlsplit(server.url).netloc}
            if url.startswith("https:"):
                options["server_hostname"] = name
        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.get(url, allow_redirects=False, **options) as response:
                    status = response.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return False, _failure_reason(exc)
        return self.expect_low <= status <= self.expect_high, f"status {status}"

    async def _loop(self, server: Any) -> None:
        await asyncio.sleep(self._rng.uniform(0.0, self.interval))
        while True:
            ok, reason = await self.check(server)
            server.health.observe(ok, reason=reason, at=self._wall_clock())
            if self.on_result is not None:
                try:
                    self.on_result(server, ok, reason)
                except Exception:  # a metrics/log hook must not stop the checks
                    log.exception("health on_result hook failed for %s", server.check_url)
            await asyncio.sleep(self.interval * self._rng.uniform(0.9, 1.1))
