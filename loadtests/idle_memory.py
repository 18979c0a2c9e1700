"""Memory per idle keep-alive client connection: RSS of the proxy before and after N clients
each made one request and stayed connected.

    python loadtests/idle_memory.py [--connections 10000]

Starts a tiny origin and `sluicegate run` on free loopback ports, opens the connections
from this process (non-blocking sockets, bounded time), reads the proxy's VmRSS from
/proc, prints the growth per connection, and stops everything.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtests.bench import free_port, spawn, stop_process, wait_port  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_idle_connections(port: int, count: int, deadline: float) -> list[socket.socket]:
    """Connect, send one request, read its whole (small) response, keep the socket open."""
    selector = selectors.DefaultSelector()
    sockets: list[socket.socket] = []
    pending = 0
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE, b"")
        sockets.append(sock)
        pending += 1
        while pending > 500 or (len(sockets) == count and pending):
            for key, events in selector.select(timeout=1):
                sock = key.fileobj
                if events & selectors.EVENT_WRITE and key.data == b"":
                    sock.send(REQUEST)
                    selector.modify(sock, selectors.EVENT_READ, b"sent")
                elif events & selectors.EVENT_READ:
                    data = sock.recv(65536)
                    received = key.data + data
                    if (b"\r\n\r\n" in received and received.endswith(b"hello\n")) or not data:
                        selector.unregister(sock)
                        pending -= 1
                    else:
                        selector.modify(sock, selectors.EVENT_READ, received)
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out with {pending} connections still pending")
    selector.close()
    return sockets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 1000), hard))
    workdir = Path(tempfile.mkdtemp(prefix="sluicegate-idle-"))
    origin_port, port, admin_port = free_port(), free_port(), free_port()
    config = workdir / "idle.yaml"
    config.write_text(
        f"listen: [{{address: '127.0.0.1:{port}'}}]\n"
        f"admin: {{address: '127.0.0.1:{admin_port}'}}\n"
        f"limits: {{max_connections: {args.connections + 100}, keepalive_timeout: 10m}}\n"
        "logging: {level: warning, access_log: false}\n"
        f"upstreams: {{origin: {{servers: [{{url: 'http://127.0.0.1:{origin_port}'}}]}}}}\n"
        "routes: [{name: all, upstream: origin}]\n"
    )
    bench = Path(__file__).resolve().parent / "bench.py"
    origin = spawn(
        [sys.executable, str(bench), "--origin", str(origin_port)], workdir / "origin.log"
    )
    wait_port(origin_port, origin, "origin")
    proxy = spawn([sys.executable, "-m", "proxy", "run", "-c", str(config)], workdir / "proxy.log")
    sockets: list[socket.socket] = []
    try:
        wait_port(port, proxy, "sluicegate")
        # Warm up: the first requests allocate pools, caches, code objects.
        open_idle_connections(port, 200, time.monotonic() + 30)
        time.sleep(0.5)
        before = rss_kib(proxy.pid)
        sockets = open_idle_connections(port, args.connections, time.monotonic() + 120)
        time.sleep(1.0)
        after = rss_kib(proxy.pid)
        per_connection = (after - before) / args.connections
        print(
            f"{args.connections} idle keep-alive connections: RSS {before} KiB -> {after} KiB, "
            f"{per_connection:.2f} KiB per connection"
        )
        return 0
    finally:
        for sock in sockets:
            sock.close()
        stop_process(proxy)
        stop_process(origin)


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
