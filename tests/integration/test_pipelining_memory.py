"""Pipelining has a memory bound: the proxy reads the next request only once the current
response is on its way, so a client that pipelines thousands of requests and does not read
costs a few buffers, not every answer (nginx and HAProxy behave the same way).

The daemon's RSS (VmRSS, sampled every 20 ms) is watched while a raw socket pipelines
2,000 GETs of 64 KiB answers and reads nothing for a few seconds; then it reads every
answer, which must all be there, complete and in order. The upstream is a plain socket
server in a thread that answers at loopback speed.
"""

from __future__ import annotations

import socket
import time

from tests.integration.test_streaming import MiB, RssSampler
from tests.support.rawupstream import RawClient, RawRequest, RawUpstream

COUNT = 2000
SIZE = 64 * 1024
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (SIZE, b"p" * SIZE)
# What the client's 2,000 answers weigh is 125 MiB: the proxy may hold a few buffers of
# them (write buffer, one read of requests), never a growing share.
RSS_BUDGET = 8 * MiB


def answer(request: RawRequest, sock: socket.socket) -> bool:
    rid = (request.header("X-Request-ID") or "").encode()
    sock.sendall(ANSWER.replace(b"\r\n\r\n", b"\r\nX-Seen-ID: " + rid + b"\r\n\r\n", 1))
    return True


def config(url: str) -> dict:
    return {
        "upstreams": {"u": {"servers": [{"url": url}]}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "u"}],
        "logging": {"access_log": False},
    }


def test_a_deep_pipeline_that_is_not_read_costs_a_few_buffers(start_sluicegate):
    with RawUpstream(answer) as upstream:
        daemon = start_sluicegate(config(upstream.url))
        with RawClient(daemon.port) as warm:  # imports, pools and buffers settle first
            for _ in range(20):
                assert warm.request(b"GET /bytes/65536 HTTP/1.1\r\nHost: h\r\n\r\n").status == 200
        requests = b"".join(
            b"GET /bytes/65536 HTTP/1.1\r\nHost: h\r\nX-Request-ID: p-%d\r\n\r\n" % i
            for i in range(COUNT)
        )
        with RssSampler(daemon.pid) as rss, RawClient(daemon.port, timeout=30) as client:
            client.send(requests)
            time.sleep(3)  # not reading: the proxy must stop, not hold every answer
        assert rss.growth < RSS_BUDGET, rss.report()

        with RawClient(daemon.port, timeout=30) as client:
            client.send(requests)
            time.sleep(1)
            seen = []
            for i in range(COUNT):
                response = client.read_response()
                assert response.status == 200, i
                assert len(response.body) == SIZE, i
                assert response.header("X-Request-ID") == f"p-{i}"
                seen.append(response.header("X-Seen-ID"))
            assert seen == [f"p-{i}" for i in range(COUNT)]
            assert not client.is_closed(timeout=0.2)
