"""Bodies stream through the daemon with backpressure: memory stays bounded.

A 1 GiB download and a 1 GiB upload each raise the daemon's RSS (VmRSS, sampled every
20 ms by a thread) by less than 64 MiB; a client that reads slowly makes the proxy stop
reading from the upstream instead of buffering the body.
The upstream is a plain socket server in a thread (fast), the client a socket reading or
writing 1 MiB at a time.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from tests.support.rawupstream import RawClient, RawRequest, RawUpstream

GiB = 1 << 30
MiB = 1 << 20
RSS_BUDGET = 64 * MiB
BLOCK = b"\x5a" * MiB


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.before = rss_bytes(pid)
        self.peak = self.before
        self.after = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.after = rss_bytes(self.pid)
        self.peak = max(self.peak, self.after)

    @property
    def growth(self) -> int:
        return self.peak - self.before

    def report(self) -> str:
        return (
            f"RSS before {self.before / MiB:.1f} MiB, peak {self.peak / MiB:.1f} MiB, "
            f"after {self.after / MiB:.1f} MiB (growth {self.growth / MiB:.1f} MiB)"
        )


class Pour:
    """Answers every request with ``size`` bytes (Content-Length or close-delimited)."""

    def __init__(self, size: int, *, piece: int = MiB, chunked: bool = False) -> None:
        self.size = size
        self.piece = piece
        self.chunked = chunked
        self.sent = 0

    def __call__(self, request: RawRequest, sock: socket.socket) -> bool:
        self.sent = 0
        if self.chunked:
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
        block = BLOCK[: self.piece]
        framed = b"%x\r\n%b\r\n" % (len(block), block)
        remaining = self.size
        while remaining:
            n = min(remaining, self.piece)
            if self.chunked:
                sock.sendall(framed if n == self.piece else b"%x\r\n%b\r\n" % (n, block[:n]))
            else:
                sock.sendall(block if n == self.piece else block[:n])
            remaining -= n
            self.sent += n
        if self.chunked:
            sock.sendall(b"0\r\n\r\n")
        return True


def config(url: str, **limits: Any) -> dict[str, Any]:
    return {
        "limits": {"max_body_bytes": "2GiB", **limits},
        # retry.timeout bounds the whole exchange, body included: a GiB must fit in it.
        "upstreams": {
            "u": {
                "servers": [{"url": url}],
                "timeouts": {"read": "30s"},
                "retry": {"timeout": "5m"},
            }
        },
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "u"}],
        "logging": {"access_log": False},
    }


def warm_up(port: int) -> None:
    with RawClient(port) as client:
        for _ in range(3):
            assert client.request(b"GET /warm HTTP/1.1\r\nHost: h\r\n\r\n").status == 200


def read_body(client: RawClient, length: int, *, pause: float = 0.0) -> int:
    """Read ``length`` body bytes (after the head) 1 MiB at a time; returns bytes read."""
    got = len(client.reader.buf)
    client.reader.buf = b""
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    while got < length:
        n = client.sock.recv_into(view, min(MiB, length - got))
        if not n:
            break
        got += n
        if pause:
            time.sleep(pause)
    return got


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_1gib_download_keeps_rss_bounded(start_sluicegate, chunked):
    pour = Pour(GiB, chunked=chunked)

    def respond(request: RawRequest, sock: socket.socket) -> bool:
        if request.target == b"/warm":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        return pour(request, sock)

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(config(upstream.url))
        warm_up(daemon.port)
        started = time.monotonic()
        with RssSampler(daemon.pid) as rss, RawClient(daemon.port, timeout=30) as client:
            client.send(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
            head = client.reader.until(b"\r\n\r\n")
            assert head is not None and head.startswith(b"HTTP/1.1 200")
            if chunked:
                assert b"Transfer-Encoding: chunked" in head
                # chunk framing adds a few bytes per chunk; count payload by reading to 0-chunk
                received = 0
                while True:
                    size_line = client.reader.until(b"\r\n")
                    size = int(size_line, 16)
                    if size == 0:
                        client.reader.until(b"\r\n")
                        break
                    received += client.reader.exactly(size, False)[1]
                    client.reader.exactly(2, False)
            else:
                assert b"Content-Length: %d" % GiB in head
                received = read_body(client, GiB)
            elapsed = time.monotonic() - started
            # the connection is still good afterwards
            assert client.request(b"GET /warm HTTP/1.1\r\nHost: h\r\n\r\n").body == b"ok"
    print(
        f"1 GiB download ({'chunked' if chunked else 'length'}) in {elapsed:.1f}s; {rss.report()}"
    )
    assert received == GiB
    assert rss.growth < RSS_BUDGET, rss.report()


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_1gib_upload_keeps_rss_bounded(start_sluicegate, chunked):
    def respond(request: RawRequest, sock: socket.socket) -> bool:
        body = b"%d" % request.body_length
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        return True

    with RawUpstream(respond, discard_body=True) as upstream:
        daemon = start_sluicegate(config(upstream.url))
        warm_up(daemon.port)
        started = time.monotonic()
        with RssSampler(daemon.pid) as rss, RawClient(daemon.port, timeout=30) as client:
            # PUT may be retried, so the proxy first tries to hold the body (up to
            # retry.max_body_bytes), then streams it: both paths are exercised here.
            if chunked:
                client.send(b"PUT /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
                framed = b"%x\r\n%b\r\n" % (len(BLOCK), BLOCK)
                for _ in range(GiB // MiB):
                    client.sock.sendall(framed)
                client.sock.sendall(b"0\r\n\r\n")
            else:
                client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % GiB)
                for _ in range(GiB // MiB):
                    client.sock.sendall(BLOCK)
            response = client.read_response()
            elapsed = time.monotonic() - started
    print(f"1 GiB upload ({'chunked' if chunked else 'length'}) in {elapsed:.1f}s; {rss.report()}")
    assert response.status == 200, response.body
    assert response.body == b"%d" % GiB
    assert upstream.requests[-1].body_length == GiB
    assert rss.growth < RSS_BUDGET, rss.report()


def test_slow_reader_makes_the_proxy_stop_reading_the_upstream(start_sluicegate):
    pour = Pour(512 * MiB, piece=64 * 1024)

    def respond(request: RawRequest, sock: socket.socket) -> bool:
        if request.target == b"/warm":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        try:
            return pour(request, sock)
        except OSError:
            return False

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(config(upstream.url))
        warm_up(daemon.port)
        with RssSampler(daemon.pid) as rss, RawClient(daemon.port, timeout=30) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client.send(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
            assert client.reader.until(b"\r\n\r\n").startswith(b"HTTP/1.1 200")
            read = 0
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # about 2.5 MiB/s
                read += len(client.sock.recv(64 * 1024))
                time.sleep(0.025)
            in_transit = pour.sent - read
    print(
        f"slow reader: read {read / MiB:.1f} MiB, upstream sent {pour.sent / MiB:.1f} MiB; "
        f"{rss.report()}"
    )
    # what the upstream sent beyond what the client read sits in socket buffers and the
    # proxy's bounded write buffer, not in a body-sized heap
    assert in_transit < 48 * MiB, (read, pour.sent)
    assert pour.sent < 256 * MiB
    assert rss.growth < 32 * MiB, rss.report()
