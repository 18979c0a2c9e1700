"""Fault-injecting upstreams: small raw-asyncio HTTP/1.1 servers that misbehave on purpose.

Every ``FaultServer`` listens on 127.0.0.1 (an ephemeral port) and is served by one shared
background thread running its own event loop, so it works the same from sync tests (which
make blocking calls to a daemon subprocess) and from async tests (whose own loop is never
blocked by it). A server counts what it saw: ``connections`` accepted, ``requests`` (full
request heads, health-check path excluded), ``health_requests``, and keeps ``bodies`` and
``paths`` of the counted requests.

Behaviour is a ``mode`` that can be switched at any time (``server.mode = "ok"``), which is
how a test makes a failing server "recover":

==================  ==========================================================================
``ok``              200 with ``body`` (default ``<name>\\n``), keep-alive
``status``          ``status`` (e.g. 500/502/503/504) with body ``<name> status <code>\\n``,
                    after ``delay`` seconds when set
``slow``            ``ok`` after ``delay`` seconds
``hang``            reads the request, never answers (the connection stays open)
``close``           reads the request, closes without a byte (FIN) -> ``error``
``reset``           reads the request, then RST (SO_LINGER 0) before any byte -> ``error``
``reset_head``      sends the first ``partial`` bytes of a response head, then RST
``reset_body``      sends a full head announcing ``body_size`` bytes, ``partial`` of them,
                    then RST (the client has response bytes: never retryable)
``stall_body``      like ``reset_body`` but then hangs instead of resetting
``malformed``       answers with a head that is not HTTP (-> ``invalid_header``)
==================  ==========================================================================

``refused_port()`` gives a port nobody listens on (connect refused), ``unanswered_port()``
one whose connects hang until the connect timeout. ``health_status``
(default 200) is what ``GET <health_path>`` answers, independently of ``mode``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

MODES = (
    "ok",
    "status",
    "slow",
    "hang",
    "close",
    "reset",
    "reset_head",
    "reset_body",
    "stall_body",
    "malformed",
)
REASONS = {
    200: "OK",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
MALFORMED_HEAD = b"HTTP/1.1 2x0 Broken\r\nThis is not a header line\r\n\r\n"


class _LoopThread:
    """One event loop in a daemon thread, shared by every fault server of the process."""

    _lock = threading.Lock()
    _instance: _LoopThread | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="fault-servers", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def call(self, coro: Any, timeout: float = 5.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def refused_port() -> int:
    """A 127.0.0.1 port that refuses connections (bound, then closed, never listened on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A 127.0.0.1 port whose connects hang: the TCP handshake never completes.

    A listener with a backlog of 0 whose one queue slot is taken by a connection nobody
    accepts: Linux then drops further SYNs (unless ``tcp_abort_on_overflow`` is set), as
    a host that is down or firewalled would. Only the connect timeout ends such a try.
    """
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        with socket.socket() as probe:
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                pass
            else:
                raise RuntimeError("connects to a full listen queue are answered here")
        yield port


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultServer:
    def __init__(
        self,
        name: str = "fault",
        mode: str = "ok",
        *,
        status: int = 503,
        delay: float = 0.0,
        partial: int = 10,
        body: bytes | None = None,
        body_size: int = 1000,
        health_path: str = "/health",
    ) -> None:
        self.name = name
        self.mode = mode
        self.status = status
        self.delay = delay
        self.partial = partial
        self.body = body
        self.body_size = body_size
        self.health_path = health_path
        self.health_status = 200
        self.connections = 0
        self.requests = 0
        self.health_requests = 0
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        self.methods: list[str] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._thread = _LoopThread.get()

    # -- lifecycle (called from any thread) -------------------------------------------------

    def start(self) -> FaultServer:
        self._thread.call(self._start())
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._thread.call(self._stop())

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        server, self._server = self._server, None
        assert server is not None
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:  # aborted transports end every handler (EOF or reset)
            await asyncio.wait(list(self._tasks), timeout=2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset_counts(self) -> None:
        self.connections = self.requests = self.health_requests = 0
        self.bodies.clear()
        self.paths.clear()
        self.methods.clear()

    def __repr__(self) -> str:
        return f"<FaultServer {self.name} {self.mode} :{self.port} requests={self.requests}>"

    # -- serving (in the loop thread) -------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, path, body = request
                if path == self.health_path or path.startswith(self.health_path + "?"):
                    self.health_requests += 1
                    writer.write(_response(self.health_status, b"health\n", close=True))
                    await writer.drain()
                    return
                self.requests += 1
                self.methods.append(method)
                self.paths.append(path)
                self.bodies.append(body)
                if not await self._answer(reader, writer, method):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str
    ) -> bool:
        """Answer one request as the current mode says; False closes the connection."""
        mode = self.mode
        if mode == "ok" or mode == "slow":
            if mode == "slow":
                await asyncio.sleep(self.delay)
            body = self.body if self.body is not None else self.name.encode() + b"\n"
            writer.write(_response(200, body, head_only=method == "HEAD", name=self.name))
            await writer.drain()
            return True
        if mode == "status":
            if self.delay:
                await asyncio.sleep(self.delay)
            body = self.body
            if body is None:
                body = b"%s status %d\n" % (self.name.encode(), self.status)
            writer.write(_response(self.status, body, head_only=method == "HEAD", name=self.name))
            await writer.drain()
            return True
        if mode == "hang":
            await _wait_for_eof(reader)  # until the peer goes or the server stops
            return False
        if mode == "close":
            writer.close()
            return False
        if mode == "reset":
            _rst(writer)
            return False
        if mode == "reset_head":
            head = _response(200, b"x" * 100, name=self.name)
            writer.write(head[: self.partial])
            await writer.drain()
            await asyncio.sleep(0.05)
            _rst(writer)
            return False
        if mode in ("reset_body", "stall_body"):
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Backend: %s\r\n\r\n" % (
                self.body_size,
                self.name.encode(),
            )
            writer.write(head + b"y" * min(self.partial, self.body_size - 1))
            await writer.drain()
            await asyncio.sleep(0.1)  # let the proxy relay the first bytes
            if mode == "stall_body":
                await _wait_for_eof(reader)
                return False
            _rst(writer)
            return False
        if mode == "malformed":
            writer.write(MALFORMED_HEAD)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
            return False
        raise ValueError(f"unknown fault mode {mode!r}")


async def _wait_for_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def _response(
    status: int, body: bytes, *, head_only: bool = False, close: bool = False, name: str = ""
) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % (
        status,
        REASONS.get(status, "Status").encode(),
        len(body),
    )
    if name:
        head += b"X-Backend: %s\r\n" % name.encode()
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + (b"" if head_only else body)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    """One request (method, path, body) or None at a clean end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip():
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from the proxy
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        body = b""
    return method, path, body


class FaultServers:
    """Factory that stops every server it started (the ``fault_server`` fixture)."""

    def __init__(self) -> None:
        self.started: list[FaultServer] = []

    def __call__(self, name: str = "fault", mode: str = "ok", **options: Any) -> FaultServer:
        server = FaultServer(name, mode, **options).start()
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            with contextlib.suppress(Exception):
                server.stop()
        self.started.clear()


@pytest.fixture
def fault_server() -> Iterator[FaultServers]:
    """``fault_server(name, mode, **options) -> FaultServer``, all stopped at test end."""
    servers = FaultServers()
    yield servers
    servers.stop_all()


# -- building configs and reading the daemon's view ------------------------------------------


def lb_config(
    servers: list[Any],
    *,
    policy: str = "round_robin",
    retry: dict[str, Any] | None = None,
    breaker: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    failure_on: list[str] | None = None,
    read: str = "400ms",
    connect: str = "300ms",
    keepalive: int | None = None,
    limits: dict[str, Any] | None = None,
    **upstream: Any,
) -> dict[str, Any]:
    """One upstream ``app`` behind one catch-all route. ``servers``: FaultServer, URL, or
    a dict (e.g. ``{"url": ..., "backup": True}``). The breaker defaults to one that never
    opens, so retry tests see every attempt; pass ``breaker`` to test it."""
    entries = []
    for server in servers:
        if isinstance(server, dict):
            entries.append(server)
        else:
            entries.append({"url": server if isinstance(server, str) else server.url})
    app: dict[str, Any] = {
        "policy": policy,
        "servers": entries,
        "timeouts": {"connect": connect, "read": read},
        "circuit_breaker": breaker or {"failure_threshold": 1000},
        "retry": {"tries": 3, "timeout": "5s", "on": ["error", "timeout"], **(retry or {})},
    }
    if failure_on is not None:
        app["failure_on"] = failure_on
    if health is not None:
        app["health_check"] = health
    if keepalive is not None:
        app["keepalive"] = keepalive
    app.update(upstream)
    config: dict[str, Any] = {
        "logging": {"level": "info", "access_log": True, "format": "json"},
        "upstreams": {"app": app},
        "routes": [{"name": "default", "match": {"path_prefix": "/"}, "upstream": "app"}],
    }
    if limits is not None:
        config["limits"] = limits
    return config


def _samples(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, label_text = metric.partition("{")
        if base != name:
            continue
        labels = {}
        for part in label_text.rstrip("}").split(","):
            if "=" in part:
                key, _, quoted = part.partition("=")
                labels[key] = quoted.strip('"')
        yield labels, float(value)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of ``name`` whose labels include ``labels``."""
    for found, value in _samples(text, name):
        if all(found.get(key) == want for key, want in labels.items()):
            return value
    return None


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of all samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for found, value in _samples(text, name)
        if all(found.get(key) == want for key, want in labels.items())
    )


def server_status(daemon: Any, index: int, upstream: str = "app") -> dict[str, Any]:
    return daemon.status()["upstreams"][upstream]["servers"][index]


def timed_request(
    daemon: Any,
    method: str = "GET",
    path: str = "/",
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes, float]:
    """One blocking request through the proxy: (status, headers, body, seconds)."""
    from tests.support.daemon import http_request

    started = time.monotonic()
    status, reply_headers, data = http_request(
        daemon.port, method, path, body=body, headers=headers, timeout=timeout
    )
    return status, reply_headers, data, time.monotonic() - started


def access_lines(daemon: Any, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The access log once it has at least ``count`` lines (it is written by a thread)."""
    from tests.support.daemon import wait_for

    return wait_for(
        lambda: (lines := daemon.access_log()) and len(lines) >= count and lines,
        timeout=timeout,
        message=f"{count} access log lines",
    )


def hits(*servers: FaultServer) -> list[int]:
    return [server.requests for server in servers]


# -- the fault matrix table (filled by tests/integration/test_fault_matrix.py) ---------------

#: (scenario, client status, attempts per backend "a/b/c", seconds) per scenario run.
FAULT_MATRIX: list[tuple[str, str, str, str]] = []


def format_fault_matrix(rows: list[tuple[str, str, str, str]]) -> list[str]:
    header = ("scenario", "client status", "attempts per backend", "seconds")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)) + " |"
    ]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        lines.append(
            "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        )
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FAULT_MATRIX:
        terminalreporter.section("fault matrix")
        for line in format_fault_matrix(FAULT_MATRIX):
            terminalreporter.write_line(line)
