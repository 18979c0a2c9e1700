"""Grammar fuzzing of the daemon, both sides, with fixed seeds (the same inputs every run).

Client side: pipelines of requests, most well-formed and some hostile (bad framing,
smuggling shapes, bad bytes in heads, truncations, upgrades), each connection half-closed
after sending. Upstream side: scripted responses, many malformed. What must hold whatever
the bytes:

- every answer starts with a status line; each request is answered at most once, in order;
- a half-closed connection is finished promptly (nothing waits for bytes that cannot come);
- a well-formed upstream response reaches the client whole, a malformed one is a 502 or a
  cut, never relayed;
- no access line without a status, no traceback, and the daemon keeps serving.

The bugs these found when written (a FIN mid-body waiting for client_body_timeout, a
refused request started anyway from the queue, a second upstream response relayed, a
status-0 access line) each have their own exact test as well.
"""

from __future__ import annotations

import random
import re
import socket
import time
from typing import Any

import httptools
import pytest

from tests.support.backends import spawn_backend_process, stop_process
from tests.support.daemon import http_request, wait_for

STATUS_LINE = re.compile(rb"^HTTP/1\.[01] [1-5]\d\d ")
CASE_ID = re.compile(rb"X-Request-ID: (case-\d+)")


# -- client side --------------------------------------------------------------------------------


class RequestGrammar:
    """Random requests; well-formed ones carry ``X-Request-ID: case-N`` to be traced back."""

    METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")
    TARGETS = (b"/", b"/echo", b"/limited/echo", b"/delay/20", b"/status/502", b"/bytes/30000")
    HOSTILE_LINES = (
        b"G ET / HTTP/1.1",
        b"GET / HTTP/2.0",
        b"GET /a b HTTP/1.1",
        b"CONNECT a:443 HTTP/1.1",
        b"GET http://elsewhere.example/ HTTP/1.1",
        b"GET / HTTX/1.1",
        b"\x16\x03\x01\x00",
    )
    HOSTILE_HEADERS = (
        b"Content-Length: 5\r\nTransfer-Encoding: chunked",
        b"Content-Length: 5\r\nContent-Length: 6",
        b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: chunked, gzip",
        b"X-Fold: a\r\n  folded",
        b"X-Nul: a\x00b",
        b"Bad Name: 1",
        b"Host: second.example",
        b"Connection: Upgrade\r\nUpgrade: websocket",
        b"X-Long: " + b"v" * 20000,
    )

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.count = 0

    def body(self, framing: str) -> tuple[bytes, bytes]:
        data = self.rnd.randbytes(self.rnd.choice([10, 3000, 40000]))
        if framing == "length":
            return b"Content-Length: %d\r\n" % len(data), data
        chunks, i = [], 0
        while i < len(data):
            piece = data[i : i + self.rnd.randint(1, 5000)]
            chunks.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            i += len(piece)
        return b"Transfer-Encoding: chunked\r\n", b"".join(chunks) + b"0\r\n\r\n"

    def request(self) -> bytes:
        rnd = self.rnd
        self.count += 1
        method = rnd.choice(self.METHODS)
        head = b"%s %s HTTP/1.1\r\nHost: a.example\r\nX-Request-ID: case-%d\r\n" % (
            method,
            rnd.choice(self.TARGETS),
            self.count,
        )
        framing, body = b"", b""
        if method in (b"POST", b"PUT", b"PATCH") and rnd.random() < 0.8:
            framing, body = self.body(rnd.choice(["length", "chunked"]))
        if rnd.random() < 0.25:  # hostile: a bad request line or header
            if rnd.random() < 0.3:
                head = rnd.choice(self.HOSTILE_LINES) + b"\r\n" + head.split(b"\r\n", 1)[1]
            else:
                head += rnd.choice(self.HOSTILE_HEADERS) + b"\r\n"
        data = head + framing + b"\r\n" + body
        if rnd.random() < 0.08:  # cut short, anywhere
            data = data[: rnd.randrange(1, len(data))]
        return data


def read_all(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    started = time.monotonic()
    chunks = []
    sock.settimeout(limit)
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def answered_ids(data: bytes) -> list[bytes | None]:
    """X-Request-ID of each final response in ``data`` (up to the first unparsable byte)."""
    ids: list[bytes | None] = []

    class Collect:
        rid: bytes | None = None

        def on_message_begin(self) -> None:
            self.rid = None

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() == b"x-request-id":
                self.rid = value

        def on_message_complete(self) -> None:
            if parser.get_status_code() >= 200:
                ids.append(self.rid)

    parser = httptools.HttpResponseParser(Collect())
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        pass  # a response cut short by a close: what came before it counts
    return ids


@pytest.fixture(scope="module")
def demo_backend():
    proc, port = spawn_backend_process("fuzz")
    yield port
    stop_process(proc)


def test_client_side_fuzz(start_sluicegate, demo_backend):
    daemon = start_sluicegate(
        {
            "limits": {
                "max_header_bytes": "8KiB",
                "max_body_bytes": "32KiB",
                "client_header_timeout": "3s",
                "client_body_timeout": "3s",
            },
            "upstreams": {
                "app": {
                    "servers": [{"url": f"http://127.0.0.1:{demo_backend}"}],
                    "retry": {"tries": 2},
                    "circuit_breaker": {"failure_threshold": 1_000_000},
                }
            },
            "routes": [
                {
                    "name": "limited",
                    "match": {"path_prefix": "/limited/"},
                    "upstream": "app",
                    "strip_prefix": True,
                    "rate_limit": {"rate": "20/s", "burst": 10, "key": "route"},
                },
                {"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"},
            ],
        }
    )
    grammar = RequestGrammar(seed=20261128)
    problems: list[Any] = []
    for case in range(250):
        payload = b"".join(grammar.request() for _ in range(grammar.rnd.choice([1, 1, 2, 3])))
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # refused early: what it answered is still to be read
            data, seconds = read_all(sock, limit=5)
        sent = CASE_ID.findall(payload)
        got = [rid for rid in answered_ids(data) if rid and rid.startswith(b"case-")]
        if data and not STATUS_LINE.match(data):
            problems.append((case, "not a status line", data[:80]))
        if (
            len(set(got)) < len(got)
            or not set(got) <= set(sent)
            or got != sorted(got, key=sent.index)
        ):
            problems.append((case, "answered twice, out of order or unasked", sent, got))
        if seconds > 2.5:  # every timeout here is 3 s: nothing may wait for one
            problems.append((case, f"finished after {seconds:.1f}s", payload[:200]))
    assert problems == [], problems[:5]
    assert http_request(daemon.port, "GET", "/")[0] == 200
    lines = wait_for(daemon.access_log, message="access lines")
    assert [line for line in lines if not line["status"]] == []
    assert "Traceback" not in daemon.logs()
    wait_for(
        lambda: re.search(r"^sluicegate_open_connections 0", daemon.metrics(), re.M),
        message="every client connection closed",
    )


# -- upstream side ------------------------------------------------------------------------------


class ResponseGrammar:
    """Random upstream responses: (bytes, the body the client must get or None when the
    response is malformed, whether the upstream closes after it)."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)

    def chunked(self, body: bytes) -> bytes:
        out, i = [], 0
        while i < len(body):
            piece = body[i : i + self.rnd.randint(1, 3000)]
            out.append(b"%x%s\r\n%s\r\n" % (len(piece), self.rnd.choice([b"", b";x=y"]), piece))
            i += len(piece)
        return b"".join(out) + b"0\r\n" + self.rnd.choice([b"", b"X-Trailer: t\r\n"]) + b"\r\n"

    def response(self) -> tuple[bytes, bytes | None, bool]:
        rnd = self.rnd
        status = rnd.choice([200, 200, 201, 302, 404, 500, 204, 304])
        body = b"" if status in (204, 304) else rnd.randbytes(rnd.choice([0, 9, 2000, 30000]))
        head = b"HTTP/1.1 %d Whatever\r\nX-Up: 1\r\n" % status
        kind = rnd.choice(
            [
                "length",
                "length",
                "chunked",
                "chunked",
                "close",
                "interim",
                "bad_status",
                "length_and_chunked",
                "two_lengths",
                "short",
                "folded",
                "nul",
                "second_response",
            ]
        )
        if kind == "length":
            return head + b"Content-Length: %d\r\n\r\n" % len(body) + body, body, False
        if kind == "chunked":
            return head + b"Transfer-Encoding: chunked\r\n\r\n" + self.chunked(body), body, False
        if kind == "close":  # close-delimited: the proxy re-frames it
            return head + b"Connection: close\r\n\r\n" + body, body, True
        if kind == "interim":
            interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            return interim + head + b"Content-Length: %d\r\n\r\n" % len(body) + body, body, False
        if kind == "second_response":
            extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE"
            return head + b"Content-Length: %d\r\n\r\n" % len(body) + body + extra, body, False
        if kind == "short":  # (a 204 or 304 has no body whatever its Content-Length says)
            short = head + b"Content-Length: %d\r\n\r\n" % (len(body) + 10) + body
            return short, b"" if status in (204, 304) else None, True
        malformed = {
            "bad_status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
            "length_and_chunked": head + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n",
            "two_lengths": head + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "folded": head + b"X-Fold: a\r\n b\r\nContent-Length: 0\r\n\r\n",
            "nul": head + b"X-Nul: a\x00b\r\nContent-Length: 0\r\n\r\n",
        }
        return malformed[kind], None, False


class Answer:
    def __init__(self) -> None:
        self.messages: list[tuple[int, bytes]] = []
        self.body = b""

    def on_message_begin(self) -> None:
        self.body = b""

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:  # an interim response (a relayed 103) comes before the answer
            self.messages.append((status, self.body))


def read_answer(sock: socket.socket) -> tuple[int, bytes] | None:
    """One response off a kept-alive connection; None when it was cut."""
    answer = Answer()
    parser = answer.parser = httptools.HttpResponseParser(answer)
    deadline = time.monotonic() + 5
    while not answer.messages and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return None
        if not chunk:
            return None
        parser.feed_data(chunk)  # a client-side parse error fails the test: never allowed
    return answer.messages[0] if answer.messages else None


def test_upstream_side_fuzz(proxy_to_raw, raw_upstream):
    daemon, upstream = proxy_to_raw, raw_upstream
    grammar = ResponseGrammar(seed=20261128)
    problems: list[Any] = []
    for case in range(300):
        script = [grammar.response() for _ in range(grammar.rnd.choice([1, 2, 3]))]
        upstream.script = [(raw, "close") if close else raw for raw, _, close in script]
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
            for number, (raw, expected, closes) in enumerate(script):
                sock.sendall(b"GET /case-%d-%d HTTP/1.1\r\nHost: h\r\n\r\n" % (case, number))
                answer = read_answer(sock)
                if expected is not None and (answer is None or answer[1] != expected):
                    problems.append((case, number, "good response not relayed", raw[:120]))
                if expected is None and answer is not None and answer[0] != 502:
                    problems.append((case, number, "bad response relayed", answer[0]))
                if answer is None or answer[0] == 502 or closes:
                    break  # the proxy may close the client connection after these
    assert problems == [], problems[:5]
    upstream.script = []
    assert http_request(daemon.port, "GET", "/")[:1] == (200,)
    assert "Traceback" not in daemon.logs()
