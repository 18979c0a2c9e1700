"""The featureless forwarder `make bench` and `make bench-instr` compare against.

A yardstick that cut corners would flatter nothing but itself: it must do the same job
as the proxy it is compared with (keep-alive both ways, bodies streamed and re-framed).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.backends import free_port, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def forwarder():
    origin_port, port = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "loadtests/bench.py"), "--origin", str(origin_port)]
        ),
        subprocess.Popen(
            [
                sys.executable,
                str(REPO_ROOT / "loadtests/forwarder.py"),
                "--listen",
                f"127.0.0.1:{port}",
                "--origin",
                f"127.0.0.1:{origin_port}",
            ]
        ),
    ]
    try:
        wait_for_port(origin_port, procs[0])
        wait_for_port(port, procs[1])
        yield port
    finally:
        for proc in procs:
            stop_process(proc)


def exchange(sock: socket.socket, request: bytes) -> tuple[bytes, bytes]:
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_forwards_small_big_and_streamed_bodies_on_one_keep_alive_connection(forwarder):
    with socket.create_connection(("127.0.0.1", forwarder), timeout=5) as sock:
        head, body = exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"hello\n"
        head, body = exchange(sock, b"GET /64k HTTP/1.1\r\nHost: x\r\n\r\n")
        assert len(body) == 64 * 1024
        payload = b"p" * 16384
        head, body = exchange(
            sock, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 16384\r\n\r\n" + payload
        )
        assert body == b"hello\n"
        chunked = b"4000\r\n" + payload + b"\r\n0\r\n\r\n"
        head, body = exchange(
            sock, b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        )
        assert body == b"hello\n"
