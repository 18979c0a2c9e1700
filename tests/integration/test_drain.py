"""``drain_time`` on the real daemon: after SIGTERM it stays reachable, tells clients to go
(``Connection: close``), and closes nothing a request might be on its way to."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from tests.support.daemon import http_request, wait_for

GET = b"GET /d/delay/0 HTTP/1.1\r\nHost: drain.test\r\n\r\n"


def _config(backend_port: int, **extra) -> dict:
    config = {
        "upstreams": {"app": {"servers": [{"url": f"http://127.0.0.1:{backend_port}"}]}},
        # Only /d/... is routed: anything else is a 404 the proxy answers itself.
        "routes": [
            {"name": "d", "match": {"path_prefix": "/d/"}, "upstream": "app", "strip_prefix": True}
        ],
        "logging": {"access_log": False},
    }
    config.update(extra)
    return config


class RawClient:
    """One kept-alive connection, read by hand: we see exactly when the proxy closes it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def request(self, data: bytes = GET) -> bytes:
        """Send one request; return its response head (the bodies here are small)."""
        self.sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed before a response: {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += self.sock.recv(65536)
        return head

    def closed_by_peer(self, wait: float = 0.0) -> bool:
        """Has the proxy closed this connection (EOF within ``wait`` seconds)?"""
        self.sock.settimeout(wait if wait > 0 else 0.001)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, BlockingIOError):
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(5)

    def close(self) -> None:
        self.sock.close()


def _says_close(head: bytes) -> bool:
    return b"\r\nconnection: close" in head.lower()


def test_draining_keeps_accepting_tells_clients_to_leave_and_closes_idle_ones_last(
    start_sluicegate, spawn_backend
):
    _, backend = spawn_backend("b")
    # Long enough that a busy test machine still does the steps below within the drain.
    drain = 3.0
    daemon = start_sluicegate(_config(backend, drain_time=f"{drain}s"))
    used = RawClient(daemon.port)  # idle since before the drain, then used during it
    unused = RawClient(daemon.port)  # idle since before the drain, never used again
    assert not _says_close(used.request())
    assert not _says_close(unused.request())

    daemon.signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for(lambda: daemon.admin("GET", "/readyz")[0] == 503, timeout=1, message="503")

    # New connections are still accepted: the balancer has not noticed yet.
    status, headers, _ = http_request(daemon.port, "GET", "/d/delay/0", timeout=2)
    assert status == 200 and headers["connection"] == "close"
    status, headers, _ = http_request(daemon.port, "GET", "/nowhere", timeout=2)
    assert status == 404 and headers["connection"] == "close"  # our own answers too

    # Kept-alive connections idle since before the drain are not closed under a request.
    time.sleep(0.3)
    assert not used.closed_by_peer() and not unused.closed_by_peer()
    assert _says_close(used.request())  # its next answer tells it to go ...
    assert used.closed_by_peer(wait=1)  # ... and then the connection ends
    assert time.monotonic() - signalled < drain - 0.1, "test too slow: still draining?"
    assert not unused.closed_by_peer()

    # After drain_time: listeners closed, idle connections closed, exit 0.
    assert unused.closed_by_peer(wait=drain + 1)
    assert time.monotonic() - signalled >= drain - 0.1
    with pytest.raises(OSError):
        http_request(daemon.port, "GET", "/d/delay/0", timeout=1)
    assert daemon.wait_exit(10) == 0
    used.close()
    unused.close()


def test_a_request_in_flight_across_the_drain_finishes(start_sluicegate, spawn_backend):
    _, backend = spawn_backend("slow")
    daemon = start_sluicegate(_config(backend, drain_time="300ms", shutdown_timeout="10s"))
    results: list[tuple[int, dict]] = []

    def slow() -> None:
        status, headers, _ = daemon.get("/d/delay/1500", timeout=10)
        results.append((status, headers))

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    daemon.signal(signal.SIGTERM)
    thread.join(10)
    [(status, headers)] = results
    assert status == 200 and headers["connection"] == "close"
    assert daemon.wait_exit(10) == 0


def test_workers_drain_too(start_sluicegate, spawn_backend):
    _, backend = spawn_backend("b")
    daemon = start_sluicegate(_config(backend, workers=2, drain_time="1s"))
    wait_for(lambda: daemon.admin("GET", "/readyz")[0] == 200, message="workers ready")
    daemon.signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for(lambda: daemon.admin("GET", "/readyz")[0] == 503, timeout=1, message="503")
    for _ in range(4):  # whichever worker the kernel picks is still accepting
        status, headers, _ = http_request(daemon.port, "GET", "/d/delay/0", timeout=2)
        assert status == 200 and headers["connection"] == "close"
    assert daemon.wait_exit(15) == 0
    assert time.monotonic() - signalled >= 0.9
