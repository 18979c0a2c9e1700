"""pytest plugin: a throwaway ``redis-server`` on a free 127.0.0.1 port.

The ``redis_server`` fixture (function scoped, so every test starts from an empty Redis)
yields a ``RedisServer`` with ``.url``, ``.port``, ``.stop()`` (kill it, for outage
tests), ``.start()`` (start it again on the same port). No persistence, no snapshot files.
When ``redis-server`` is not installed the test is skipped, except under CI (env ``CI``
set), where a missing server must not hide the Redis tests: it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _debug_command_flag(binary: str) -> list[str]:
    # Redis 7 refuses DEBUG (used to simulate a slow server) unless enabled; Redis 6
    # does not know the option and would refuse to start with it.
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    version = out.split("v=", 1)[1].split()[0] if "v=" in out else "0"
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    return ["--enable-debug-command", "local"] if major >= 7 else []


class RedisServer:
    """One redis-server process, restartable on the same port."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._process: subprocess.Popen[bytes] | None = None
        self._extra_args = _debug_command_flag(binary)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (again) on ``self.port`` and wait until it answers PING."""
        if self.running:
            return
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        # A throwaway server: no snapshots, no append-only file left behind.
        command += ["--save", "", "--appendonly", "no", *self._extra_args]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Kill the server at once, as a crash would (SIGKILL), and reap it."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(timeout=START_TIMEOUT)
        self._process = None

    def client(self) -> redis.Redis:
        """A plain synchronous client, for looking into the server from a test."""
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI must run the Redis tests")
        pytest.skip("install redis-server to run the Redis tests")
    server = RedisServer(binary, _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
