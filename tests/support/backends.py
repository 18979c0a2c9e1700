"""Demo backends for tests: in-process (fast) and as subprocesses (for daemon tests).

Use as a plugin (``pytest_plugins = ["tests.support.backends"]`` in the root conftest)
or import the fixtures by name. Fixtures:

- ``start_backend``: async factory ``await start_backend(name=None) -> RunningBackend``
  serving :func:`proxy.demo.backend.build_backend_app` on 127.0.0.1, an ephemeral port;
  every backend started is stopped at test end.
- ``spawn_backend``: factory ``spawn_backend(name=None) -> (Popen, port)`` running
  ``python -m proxy backend``; every process started is terminated at test end.

Plain helpers: :func:`spawn_backend_process`, :func:`free_port`, :func:`stop_process`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from proxy.demo.backend import STATE, build_backend_app

REPO_ROOT = Path(__file__).resolve().parents[2]


class RunningBackend:
    """A demo backend served in-process; ``hits`` counts requests (as ``/count`` does)."""

    def __init__(self, name: str | None = None) -> None:
        self._requested_name = name
        self.app = build_backend_app(name or "backend")
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.host = "127.0.0.1"

    async def start(self) -> RunningBackend:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the bound ephemeral port
        if self._requested_name is None:
            self.app[STATE].name = f"backend-{self.port}"
        return self

    async def stop(self) -> None:
        """Close the listener and all connections (a test can kill a server mid-test)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def name(self) -> str:
        return self.app[STATE].name

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def hits(self) -> int:
        return self.app[STATE].hits

    @property
    def healthy(self) -> bool:
        return self.app[STATE].healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        """False makes ``/health`` answer 503 (same as ``POST /health/fail``)."""
        self.app[STATE].healthy = value

    def reset_hits(self) -> None:
        self.app[STATE].hits = 0


@pytest_asyncio.fixture
async def start_backend():
    started: list[RunningBackend] = []

    async def _start(name: str | None = None) -> RunningBackend:
        backend = await RunningBackend(name).start()
        started.append(backend)
        return backend

    yield _start
    for backend in reversed(started):
        await backend.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (tiny race; good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_http_ok(url: str, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; raise RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
                last = f"status {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return proc.returncode


def spawn_backend_process(
    name: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 10.0,
) -> tuple[subprocess.Popen, int]:
    """Run ``python -m proxy backend --port P [--name N]``; return it once /health is 200.

    ``host`` may be any of 127.0.0.0/8 (all loopback here): servers that DNS discovery
    finds share one port, and differ by address."""
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "proxy", "backend", "--host", host, "--port", str(port)]
    if name is not None:
        cmd += ["--name", name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A file, not a pipe: nobody reads stderr while the backend runs, a pipe could fill up.
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors
        )
        try:
            wait_http_ok(f"http://{host}:{port}/health", timeout=timeout, proc=proc)
        except RuntimeError as exc:
            stop_process(proc)
            errors.seek(0)
            stderr = errors.read().decode(errors="replace")
            raise RuntimeError(f"backend {name or port} did not start: {exc}\n{stderr}") from None
    return proc, port


@pytest.fixture
def spawn_backend():
    procs: list[subprocess.Popen] = []

    def _spawn(name: str | None = None, **options: Any) -> tuple[subprocess.Popen, int]:
        proc, port = spawn_backend_process(name, **options)
        procs.append(proc)
        return proc, port

    yield _spawn
    for proc in reversed(procs):
        stop_process(proc)
