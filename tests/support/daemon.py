"""The real daemon as a user runs it: ``sluicegate run -c FILE`` in a subprocess.

Fixture ``start_sluicegate(config, **options) -> Daemon`` writes ``config`` (a dict, or YAML
text) to a temp file, fills in free 127.0.0.1 ports for ``listen`` and ``admin`` when the
config has none, starts the process (``args``: more ``run`` options, e.g. ``--watch``) and
waits (bounded) until the admin API answers ``/healthz``. Every daemon started is stopped
at the end of the test. A config may listen on any loopback address (127.0.0.2...): the
helpers talk to the addresses it names.

Helpers for talking to it: ``raw_exchange`` (exact bytes in, bytes out — the hostile-input
tests), ``http_request`` (http.client, one request, returns status, headers, body).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# ``Daemon.signal`` (a method) shadows the module inside the class body.
SIGTERM = signal.SIGTERM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    def __init__(
        self,
        proc: subprocess.Popen,
        config_path: Path,
        log_path: Path,
        port: int,
        admin_port: int,
        config: dict[str, Any],
    ) -> None:
        self.proc = proc
        self.config_path = config_path
        self.log_path = log_path
        self.port = port
        self.admin_port = admin_port
        self.config = config
        self.host = config["listen"][0]["address"].rsplit(":", 1)[0]
        self.admin_host = config["admin"]["address"].rsplit(":", 1)[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def admin_url(self, path: str = "/") -> str:
        return f"http://{self.admin_host}:{self.admin_port}{path}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        """JSON log lines (access log and daemon events) written so far."""
        lines = []
        for line in self.logs().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def access_log(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if "request_id" in line and "status" in line]

    def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        return http_request(self.port, "GET", path, host=self.host, **kwargs)

    def admin(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        return http_request(self.admin_port, method, path, host=self.admin_host, **kwargs)

    def status(self) -> dict[str, Any]:
        status, _, body = self.admin("GET", "/status")
        assert status == 200, body
        return json.loads(body)

    def metrics(self) -> str:
        status, _, body = self.admin("GET", "/metrics")
        assert status == 200
        return body.decode()

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, signum: int = SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    host: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def raw_exchange(
    port: int, data: bytes, *, timeout: float = 5.0, read_until_close: bool = True
) -> bytes:
    """Send exact bytes; return what comes back until the server closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


def wait_for(
    predicate: Any, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def _fill_ports(config: dict[str, Any]) -> tuple[int, int]:
    if "listen" not in config:
        config["listen"] = [{"address": f"127.0.0.1:{free_port()}"}]
    if "admin" not in config:
        config["admin"] = {}
    if "address" not in config["admin"]:
        config["admin"]["address"] = f"127.0.0.1:{free_port()}"
    port = int(config["listen"][0]["address"].rsplit(":", 1)[1])
    admin_port = int(config["admin"]["address"].rsplit(":", 1)[1])
    return port, admin_port


def start_daemon(
    tmp_path: Path,
    config: dict[str, Any] | str,
    *,
    env: dict[str, str] | None = None,
    wait: bool = True,
    name: str = "sluicegate",
    timeout: float = 15.0,
    args: tuple[str, ...] = (),
) -> Daemon:
    if isinstance(config, str):
        config = yaml.safe_load(config)
    config = json.loads(json.dumps(config))  # the caller's dict stays untouched
    config.setdefault("logging", {}).setdefault("format", "json")
    port, admin_port = _fill_ports(config)
    config_path = tmp_path / f"{name}.yaml"
    log_path = tmp_path / f"{name}.log"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(config_path), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=full_env,
        )
    daemon = Daemon(proc, config_path, log_path, port, admin_port, config)
    if wait:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"sluicegate exited with {proc.returncode}:\n{daemon.logs()}")
            try:
                with urllib.request.urlopen(daemon.admin_url("/healthz"), timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                daemon.stop(signal.SIGKILL)
                raise AssertionError(f"sluicegate did not become healthy:\n{daemon.logs()}")
            time.sleep(0.05)
    return daemon


@pytest.fixture
def start_sluicegate(tmp_path: Path):
    started: list[Daemon] = []

    def start(config: dict[str, Any] | str, **options: Any) -> Daemon:
        daemon = start_daemon(tmp_path, config, **options)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
