"""1xx interim responses through the real daemon, from a scripted raw upstream.

RFC 9110 section 15.2: a proxy forwards the 1xx responses it did not ask for itself, but
never to an HTTP/1.0 client. What the cases pin down:

- a 103 (and a 102) reaches an HTTP/1.1 client as it comes, before the upstream has sent
  its final response, with its end-to-end fields and without its hop-by-hop ones;
- a 100 Continue from the upstream is not relayed: the proxy answers ``Expect`` itself;
- an HTTP/1.0 client gets the final response alone;
- an interim response is never the answer: the cache stores the final response only
  (neither the 103 nor its fields come back on a hit), and a try that dies after a 103
  is retried as one with no answer at all;
- interim heads count against the 64 KiB response head limit: an upstream cannot make the
  proxy relay without end before it answers.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from tests.support.daemon import start_daemon
from tests.support.rawupstream import RawClient, RawRequest, RawUpstream

EARLY_HINTS = (
    b"HTTP/1.1 103 Early Hints\r\n"
    b"Link: </style.css>; rel=preload; as=style\r\n"
    b"X-My-Header: hint\r\n"
    b"Connection: X-Hop\r\n"
    b"X-Hop: only for the next hop\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"\r\n"
)
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def final(body: bytes, *headers: bytes) -> bytes:
    fields = b"".join(header + b"\r\n" for header in headers)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), fields, body)


class Script:
    """What the upstream answers, by path. ``release`` holds a ``?wait`` final response
    until the test has seen the interim ones; ``/retry`` dies after its 103 the first time
    (on whichever of the two servers it lands) and answers after that."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.retries_died = 0
        self.lock = threading.Lock()

    def respond(self, request: RawRequest, sock: socket.socket) -> bool:
        target = request.target
        if target.startswith(b"/retry"):
            with self.lock:
                die = self.retries_died == 0
                self.retries_died += 1
            sock.sendall(EARLY_HINTS)
            if die:
                return False  # closed before a final response
            sock.sendall(final(b"second try"))
            return True
        if target.startswith(b"/flood"):  # 76 KB of bare 102s, then an answer
            sock.sendall(PROCESSING * 4000 + final(b"too late"))
            return True
        if target.startswith(b"/cached"):
            sock.sendall(EARLY_HINTS + final(b"stored", b"Cache-Control: max-age=100"))
            return True
        sock.sendall(EARLY_HINTS + CONTINUE + PROCESSING)
        if target.endswith(b"?wait"):
            assert self.release.wait(5), "the test never saw the interim responses"
        sock.sendall(final(b"final"))
        return True


@pytest.fixture(scope="module")
def script():
    return Script()


@pytest.fixture(scope="module")
def upstreams(script: Script):
    with RawUpstream(script.respond) as one, RawUpstream(script.respond) as other:
        yield one, other


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, upstreams: tuple[RawUpstream, ...]):
    one, other = upstreams
    config = {
        "cache": {"store": "memory"},
        "upstreams": {
            "one": {"servers": [{"url": one.url}], "retry": {"tries": 1}},
            "pair": {
                "servers": [{"url": one.url}, {"url": other.url}],
                "retry": {"tries": 2, "on": ["error"]},
                "circuit_breaker": {"failure_threshold": 1000},
            },
        },
        "routes": [
            {"name": "cached", "match": {"path_prefix": "/cached"}, "upstream": "one", "cache": {}},
            {"name": "retry", "match": {"path_prefix": "/retry"}, "upstream": "pair"},
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "one"},
        ],
    }
    running = start_daemon(tmp_path_factory.mktemp("interim"), config)
    yield running
    running.stop()


def get(path: str, version: bytes = b"1.1") -> bytes:
    return b"GET %b HTTP/%b\r\nHost: app\r\n\r\n" % (path.encode(), version)


def read_until_final(client: RawClient) -> tuple[list[Any], Any]:
    interim = []
    while True:
        response = client.read_response()
        if response.status >= 200:
            return interim, response
        interim.append(response)


def test_interim_responses_reach_the_client_before_the_final_one(daemon, script):
    script.release.clear()
    with RawClient(daemon.port) as client:
        client.send(get("/early?wait"))
        # Read while the upstream still holds its final response: relayed as they come.
        hints = client.read_response()
        assert hints.status_line == b"HTTP/1.1 103 Early Hints"
        assert hints.header("Link") == "</style.css>; rel=preload; as=style"
        assert hints.header("X-My-Header") == "hint"
        for hop_by_hop in ("Connection", "X-Hop", "Keep-Alive"):
            assert hints.header(hop_by_hop) is None, hints.head
        assert hints.header("Content-Length") is None
        processing = client.read_response()  # the upstream's 100 Continue is not relayed
        assert processing.status_line == b"HTTP/1.1 102 Processing"
        script.release.set()
        response = client.read_response()
        assert (response.status, response.body) == (200, b"final")
        assert response.header("Link") is None  # the 103's fields stay on the 103
        # The connection goes on: the next request is answered in its turn.
        again = client.request(get("/early"))
        assert again.status == 103
        interim, response = read_until_final(client)
        assert [r.status for r in interim] == [102]
        assert (response.status, response.body) == (200, b"final")


def test_an_http10_client_gets_the_final_response_alone(daemon):
    with RawClient(daemon.port) as client:
        response = client.request(get("/early", b"1.0"))
        assert (response.status, response.body) == (200, b"final")
        assert client.reader.buf == b""


def test_the_cache_stores_the_final_response_not_the_interim_one(daemon, upstreams):
    one, _ = upstreams
    with RawClient(daemon.port) as client:
        client.send(get("/cached"))
        interim, response = read_until_final(client)
        assert [r.status for r in interim] == [103]
        assert response.body == b"stored"
        assert response.header("Cache-Status") == "sluicegate; fwd=uri-miss; stored"
        client.send(get("/cached"))
        hit = client.read_response()  # the first thing on the wire: no 103 before a hit
        assert (hit.status, hit.body) == (200, b"stored")
        assert hit.header("Cache-Status") == "sluicegate; hit"
        for hint_field in ("Link", "X-My-Header"):
            assert hit.header(hint_field) is None
    assert [r.target for r in one.requests].count(b"/cached") == 1


def test_a_try_that_dies_after_a_103_is_retried(daemon, script):
    """The 103 went out, but it is not the answer: the try failed with none (``error``),
    and the request goes to the other server, whose 103 and answer follow."""
    with RawClient(daemon.port) as client:
        client.send(get("/retry"))
        interim, response = read_until_final(client)
        assert [r.status for r in interim] == [103, 103]
        assert (response.status, response.body) == (200, b"second try")
    assert script.retries_died == 2


def test_interim_heads_count_against_the_response_head_limit(daemon):
    with RawClient(daemon.port) as client:
        client.send(get("/flood"))
        interim, response = read_until_final(client)
        assert {r.status for r in interim} == {102}
        assert 0 < len(interim) * len(PROCESSING) <= 64 * 1024
        assert response.status == 502
        assert response.json()["error"]
