"""The response cache through the real daemon, with a counting upstream."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.daemon import http_request, wait_for
from tests.support.rawupstream import RawUpstream


class Origin:
    """A scripted origin: ``answer(request) -> (status line, header lines, body)``; counts
    the requests it gets per path."""

    def __init__(self, answer, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.seen: list = []
        self.lock = threading.Lock()

    def __call__(self, request, sock) -> bool:
        with self.lock:
            self.seen.append(request)
        if self.delay:
            time.sleep(self.delay)
        status, headers, body = self.answer(request)
        payload = b"" if request.method == b"HEAD" or status.startswith(b"304") else body
        sock.sendall(
            b"HTTP/1.1 %b\r\n%bContent-Length: %d\r\n\r\n%b"
            % (status, b"".join(h + b"\r\n" for h in headers), len(body), payload)
        )
        return True

    def count(self, path: bytes | None = None) -> int:
        return sum(1 for r in self.seen if path is None or r.target == path)


def cached_config(upstream: RawUpstream, route_cache=None, **route) -> dict:
    return {
        "cache": {"max_size": "16MiB", "max_object_size": "1MiB", "lock_timeout": "5s"},
        "upstreams": {"app": {"servers": [{"url": upstream.url}], "retry": {"tries": 1}}},
        "routes": [
            {
                "name": "cached",
                "match": {"path_prefix": "/"},
                "upstream": "app",
                "cache": route_cache or {},
                **route,
            }
        ],
    }


def fresh_for(seconds: int, body: bytes = b"hello", extra=()):
    def answer(request):
        return b"200 OK", [b"Cache-Control: max-age=%d" % seconds, *extra], body

    return answer


def test_a_hit_is_served_without_the_upstream(start_sluicegate):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        status, headers, body = daemon.get("/a?x=1")
        assert (status, body) == (200, b"hello")
        assert headers["cache-status"] == "sluicegate; fwd=uri-miss; stored"
        status, headers, body = daemon.get("/a?x=1")
        assert (status, body) == (200, b"hello")
        assert headers["cache-status"] == "sluicegate; hit"
        assert int(headers["age"]) >= 0
        assert origin.count() == 1
        _, headers, _ = daemon.get("/a?x=2")  # another query: another key
        assert headers["cache-status"].startswith("sluicegate; fwd=uri-miss")
        assert origin.count() == 2
        status, headers, body = http_request(daemon.port, "HEAD", "/a?x=1")
        assert headers["cache-status"] == "sluicegate; hit" and body == b""
        assert headers["content-length"] == "5"
        assert origin.count() == 2
        metrics = daemon.metrics()
        assert 'sluicegate_cache_requests_total{result="hit",route="cached"} 2.0' in metrics
        assert 'sluicegate_cache_requests_total{result="miss",route="cached"} 2.0' in metrics
        assert "sluicegate_cache_objects 2.0" in metrics
        lines = wait_for(
            lambda: [line["cache"] for line in daemon.access_log() if line.get("path") == "/a"],
            message="access lines",
        )
        assert lines[:2] == ["miss", "hit"]


def test_never_stored_responses_go_upstream_each_time(start_sluicegate):
    origin = Origin(lambda r: (b"200 OK", [b"Cache-Control: no-store"], b"x"))
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        for _ in range(3):
            _, headers, _ = daemon.get("/n")
            assert headers["cache-status"] == "sluicegate; fwd=uri-miss"
        assert origin.count() == 3


def test_vary_keeps_variants_apart(start_sluicegate):
    def answer(request):
        language = (request.header("accept-language") or "none").encode()
        return b"200 OK", [b"Cache-Control: max-age=60", b"Vary: Accept-Language"], language

    origin = Origin(answer)
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        for language in ("fr", "de", "fr", "de"):
            _, _, body = daemon.get("/v", headers={"Accept-Language": language})
            assert body == language.encode()
        assert origin.count() == 2
        _, headers, body = daemon.get("/v")
        assert body == b"none" and headers["cache-status"] == "sluicegate; fwd=miss; stored"


def test_route_key_parts_separate_entries(start_sluicegate):
    origin = Origin(
        lambda r: (
            b"200 OK",
            [b"Cache-Control: max-age=60"],
            (r.header("x-tenant") or "-").encode(),
        )
    )
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream, {"key": ["header:X-Tenant"]}))
        assert daemon.get("/k", headers={"X-Tenant": "a"})[2] == b"a"
        assert daemon.get("/k", headers={"X-Tenant": "b"})[2] == b"b"
        assert daemon.get("/k", headers={"X-Tenant": "a"})[2] == b"a"
        assert origin.count() == 2


def test_fifty_concurrent_misses_make_one_upstream_request(start_sluicegate):
    origin = Origin(fresh_for(60, b"slow"), delay=0.5)
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda _: daemon.get("/cold"), range(50)))
        assert all(status == 200 and body == b"slow" for status, _, body in results)
        assert origin.count() == 1
        statuses = sorted(headers["cache-status"] for _, headers, _ in results)
        assert statuses.count("sluicegate; fwd=uri-miss; stored") == 1
        assert all(
            s
            in (
                "sluicegate; fwd=uri-miss; collapsed",
                "sluicegate; hit",
                "sluicegate; fwd=uri-miss; stored",
            )
            for s in statuses
        )
        assert 'result="coalesced"' in daemon.metrics()


def test_followers_go_themselves_when_the_answer_is_not_storable(start_sluicegate):
    origin = Origin(lambda r: (b"200 OK", [b"Cache-Control: private"], b"mine"), delay=0.3)
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda _: daemon.get("/p"), range(5)))
        assert all(body == b"mine" for _, _, body in results)
        assert origin.count() == 5


def test_revalidation_with_etag_and_a_304_updating_headers(start_sluicegate):
    version = {"n": 1}

    def answer(request):
        headers = [b"Cache-Control: max-age=0", b'ETag: "e1"', b"X-Version: %d" % version["n"]]
        if request.header("if-none-match") == '"e1"':
            return b"304 Not Modified", headers, b""
        return b"200 OK", headers, b"body-one"

    origin = Origin(answer)
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        _, headers, body = daemon.get("/r")
        assert headers["cache-status"] == "sluicegate; fwd=uri-miss; stored"
        version["n"] = 2
        status, headers, body = daemon.get("/r")
        assert (status, body) == (200, b"body-one")
        assert headers["x-version"] == "2"
        assert headers["cache-status"] == "sluicegate; fwd=stale; fwd-status=304"
        assert origin.seen[1].header("if-none-match") == '"e1"'
        status, headers, _ = daemon.get("/r", headers={"If-None-Match": '"e1"'})
        assert status == 304  # the client's own conditional, answered from the entry
        assert 'result="revalidated"' in daemon.metrics()


def test_revalidation_with_last_modified(start_sluicegate):
    last_modified = b"Last-Modified: Sun, 06 Nov 1994 08:49:37 GMT"

    def answer(request):
        if request.header("if-modified-since"):
            return b"304 Not Modified", [b"Cache-Control: no-cache", last_modified], b""
        return b"200 OK", [b"Cache-Control: no-cache", last_modified], b"lm-body"

    origin = Origin(answer)
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        daemon.get("/lm")
        status, _headers, body = daemon.get("/lm")
        assert (status, body) == (200, b"lm-body")
        assert origin.seen[1].header("if-modified-since") == "Sun, 06 Nov 1994 08:49:37 GMT"


def test_unsafe_methods_invalidate_target_and_location(start_sluicegate):
    def answer(request):
        if request.method == b"POST":
            return b"201 Created", [b"Location: /items/2"], b""
        return b"200 OK", [b"Cache-Control: max-age=60"], request.target

    origin = Origin(answer)
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        daemon.get("/items")
        daemon.get("/items/2")
        assert daemon.get("/items")[1]["cache-status"] == "sluicegate; hit"
        status, headers, _ = http_request(daemon.port, "POST", "/items", body=b"{}")
        assert status == 201 and headers["cache-status"] == "sluicegate; fwd=bypass"
        assert daemon.get("/items")[1]["cache-status"].startswith("sluicegate; fwd=uri-miss")
        assert daemon.get("/items/2")[1]["cache-status"].startswith("sluicegate; fwd=uri-miss")
        metrics = daemon.metrics()
        assert 'sluicegate_cache_purged_total{by="invalidation"} 2.0' in metrics


def test_stale_if_error_serves_the_stale_entry(start_sluicegate):
    state = {"fail": False}

    def answer(request):
        if state["fail"]:
            return b"503 Service Unavailable", [], b"down"
        return b"200 OK", [b"Cache-Control: max-age=0, stale-if-error=60", b'ETag: "s"'], b"good"

    origin = Origin(answer)
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        daemon.get("/s")
        state["fail"] = True
        status, headers, body = daemon.get("/s")
        assert (status, body) == (200, b"good")
        assert headers["cache-status"] == "sluicegate; fwd=stale; fwd-status=503"


def test_only_if_cached_miss_is_504(start_sluicegate):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        status, _, _ = daemon.get("/o", headers={"Cache-Control": "only-if-cached"})
        assert status == 504 and origin.count() == 0


def test_compressed_variant_is_stored_and_not_compressed_again(start_sluicegate):
    page = b"<p>cache me and squeeze me</p>" * 200
    origin = Origin(
        lambda r: (b"200 OK", [b"Cache-Control: max-age=60", b"Content-Type: text/html"], page)
    )
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream, compress={"algorithms": ["gzip"]}))
        import gzip

        for _ in range(3):
            _status, headers, body = daemon.get("/z", headers={"Accept-Encoding": "gzip"})
            assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == page
        _, headers, body = daemon.get("/z")
        assert "content-encoding" not in headers and body == page
        assert origin.count() == 2
        metrics = daemon.metrics()
        assert (
            'sluicegate_compressed_responses_total{algorithm="gzip",route="cached"} 1.0' in metrics
        )


def test_admin_purge_by_url_prefix_and_tag(start_sluicegate):
    def answer(request):
        tags = b"Cache-Tag: product, p-%b" % request.target.rsplit(b"/", 1)[-1]
        return b"200 OK", [b"Cache-Control: max-age=60", tags], request.target

    origin = Origin(answer)
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream)
        config["admin"] = {"token_env": "CACHE_TEST_TOKEN"}
        daemon = start_sluicegate(config, env={"CACHE_TEST_TOKEN": "tok"})
        paths = ["/shop/a?x=1", "/shop/b", "/shop/c", "/blog/d"]
        for path in paths:
            daemon.get(path, headers={"Host": "example.com"})
        auth = {"Authorization": "Bearer tok", "Content-Type": "application/json"}

        def purge(body: bytes, headers=auth):
            return daemon.admin("POST", "/cache/purge", body=body, headers=headers)

        assert purge(b'{"url": "http://example.com/shop/a?x=1"}', headers={})[0] == 401
        status, _, body = purge(b'{"url": "http://example.com/shop/a?x=1"}')
        assert (status, body) == (200, b'{"purged": 1}')
        assert purge(b'{"tag": "p-b"}')[2] == b'{"purged": 1}'
        assert purge(b'{"prefix": "http://EXAMPLE.com/shop/"}')[2] == b'{"purged": 1}'
        assert purge(b'{"tag": "product"}')[2] == b'{"purged": 1}'  # only /blog/d is left
        assert purge(b'{"tag": "product"}')[2] == b'{"purged": 0}'
        for bad in (
            b"not json",
            b"[]",
            b"{}",
            b'{"url": 1}',
            b'{"colour": "x"}',
            b'{"url": "a", "tag": "b"}',
        ):
            status, _, body = purge(bad)
            assert status == 400, bad
            assert b"error" in body
        metrics = daemon.metrics()
        for by in ("url", "prefix", "tag"):
            assert f'sluicegate_cache_purged_total{{by="{by}"}}' in metrics
        assert "sluicegate_cache_objects 0.0" in metrics
        daemon.get("/shop/b", headers={"Host": "example.com"})
        assert origin.count(b"/shop/b") == 2  # purged: fetched again


def test_purge_without_a_cache_is_404(start_sluicegate):
    with RawUpstream(Origin(fresh_for(1))) as upstream:
        config = cached_config(upstream)
        del config["cache"]
        del config["routes"][0]["cache"]
        daemon = start_sluicegate(config)
        status, _, _ = daemon.admin("POST", "/cache/purge", body=b'{"tag": "x"}')
        assert status == 404


def test_store_stays_within_max_size_and_counts_evictions(start_sluicegate):
    body = b"x" * 100_000
    origin = Origin(fresh_for(60, body))
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream)
        config["cache"]["max_size"] = "1MiB"
        daemon = start_sluicegate(config)
        for i in range(30):
            daemon.get(f"/big/{i}")
        metrics = daemon.metrics()
        stored = float(re.search(r"^sluicegate_cache_stored_bytes (\S+)$", metrics, re.M).group(1))
        evictions = float(
            re.search(r"^sluicegate_cache_evictions_total (\S+)$", metrics, re.M).group(1)
        )
        assert 0 < stored <= 1024 * 1024
        assert evictions >= 20


def test_larger_than_max_object_size_streams_through_unstored(start_sluicegate):
    origin = Origin(fresh_for(60, b"y" * (2 * 1024 * 1024)))
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        for _ in range(2):
            status, headers, body = daemon.get("/huge")
            assert status == 200 and len(body) == 2 * 1024 * 1024
            assert headers["cache-status"] == "sluicegate; fwd=uri-miss"
        assert origin.count() == 2


def test_purge_reaches_every_worker(start_sluicegate):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream)
        config["workers"] = 2
        daemon = start_sluicegate(config)
        status, _, body = daemon.admin("POST", "/cache/purge", body=b'{"prefix": "http://x/"}')
        assert (status, body) == (200, b'{"purged": 0}')
        for _ in range(6):  # connections spread over the workers; each stores its own copy
            daemon.get("/w")
        stored = origin.count()
        assert 1 <= stored <= 2
        status, _, body = daemon.admin(
            "POST", "/cache/purge", body=b'{"url": "http://127.0.0.1/w"}'
        )
        assert status == 200
        assert json.loads(body)["purged"] == 0  # the Host is 127.0.0.1:PORT, not 127.0.0.1
        host = f"127.0.0.1:{daemon.port}"
        status, _, body = daemon.admin(
            "POST", "/cache/purge", body=f'{{"url": "http://{host}/w"}}'.encode()
        )
        assert json.loads(body)["purged"] == stored


def test_a_method_of_unknown_safety_invalidates_too(start_sluicegate):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        daemon.get("/m")
        assert daemon.get("/m")[1]["cache-status"] == "sluicegate; hit"
        assert http_request(daemon.port, "M-SEARCH", "/m")[0] == 200
        assert daemon.get("/m")[1]["cache-status"].startswith("sluicegate; fwd=uri-miss")
        assert http_request(daemon.port, "OPTIONS", "/m")[0] == 200  # safe: no invalidation
        assert daemon.get("/m")[1]["cache-status"] == "sluicegate; hit"


def test_stale_while_revalidate_answers_at_once_and_revalidates_behind(start_sluicegate):
    def answer(request):
        headers = [b"Cache-Control: max-age=10, stale-while-revalidate=600", b'ETag: "w"']
        if request.header("if-none-match") == '"w"':
            return b"304 Not Modified", headers, b""
        return b"200 OK", [*headers, b"Age: 100"], b"old"  # stale on arrival, within swr

    origin = Origin(answer)
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        daemon.get("/swr")
        status, headers, body = daemon.get("/swr")
        assert (status, body) == (200, b"old")
        assert headers["cache-status"] == "sluicegate; hit; detail=stale-while-revalidate"
        wait_for(lambda: origin.count() == 2, message="the background revalidation")
        assert origin.seen[1].header("if-none-match") == '"w"'
        # Freshened by the 304 (no Age this time): fresh again.
        wait_for(lambda: daemon.get("/swr")[1]["cache-status"] == "sluicegate; hit")
        assert origin.count() == 2


def test_a_reload_keeps_the_store(start_sluicegate):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        daemon.get("/kept")
        assert daemon.admin("POST", "/reload")[0] == 200
        assert daemon.get("/kept")[1]["cache-status"] == "sluicegate; hit"
        assert origin.count() == 1


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_stays_bounded_while_the_store_churns(start_sluicegate):
    """100 MiB of distinct cacheable responses through a 16 MiB store: the stored bytes
    stay under max_size and the process grows by about that much, not by what passed."""
    body = bytes(range(256)) * 1024  # 256 KiB
    origin = Origin(fresh_for(600, body))
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream)
        config["cache"]["max_size"] = "16MiB"
        daemon = start_sluicegate(config)
        daemon.get("/warm")
        before = rss_bytes(daemon.pid)
        for i in range(400):
            assert len(daemon.get(f"/churn/{i}")[2]) == len(body)
        grown = rss_bytes(daemon.pid) - before
        metrics = daemon.metrics()
        stored = float(re.search(r"^sluicegate_cache_stored_bytes (\S+)$", metrics, re.M).group(1))
        assert stored <= 16 * 1024 * 1024
        assert grown < 40 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB"


def test_a_body_cut_short_is_not_stored(start_sluicegate):
    calls = {"n": 0}

    def respond(request, sock):
        calls["n"] += 1
        head = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 1000\r\n\r\n"
        if calls["n"] == 1:
            sock.sendall(head + b"x" * 500)  # then the connection closes: 500 bytes short
            return False
        sock.sendall(head + b"y" * 1000)
        return True

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(cached_config(upstream))
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            daemon.get("/cut")  # the client sees the cut
        status, headers, body = daemon.get("/cut")
        assert (status, body) == (200, b"y" * 1000)
        assert headers["cache-status"] == "sluicegate; fwd=uri-miss; stored"
        assert daemon.get("/cut")[1]["cache-status"] == "sluicegate; hit"
