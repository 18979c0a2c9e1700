"""``limits`` on the real daemon: head and body sizes, client timeouts, max_connections.

Timeouts are short (a few hundred ms; the daemon's deadline sweep ticks every 50 ms), and
each assertion on timing leaves room for a slow machine while still telling apart the
behaviours that matter (e.g. a head deadline counted from the end of the previous response
rather than from the head's first byte).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from tests.integration.test_hostile_input import RawUpstream, exchange, parse_response
from tests.support.daemon import http_request, wait_for
from tests.support.rawupstream import read_until_closed

LIMITS = {
    "max_header_bytes": 4096,
    "max_body_bytes": 1024,
    "client_header_timeout": "600ms",
    "client_body_timeout": "400ms",
    "keepalive_timeout": "1500ms",
}


def config(upstream_port: int, **limits: Any) -> dict[str, Any]:
    return {
        "limits": {**LIMITS, **limits},
        "upstreams": {
            "app": {
                "servers": [{"url": f"http://127.0.0.1:{upstream_port}"}],
                "retry": {"tries": 1},
            }
        },
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"}],
    }


def assert_logged(proxy: Any, status: int, error: str) -> None:
    """The request's access line (the only one) records the answer the proxy gave."""
    (line,) = wait_for(proxy.access_log, message="the access log line")
    assert (line["status"], line["error"]) == (status, error)


@pytest.fixture
def backend(spawn_backend):
    _, port = spawn_backend("limits")
    return port


@pytest.fixture
def recorder():
    """A raw upstream that remembers every byte it is sent."""
    upstream = RecordingUpstream().start()
    yield upstream
    upstream.stop()


class RecordingUpstream(RawUpstream):
    """Answers 200 once a request's body is complete; keeps every byte it received."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()

    async def _serve(self, reader, writer) -> None:  # type: ignore[override]
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except Exception:
                    return
                self.received += head
                self.requests.append((self.connections, head))
                lowered = head.lower()
                if b"transfer-encoding: chunked" in lowered:
                    while not self.received.endswith(b"\r\n0\r\n\r\n"):
                        data = await reader.read(65536)
                        if not data:
                            return
                        self.received += data
                elif b"content-length:" in lowered:
                    length = int(lowered.split(b"content-length:")[1].split(b"\r\n")[0])
                    data = await reader.readexactly(length)
                    self.received += data
                writer.write(self.default)
                await writer.drain()
        except Exception:
            return
        finally:
            writer.close()

    def body_bytes(self) -> int:
        """Request bytes received beyond the request heads (body and chunk framing)."""
        return len(self.received) - sum(len(head) for _, head in self.requests)


def count(port: int) -> int:
    status, _, body = http_request(port, "GET", "/count")
    assert status == 200
    return json.loads(body)["requests"]


def assert_error(data: bytes, status: int) -> None:
    got, headers, body = parse_response(data)
    assert got == status, data[:300]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(sock: socket.socket) -> bytes:
    """One Content-Length-framed response from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a full response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(parse_response(head + b"\r\n\r\n")[1]["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head + b"\r\n\r\n" + body


# -- sizes -------------------------------------------------------------------------------------


def test_head_over_max_header_bytes_is_431(start_sluicegate, backend):
    proxy = start_sluicegate(config(backend))
    before = count(backend)
    big = b"X-Big: " + b"a" * 5000 + b"\r\n"
    data, closed = exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
    assert_error(data, 431)
    assert closed
    # Sent slowly, in pieces that are each small: the running total is what counts.
    with connect(proxy.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        for _ in range(10):
            try:
                sock.sendall(b"X-Pad: " + b"b" * 500 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.01)
        data, _ = read_until_closed(sock)
    assert_error(data, 431)
    # Just under the limit is fine.
    status, _, _ = http_request(proxy.port, "GET", "/", headers={"X-Pad": "c" * 3500})
    assert status == 200
    assert count(backend) == before + 1


def test_content_length_over_max_body_bytes_is_413_before_any_upstream_contact(
    start_sluicegate, recorder
):
    proxy = start_sluicegate(config(recorder.port))
    data, closed = exchange(
        proxy.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1025\r\n\r\n" + b"x" * 1025
    )
    assert_error(data, 413)
    assert closed
    assert recorder.connections == 0
    assert_logged(proxy, 413, "request body too large")
    status, _, _ = http_request(proxy.port, "POST", "/", body=b"y" * 1024)
    assert status == 200
    assert recorder.body_bytes() == 1024


def test_chunked_body_over_max_body_bytes_is_413_and_nothing_past_the_limit_is_sent(
    start_sluicegate, recorder
):
    proxy = start_sluicegate(config(recorder.port))
    with connect(proxy.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        for _ in range(8):
            try:
                sock.sendall(b"12c\r\n" + b"z" * 300 + b"\r\n")  # 0x12c = 300
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 300
            time.sleep(0.02)
        data, _ = read_until_closed(sock)
    assert_error(data, 413)
    assert_logged(proxy, 413, "request body too large")
    time.sleep(0.1)
    body = bytes(recorder.received).split(b"\r\n\r\n", 1)[1] if recorder.requests else b""
    assert body.count(b"z") <= 1024, "bytes past max_body_bytes reached the upstream"
    assert not body.endswith(b"0\r\n\r\n"), "the upstream must not see a complete request"
    # Under the limit, chunked goes through (re-framed by the proxy).
    with connect(proxy.port) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"200\r\n" + b"w" * 512 + b"\r\n200\r\n" + b"w" * 512 + b"\r\n0\r\n\r\n"
        )
        assert read_response(sock).startswith(b"HTTP/1.1 200")


def test_chunked_body_over_limit_when_buffered_for_retry_never_reaches_the_upstream(
    start_sluicegate, recorder
):
    """PUT may be retried, so its body is buffered first: nothing is sent before 413."""
    cfg = config(recorder.port)
    cfg["upstreams"]["app"]["retry"] = {"tries": 2, "max_body_bytes": "64KiB"}
    proxy = start_sluicegate(cfg)
    data, closed = exchange(
        proxy.port,
        b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"100\r\n" + b"q" * 256 + b"\r\n") * 5
        + b"0\r\n\r\n",
    )
    assert_error(data, 413)
    assert closed
    assert recorder.connections == 0
    assert_logged(proxy, 413, "request body too large")


# -- timeouts ----------------------------------------------------------------------------------


def test_slow_head_gets_408_and_close(start_sluicegate, backend):
    proxy = start_sluicegate(config(backend))
    before = count(backend)
    with connect(proxy.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        data, seconds = read_until_closed(sock)
    assert_error(data, 408)
    assert 0.5 <= seconds < 1.5
    assert count(backend) == before


def test_trickled_head_still_times_out_from_its_first_byte(start_sluicegate, backend):
    """Slowloris: each byte arrives in time, the head as a whole does not."""
    proxy = start_sluicegate(config(backend))
    with connect(proxy.port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")
        closed_early = False
        for i in range(30):
            time.sleep(0.1)
            try:
                sock.sendall(b"X-%d: a\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                closed_early = True
                break
        data, _ = read_until_closed(sock)
        seconds = time.monotonic() - started
    assert closed_early or seconds < 3.5
    assert_error(data, 408)


def test_head_timeout_on_keepalive_counts_from_end_of_previous_response(start_sluicegate, backend):
    proxy = start_sluicegate(config(backend, client_header_timeout="600ms"))
    with connect(proxy.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        response_end = time.monotonic()
        time.sleep(0.4)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # half a head, 0.4 s later
        data, _ = read_until_closed(sock)
        seconds = time.monotonic() - response_end
    assert_error(data, 408)
    # From the response's end: ~0.6 s. From the head's first byte it would be ~1.0 s.
    assert 0.55 <= seconds < 0.9, seconds


def test_slow_body_gets_408(start_sluicegate, backend):
    proxy = start_sluicegate(config(backend))
    with connect(proxy.port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"b" * 10)
        data, seconds = read_until_closed(sock)
    assert_error(data, 408)
    assert 0.35 <= seconds < 1.5
    # The body was streaming to the upstream: the log says what the client got.
    assert_logged(proxy, 408, "client timed out")


def test_body_deadline_is_renewed_by_progress(start_sluicegate, backend):
    """client_body_timeout bounds the gap between reads, not the whole upload."""
    proxy = start_sluicegate(config(backend))
    with connect(proxy.port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):
            time.sleep(0.15)
            sock.sendall(b"b")
        response = read_response(sock)
    status, _, body = parse_response(response)
    assert status == 200
    assert json.loads(body)["body"] == "b" * 10


def test_idle_keepalive_connection_is_closed_silently(start_sluicegate, backend):
    proxy = start_sluicegate(config(backend, keepalive_timeout="500ms"))
    with connect(proxy.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        data, seconds = read_until_closed(sock)
    assert data == b"", "an idle connection is closed without a response"
    assert 0.45 <= seconds < 1.5


def test_keepalive_connection_used_in_time_stays_open(start_sluicegate, backend):
    proxy = start_sluicegate(config(backend, keepalive_timeout="500ms"))
    with connect(proxy.port) as sock:
        for _ in range(4):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(0.3)


def test_silent_new_connection_is_closed_after_header_timeout(start_sluicegate, backend):
    proxy = start_sluicegate(config(backend))
    with connect(proxy.port) as sock:
        data, seconds = read_until_closed(sock)
    assert data == b""
    assert 0.5 <= seconds < 1.5


# -- max_connections ---------------------------------------------------------------------------


def test_connections_beyond_max_are_refused_and_the_first_five_served(start_sluicegate, backend):
    proxy = start_sluicegate(config(backend, max_connections=5, keepalive_timeout="30s"))
    request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    first = [connect(proxy.port) for _ in range(5)]
    try:
        for sock in first:
            sock.sendall(request)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        for _ in range(3):
            with connect(proxy.port) as extra:
                try:
                    extra.sendall(request)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                data, seconds = read_until_closed(extra)
                assert data == b"", "a connection over max_connections must not be served"
                assert seconds < 1.0, "refused at once, not after a timeout"
        started = time.monotonic()
        for sock in first:  # those already admitted are still served, and promptly
            sock.sendall(request)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < 1.0
    finally:
        for sock in first[1:]:
            sock.close()
    # Once below the limit again, new connections are admitted.
    first[0].close()

    def admitted() -> bool:
        try:
            return http_request(proxy.port, "GET", "/", timeout=2)[0] == 200
        except OSError:
            return False

    wait_for(admitted, timeout=5, message="a new connection to be served")


def test_pipelined_requests_do_not_add_up_to_a_head_too_large(start_sluicegate, backend):
    """max_header_bytes bounds each head: many small pipelined requests (and a body) read
    together with the start of the next head are not counted as part of it."""
    proxy = start_sluicegate(config(backend, max_body_bytes="1MiB"))
    one = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    post = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 6000\r\n\r\n" + b"p" * 6000
    with connect(proxy.port) as sock:
        sock.sendall(one * 150 + post + b"GET / HTTP/1.1\r\nHo")  # ends mid-head
        time.sleep(0.1)
        sock.sendall(b"st: a\r\n\r\n")
        reader = sock.makefile("rb")
        statuses = []
        for _ in range(152):
            status_line = reader.readline()
            assert status_line, f"closed after {len(statuses)} responses"
            statuses.append(int(status_line.split()[1]))
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
    assert statuses == [200] * 152
