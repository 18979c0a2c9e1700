"""merge_worker_status: one /status from every worker's, as the supervisor answers it."""

from __future__ import annotations

import copy

from proxy.control.supervisor import merge_worker_status


def server(url: str, address: str, **fields) -> dict:
    entry = {
        "url": url,
        "address": address,
        "zone": "a",
        "weight": 1,
        "backup": False,
        "health": "up",
        "breaker": "closed",
        "in_flight": 0,
        "requests": 0,
        "failures": 0,
        "draining": False,
        "outcomes": {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "errors": 0, "timeouts": 0},
        "last_check": None,
        "request_rate": 0.0,
        "error_rate": 0.0,
        "p50_ms": None,
        "p99_ms": None,
    }
    entry.update(fields)
    return entry


def route(name: str, cache: dict | None = None, **fields) -> dict:
    return {
        "name": name,
        "upstream": "api",
        "requests": 0,
        "rate_limited": 0,
        "limit": {"rate": 10.0, "burst": 20, "key": "client_ip", "mode": "enforce"},
        "cache": cache,
        **fields,
    }


def reply(servers: list[dict], routes: list[dict], eligible: bool = True) -> dict:
    return {
        "zone": "a",
        "routes": routes,
        "upstreams": {
            "api": {"policy": "round_robin", "has_eligible_server": eligible, "servers": servers}
        },
    }


def cache(hits: int, objects: int, size: int) -> dict:
    return {"hits": hits, "misses": 1, "stale": 0, "objects": objects, "bytes": size}


def test_counters_outcomes_and_routes_add_up_over_workers():
    one = reply(
        [server("http://a", "10.0.0.1:80", requests=3, request_rate=0.3,
                outcomes={"2xx": 2, "5xx": 1, "errors": 0, "timeouts": 0})],
        [route("api", requests=3, rate_limited=1, cache=cache(2, 4, 400))],
    )  # fmt: skip
    two = reply(
        [server("http://a", "10.0.0.1:80", requests=4, request_rate=0.4,
                outcomes={"2xx": 3, "5xx": 0, "errors": 1, "timeouts": 2})],
        [route("api", requests=4, rate_limited=2, cache=cache(5, 6, 600))],
    )  # fmt: skip
    merged = merge_worker_status([one, two], shared_cache=False)
    (entry,) = merged["upstreams"]["api"]["servers"]
    assert entry["requests"] == 7 and entry["request_rate"] == 0.7
    assert entry["outcomes"] == {"2xx": 5, "5xx": 1, "errors": 1, "timeouts": 2}
    assert entry["zone"] == "a" and entry["address"] == "10.0.0.1:80"
    (merged_route,) = merged["routes"]
    assert (merged_route["requests"], merged_route["rate_limited"]) == (7, 3)
    assert merged_route["limit"] == one["routes"][0]["limit"]
    assert merged_route["cache"] == {
        "hits": 7, "misses": 2, "stale": 0, "objects": 10, "bytes": 1000,
    }  # fmt: skip
    assert merged["zone"] == "a"


def test_a_shared_cache_store_is_counted_once():
    one = reply([], [route("api", cache=cache(1, 4, 400))])
    two = reply([], [route("api", cache=cache(1, 4, 400))])
    merged = merge_worker_status([one, two], shared_cache=True)
    assert merged["routes"][0]["cache"] == {
        "hits": 2, "misses": 2, "stale": 0, "objects": 4, "bytes": 400,
    }  # fmt: skip


def test_servers_are_matched_by_url_and_address_not_position():
    """Servers found by DNS may be listed in another order, or only, by one worker."""
    name = "http://api.svc:80"
    one = reply(
        [server(name, "10.0.0.1:80", requests=1), server(name, "10.0.0.2:80", requests=10)], []
    )
    two = reply(
        [
            server(name, "10.0.0.2:80", requests=20),
            server(name, "10.0.0.1:80", requests=2),
            server(name, "10.0.0.3:80", requests=5),
        ],
        [],
    )
    merged = merge_worker_status([one, two], shared_cache=False)
    servers = merged["upstreams"]["api"]["servers"]
    assert [(s["address"], s["requests"]) for s in servers] == [
        ("10.0.0.1:80", 3),
        ("10.0.0.2:80", 30),
        ("10.0.0.3:80", 5),
    ]


def test_worst_state_and_newest_check_win():
    early = {"result": "pass", "at": "2026-01-01T00:00:01.000Z", "reason": None}
    late = {"result": "fail", "at": "2026-01-01T00:00:02.000Z", "reason": "timeout"}
    one = reply([server("http://a", "a:80", last_check=late)], [], eligible=True)
    two = reply(
        [server("http://a", "a:80", last_check=early, health="down", draining=True)],
        [],
        eligible=False,
    )
    merged = merge_worker_status([one, two], shared_cache=False)
    upstream = merged["upstreams"]["api"]
    (entry,) = upstream["servers"]
    assert entry["last_check"] == late and entry["health"] == "down" and entry["draining"]
    assert upstream["has_eligible_server"] is False
    merged = merge_worker_status([two, one], shared_cache=False)
    assert merged["upstreams"]["api"]["servers"][0]["last_check"] == late


def test_the_workers_replies_are_left_as_they_were():
    one = reply([server("http://a", "a:80", requests=1)], [route("api", cache=cache(1, 1, 1))])
    two = copy.deepcopy(one)
    before = copy.deepcopy(one)
    merge_worker_status([one, two], shared_cache=False)
    assert one == before


def test_no_workers_answering_is_an_empty_status():
    assert merge_worker_status([], shared_cache=False) == {
        "zone": None,
        "routes": [],
        "upstreams": {},
    }
