"""Every answer on a cached route carries ``Cache-Status`` (RFC 9211), the proxy's own
answers too, and ``stored`` is said only of a response that will be stored."""

from __future__ import annotations

import re
import socket
from types import SimpleNamespace

from tests.integration.test_cache_e2e import Origin, cached_config, fresh_for
from tests.support.daemon import wait_for
from tests.support.rawupstream import RawUpstream


def test_a_429_on_a_cached_route_says_the_cache_was_bypassed(start_sluicegate):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream, rate_limit={"rate": "1/m", "burst": 1})
        daemon = start_sluicegate(config)
        assert daemon.get("/a")[0] == 200
        status, headers, _ = daemon.get("/b")
        assert status == 429
        assert headers["cache-status"] == "sluicegate; fwd=bypass; detail=rate-limit"
        assert headers["ratelimit-limit"] == "1"  # the limiter's fields stay
        assert daemon.status()["routes"][0]["cache"]["misses"] == 1


def test_a_502_on_a_cached_route_carries_cache_status(start_sluicegate):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = cached_config(SimpleNamespace(url=f"http://127.0.0.1:{port}"))
    daemon = start_sluicegate(config)
    status, headers, _ = daemon.get("/down")
    assert status == 502
    assert headers["cache-status"] == "sluicegate; fwd=uri-miss"


def chunked(body: bytes):
    def respond(request, sock) -> bool:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        )
        return True

    return respond


def test_stored_is_said_only_of_a_body_known_to_fit(start_sluicegate):
    with RawUpstream(chunked(b"x" * 2000)) as upstream:
        config = cached_config(upstream)
        config["cache"]["max_object_size"] = "1KiB"
        daemon = start_sluicegate(config)
        status, headers, body = daemon.get("/big")
        assert (status, len(body)) == (200, 2000)
        assert headers["cache-status"] == "sluicegate; fwd=uri-miss"  # it did not fit
        assert daemon.get("/big")[1]["cache-status"] == "sluicegate; fwd=uri-miss"


def test_a_chunked_body_within_the_limit_is_stored_without_saying_so_first(start_sluicegate):
    with RawUpstream(chunked(b"small")) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        assert daemon.get("/small")[1]["cache-status"] == "sluicegate; fwd=uri-miss"
        status, headers, body = daemon.get("/small")
        assert (status, body, headers["cache-status"]) == (200, b"small", "sluicegate; hit")


def test_the_background_revalidation_is_counted_like_any_upstream_request(start_sluicegate):
    def answer(request):
        headers = [b"Cache-Control: max-age=10, stale-while-revalidate=600", b'ETag: "w"']
        if request.header("if-none-match") == '"w"':
            return b"304 Not Modified", headers, b""
        return b"200 OK", [*headers, b"Age: 100"], b"old"  # stale on arrival, within swr

    origin = Origin(answer)
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        daemon.get("/swr")
        assert daemon.get("/swr")[1]["cache-status"].endswith("stale-while-revalidate")
        wait_for(lambda: origin.count() == 2, message="the background revalidation")
        wait_for(
            lambda: re.search(
                r'sluicegate_upstream_requests_total\{[^}]*status="304"[^}]*\} 1(\.0)?$',
                daemon.metrics(),
                re.M,
            ),
            message="the 304 in sluicegate_upstream_requests_total",
        )
        server = daemon.status()["upstreams"]["app"]["servers"][0]
        assert server["requests"] == 2 and server["in_flight"] == 0
