"""Path normalisation end to end: the real daemon, exact bytes on raw sockets, a raw upstream
that records the request-target it was sent.

The config is the one a bypass needs: a rate-limited ``/limited/`` route before a catch-all.
Every other spelling of ``/limited/x`` must be matched by ``/limited/``, counted against its
bucket, and reach the upstream as ``/limited/x`` with its query untouched; spellings of
other paths (an encoded slash, another case) must not; malformed targets get 400.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.daemon import Daemon, raw_exchange, start_daemon, wait_for
from tests.support.rawupstream import RawClient, RawUpstream, simple_response

# Every one of these is /limited/x once normalised.
SPELLINGS = [
    b"/limited/x",
    b"/%6Cimited/x",  # an unreserved character percent-encoded
    b"/%6cimited/x",  # hex is case-insensitive
    b"/lim%69ted/%78",
    b"//limited/x",  # repeated slashes
    b"/limited//x",
    b"///limited///x",
    b"/./limited/x",  # dot segments
    b"/limited/./x",
    b"/a/../limited/x",
    b"/limited/y/../x",
    b"/a/b/../../limited/x",
    b"/%2e/limited/x",  # encoded dot segments
    b"/a/%2e%2e/limited/x",
    b"/a/%2E%2E/limited/x",
    b"/a/.%2e/limited/x",
    b"/a//..//limited/./x",
]
QUERY = b"?a=%2f&b=/../c&d=%6C"  # forwarded exactly as sent


def _config(upstream_url: str, burst: int) -> dict[str, Any]:
    return {
        "upstreams": {"app": {"servers": [{"url": upstream_url}], "retry": {"tries": 1}}},
        "routes": [
            {
                "name": "limited",
                "match": {"path_prefix": "/limited/"},
                "upstream": "app",
                "rate_limit": {"rate": "1/m", "burst": burst, "key": "route"},
            },
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
    }


@pytest.fixture
def upstream():
    with RawUpstream(simple_response()) as raw:
        yield raw


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    """One daemon for the cases that never reach the limited route: (daemon, upstream)."""
    with RawUpstream(simple_response()) as raw:
        daemon = start_daemon(tmp_path_factory.mktemp("pathnorm"), _config(raw.url, burst=1))
        yield daemon, raw
        daemon.stop()


def _get(client: RawClient, target: bytes) -> Any:
    return client.request(b"GET " + target + b" HTTP/1.1\r\nHost: app\r\n\r\n")


def test_every_spelling_is_matched_and_counted_by_the_limited_route(start_sluicegate, upstream):
    daemon: Daemon = start_sluicegate(_config(upstream.url, burst=len(SPELLINGS)))
    with RawClient(daemon.port) as client:
        for used, spelling in enumerate(SPELLINGS, start=1):
            response = _get(client, spelling + QUERY)
            assert response.status == 200, spelling
            # Only the limited route answers with RateLimit headers, one token per request.
            assert response.header("RateLimit-Limit") == str(len(SPELLINGS)), spelling
            assert response.header("RateLimit-Remaining") == str(len(SPELLINGS) - used), spelling
        assert _get(client, b"/limited/x").status == 429  # the bucket all of them shared
    assert [r.target for r in upstream.requests] == [b"/limited/x" + QUERY] * len(SPELLINGS)
    # The access log names the path the route matched, not the spelling.
    lines = wait_for(
        lambda: [x for x in daemon.access_log() if x["route"] == "limited"][len(SPELLINGS) :],
        message="all access lines",
    )
    assert lines[0]["status"] == 429
    assert {x["path"] for x in daemon.access_log() if x["route"] == "limited"} == {"/limited/x"}


def test_a_small_burst_cannot_be_escaped_by_respelling(start_sluicegate, upstream):
    daemon = start_sluicegate(_config(upstream.url, burst=2))
    with RawClient(daemon.port) as client:
        statuses = [_get(client, s).status for s in SPELLINGS[:6]]
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert len(upstream.requests) == 2


@pytest.mark.parametrize(
    ("spelling", "forwarded"),
    [
        (b"/%2Flimited/x", b"/%2Flimited/x"),  # an encoded slash is not a separator
        (b"/%2flimited/x", b"/%2Flimited/x"),  # ...and its hex is upper-cased
        (b"/limited%2Fx", b"/limited%2Fx"),
        (b"/LIMITED/x", b"/LIMITED/x"),  # paths are case-sensitive
        (b"/%4Cimited/x", b"/Limited/x"),
        (b"/limited", b"/limited"),
        (b"/limited/x/../../y", b"/y"),
        (b"/a%20b/%c3%a9?x=%zz", b"/a%20b/%C3%A9?x=%zz"),  # the query is never touched
    ],
)
def test_other_paths_stay_other_paths(shared, spelling, forwarded):
    daemon, upstream = shared
    before = len(upstream.requests)
    with RawClient(daemon.port) as client:
        for _ in range(2):  # the limited route (burst 1) would answer the second with 429
            response = _get(client, spelling)
            assert response.status == 200
            assert response.header("RateLimit-Limit") is None
    assert [r.target for r in upstream.requests[before:]] == [forwarded, forwarded]


def test_strip_prefix_works_on_the_normal_path(start_sluicegate, upstream):
    config = _config(upstream.url, burst=5)
    config["routes"][0]["strip_prefix"] = True
    daemon = start_sluicegate(config)
    with RawClient(daemon.port) as client:
        for spelling in (b"/%6Cimited/x?q=1", b"//limited/./x?q=1", b"/z/../limited/x?q=1"):
            assert _get(client, spelling).status == 200
    assert [r.target for r in upstream.requests] == [b"/x?q=1"] * 3


def test_absolute_form_is_normalised_too(start_sluicegate, upstream):
    daemon = start_sluicegate(_config(upstream.url, burst=5))
    with RawClient(daemon.port) as client:
        response = client.request(
            b"GET http://app/a/../%6Cimited//x?q=%2e HTTP/1.1\r\nHost: app\r\n\r\n"
        )
        assert response.status == 200
        assert response.header("RateLimit-Limit") == "5"
    assert [r.target for r in upstream.requests] == [b"/limited/x?q=%2e"]


REFUSED = [
    (b"/echo#frag", "fragment in request target"),
    (b"/limited/x?a=1#frag", "fragment in request target"),
    (b"/limited/x%00", "NUL in request target"),
    (b"/limited/x?a=%00", "NUL in request target"),
    (b"/..", "request target climbs above the root"),
    (b"/../limited/x", "request target climbs above the root"),
    (b"/limited/../../x", "request target climbs above the root"),
    (b"/%2e%2e/limited/x", "request target climbs above the root"),
    (b"/limited/%zz", "invalid percent-encoding in request target"),
    (b"/limited/x%", "invalid percent-encoding in request target"),
    (b"/limited/x%4", "invalid percent-encoding in request target"),
]


@pytest.mark.parametrize(("target", "reason"), REFUSED)
def test_malformed_targets_get_400_and_nothing_is_forwarded(shared, target, reason):
    daemon, upstream = shared
    before = len(upstream.requests)
    data = raw_exchange(daemon.port, b"GET " + target + b" HTTP/1.1\r\nHost: app\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), data[:300]
    assert b"\r\nConnection: close" in head
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error"] == reason
    assert len(upstream.requests) == before
