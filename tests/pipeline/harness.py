"""The proxy built in process from a config dict, with fake clients and fake upstreams.

``PipelineProxy`` builds what the daemon builds for one generation (``Runtime``, the
in-memory rate limiter, a traffic ``ListeningAddress``) with every clock on the event
loop's virtual one, registers a ``FakeUpstream`` for each server address the config
names, and opens client connections: a ``FakeTransport`` pair between a real
``ClientConnection`` and a ``TestClient`` that sends raw bytes and parses what comes back.
What a test can look at is what the process exposes: the bytes a client received, what
each upstream received, ``Runtime.servers`` counters, the metrics registry, and the access
log's records.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
from typing import Any

from prometheus_client import REGISTRY

from proxy.config import parse_config
from proxy.control.daemon import ListeningAddress
from proxy.control.runtime import Runtime
from proxy.dataplane.client import ClientConnection
from proxy.observability.accesslog import AccessLog
from proxy.ratelimit.limiter import RateLimiter
from tests.pipeline.transports import FakeTransport
from tests.pipeline.upstreams import FakeUpstream, Handler, PipelineLoop, answer_ok

LISTEN = ("127.0.0.1", 8080)
RESPONSE_WAIT = 300.0  # virtual seconds a test waits for a response before failing


class RecordingAccessLog(AccessLog):
    """The access log's records, kept in a list (the real one writes them from a thread)."""

    def __init__(self) -> None:
        super().__init__(fmt="json", enabled=False)
        self.records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def log_line(self, line: str) -> None:
        self.records.append(json.loads(line))


class _Process:
    """What a ``ListeningAddress`` reads of the process that owns it."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.shutting_down = False
        self.closing_idle = False
        self.connections: set[ClientConnection] = set()

    def maybe_all_closed(self) -> None:
        pass


class Response:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = b""
        self.chunked = False
        self.interim: list[Response] = []  # the 1xx heads before this final one

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for n, v in self.headers if n.lower() == lowered), None)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} {self.body[:200]!r}>"


class TestClient(asyncio.Protocol):
    """A client of the proxy: sends raw bytes, parses the responses that come back.

    Responses are parsed by hand, not by httptools, so that HEAD answers (no body whatever
    Content-Length says), 1xx heads and a 101 (the rest is the tunnel's) are read the way
    a client that sent those requests reads them.
    """

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.transport: FakeTransport | None = None
        self.received = bytearray()
        self._unparsed = bytearray()
        self.responses: list[Response] = []
        self._interim: list[Response] = []
        self._methods: collections.deque[str] = collections.deque()
        self._taken = 0
        self.tunnel = bytearray()  # after a 101: the upstream's bytes
        self.upgraded = False
        self.eof = False
        self.lost = False
        self._changed = asyncio.Event()

    # -- sending -------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Raw bytes; a request's method is noted when ``data`` starts one (for HEAD)."""
        assert self.transport is not None
        self.transport.write(data)

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        *,
        host: str = "example.test",
    ) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
        names = set()
        for name, value in headers or []:
            lines.append(f"{name}: {value}")
            names.add(name.lower())
        if body is not None and "content-length" not in names and "transfer-encoding" not in names:
            lines.append(f"Content-Length: {len(body)}")
        self.expect(method)
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))

    def expect(self, method: str) -> None:
        """A request sent by hand (``send``): its response is read as ``method``'s."""
        self._methods.append(method)

    def stop_reading(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def start_reading(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()

    def reset(self) -> None:
        assert self.transport is not None
        self.transport.abort()

    # -- receiving -----------------------------------------------------------------------------

    async def response(self, timeout: float = RESPONSE_WAIT) -> Response:
        """The next final response (its 1xx heads in ``interim``), waiting for it."""
        async with asyncio.timeout(timeout):
            while self._taken >= len(self.responses):
                await self._wait()
        self._taken += 1
        return self.responses[self._taken - 1]

    async def closed(self, timeout: float = RESPONSE_WAIT) -> None:
        """Until the proxy has closed this connection."""
        async with asyncio.timeout(timeout):
            while not self.lost:
                await self._wait()

    async def received_bytes(self, expected: bytes, timeout: float = RESPONSE_WAIT) -> None:
        """Until ``expected`` is among the bytes received."""
        async with asyncio.timeout(timeout):
            while expected not in self.received:
                await self._wait()

    async def tunnel_bytes(self, count: int, timeout: float = RESPONSE_WAIT) -> bytes:
        async with asyncio.timeout(timeout):
            while len(self.tunnel) < count:
                await self._wait()
        taken = bytes(self.tunnel[:count])
        del self.tunnel[:count]
        return taken

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.upgraded:
            self.tunnel += data
        else:
            self._unparsed += data
            self._parse()
        self._changed.set()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._parse(eof=True)
        self._changed.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._parse(eof=True)
        self._changed.set()

    def _parse(self, eof: bool = False) -> None:
        while not self.upgraded:
            data = self._unparsed
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(data[:end]).decode("latin-1").split("\r\n")
            _, status_text, *reason = lines[0].split(" ", 2)
            status = int(status_text)
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers.append((name, value.strip()))
            response = Response(status, reason[0] if reason else "", headers)
            rest = bytes(data[end + 4 :])
            if 100 <= status < 200 and status != 101:
                self._interim.append(response)
                self._unparsed = bytearray(rest)
                continue
            method = self._methods[0] if self._methods else "GET"
            consumed = self._body(response, rest, method, eof)
            if consumed is None:
                return  # the body is not all here yet
            if self._methods:
                self._methods.popleft()
            response.interim, self._interim = self._interim, []
            self.responses.append(response)
            self._unparsed = bytearray(rest[consumed:])
            if status == 101:
                self.upgraded = True
                self.tunnel += self._unparsed
                self._unparsed.clear()

    @staticmethod
    def _body(response: Response, rest: bytes, method: str, eof: bool) -> int | None:
        """How many bytes of ``rest`` the body takes (None: not all here yet)."""
        if method == "HEAD" or response.status in (101, 204, 304):
            return 0
        if (response.header("transfer-encoding") or "").lower() == "chunked":
            response.chunked = True
            body = bytearray()
            at = 0
            while True:
                line_end = rest.find(b"\r\n", at)
                if line_end < 0:
                    return None
                size = int(rest[at:line_end].split(b";")[0], 16)
                at = line_end + 2
                if size == 0:
                    trailer_end = rest.find(b"\r\n", at)  # no trailers from the proxy
                    if trailer_end < 0:
                        return None
                    response.body = bytes(body)
                    return trailer_end + 2
                if len(rest) < at + size + 2:
                    return None
                body += rest[at : at + size]
                at += size + 2
        length = response.header("content-length")
        if length is not None:
            if len(rest) < int(length):
                return None
            response.body = rest[: int(length)]
            return int(length)
        if not eof:
            return None
        response.body = rest
        return len(rest)


def metric_samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
    }


class PipelineProxy:
    """One config generation served in process on the running ``PipelineLoop``."""

    def __init__(self, config: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, PipelineLoop), "tests/pipeline run on the PipelineLoop"
        self.loop = loop
        self.network = loop.network
        self.config = parse_config(config, "pipeline test")
        self.access_log = RecordingAccessLog()
        self.limiter = RateLimiter(None, clock=loop.time)
        self.runtime = Runtime(
            self.config,
            limiter=self.limiter,
            access_log=self.access_log,
            balancing_clock=loop.time,
        )
        self.process = _Process(self.runtime)
        self.listener = ListeningAddress(self.process, self.config.listen[0], None)  # type: ignore[arg-type]
        self.upstreams: dict[str, list[FakeUpstream]] = {}
        for name, upstream_cfg in self.config.upstreams.items():
            fakes = self.upstreams[name] = []
            for index, server_cfg in enumerate(upstream_cfg.servers):
                key = (server_cfg.host, server_cfg.port)
                fake = self.network.upstreams.get(key) or self.network.add(
                    FakeUpstream(f"{name}[{index}]", server_cfg.host, server_cfg.port)
                )
                fakes.append(fake)
        self.clients: list[TestClient] = []
        self._client_ports = itertools.count(40000)
        self._metrics_at_start = metric_samples()

    # -- the fake world --------------------------------------------------------------------------

    def upstream(self, name: str, index: int = 0) -> FakeUpstream:
        return self.upstreams[name][index]

    def script(self, name: str, handler: Handler = answer_ok, index: int = 0) -> FakeUpstream:
        upstream = self.upstream(name, index)
        upstream.handler = handler
        return upstream

    def connect(self, peer: str = "10.1.2.3") -> TestClient:
        client_end, proxy_end = FakeTransport.pair((peer, next(self._client_ports)), LISTEN)
        client = TestClient()
        client_end.connect(client)
        proxy_end.connect(ClientConnection(self.listener))
        self.clients.append(client)
        return client

    async def get(self, path: str = "/", **kwargs: Any) -> Response:
        """One request on a new connection; its response."""
        client = self.connect()
        client.request("GET", path, **kwargs)
        return await client.response()

    # -- what the process shows ----------------------------------------------------------------

    def server(self, upstream: str, index: int = 0) -> Any:
        """The runtime's ``Server`` for the config's ``index``-th server of ``upstream``."""
        cfg = self.config.upstreams[upstream].servers[index]
        return self.runtime.servers[upstream, cfg.url, f"{cfg.host}:{cfg.port}"]

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.access_log.records

    def metric(self, name: str, **labels: str) -> float:
        """How much the sample ``name{labels}`` moved since this proxy was built."""
        key = (name, frozenset(labels.items()))
        now = REGISTRY.get_sample_value(name, labels) or 0.0
        return now - self._metrics_at_start.get(key, 0.0)

    def now(self) -> float:
        """Virtual seconds since the loop started."""
        return self.loop.elapsed()

    async def settle(self, rounds: int = 50) -> None:
        """Let every callback that is ready run, without moving the clock."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def record(self, count: int = 1) -> dict[str, Any]:
        """The ``count``-th access record, once written (at the exchange's very end)."""
        async with asyncio.timeout(RESPONSE_WAIT):
            while len(self.records) < count:
                await asyncio.sleep(0.01)
        return self.records[count - 1]

    async def stop(self) -> None:
        """Close every connection; a script that raised fails the test here."""
        for client in self.clients:
            if client.transport is not None and not client.lost:
                client.transport.abort()
        for server in self.runtime.servers.values():
            server.pool.close_idle()
        self.network.stop()
        await self.settle()
        errors = [error for fakes in self.upstreams.values() for f in fakes for error in f.errors]
        if errors:
            raise errors[0]
