"""Sticky ids, zone affinity and entry changes in ``UpstreamGroup``, on real runtime objects
(no I/O: a runtime is built, never started)."""

from __future__ import annotations

import collections
from typing import Any

from proxy.balancing.servers import Server
from proxy.balancing.slowstart import SlowStart
from proxy.balancing.sticky import ID_LENGTH, StickyTable, server_id, upstream_key
from proxy.config import parse_config
from proxy.control.runtime import Runtime, _breaker_transition, _health_result
from proxy.observability import metrics
from tests.support.clock import FakeClock


def runtime(upstream: dict[str, Any], **top: Any) -> Runtime:
    config = parse_config(
        {
            "listen": [{"address": "127.0.0.1:18080"}],
            "admin": {"address": "127.0.0.1:18081"},
            "upstreams": {"u": upstream},
            "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "u"}],
            **top,
        },
        "test.yaml",
    )
    return Runtime(config, limiter=None, access_log=None)


def picks(group, n: int = 100, **kwargs: Any) -> collections.Counter[str]:
    return collections.Counter(group.select(None, **kwargs).label for _ in range(n))


THREE = [{"url": f"http://10.0.0.{i}:80"} for i in (1, 2, 3)]


# -- sticky ids ---------------------------------------------------------------------------------


def test_sticky_ids_are_opaque_stable_and_the_same_for_every_instance():
    one = runtime({"servers": THREE, "sticky": {"cookie": "sg"}}).groups["u"]
    two = runtime({"servers": THREE, "sticky": {"cookie": "sg"}}).groups["u"]
    for a, b in zip(one.servers, two.servers, strict=True):
        header = one.sticky.set_cookie(a, None)
        value = header.split(b"=", 1)[1].split(b";", 1)[0]
        assert len(value) == ID_LENGTH and b"10.0.0" not in value
        assert two.sticky.server_for(value) is b  # another instance decodes it alike
    assert header.endswith(b"; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax\r\n")
    # The key is the upstream's name: another upstream's ids are other ids.
    assert server_id(upstream_key("u"), THREE[0]["url"], "10.0.0.1:80") != server_id(
        upstream_key("v"), THREE[0]["url"], "10.0.0.1:80"
    )


def test_sticky_ignores_forged_values_and_sets_the_cookie_only_when_it_changes():
    group = runtime({"servers": THREE, "sticky": {"cookie": "sg", "ttl": "10m"}}).groups["u"]
    table: StickyTable = group.sticky
    first = group.servers[0]
    value = table.set_cookie(first, None).split(b"=", 1)[1].split(b";", 1)[0]
    assert table.set_cookie(first, value) == b""  # already pinned there: nothing to set
    assert b"Max-Age=600;" in table.set_cookie(group.servers[1], value)
    for forged in (b"", b"x" * ID_LENGTH, value[:-1] + b"A" if value[-1:] != b"A" else b"B"):
        assert table.server_for(forged) is None


def test_a_pinned_server_is_followed_while_eligible():
    group = runtime({"servers": THREE, "sticky": {}}).groups["u"]
    pinned = group.servers[2]
    assert picks(group, pinned=pinned) == {pinned.label: 100}
    pinned.draining = True
    assert pinned.label not in picks(group, pinned=pinned)
    pinned.draining = False
    assert group.select(None, {pinned}, pinned) is not pinned  # a retry goes elsewhere


# -- zone affinity ------------------------------------------------------------------------------

ZONED = [
    {"url": "http://10.0.1.1:80", "zone": "a"},
    {"url": "http://10.0.1.2:80", "zone": "a"},
    {"url": "http://10.0.2.1:80", "zone": "b"},
    {"url": "http://10.0.2.2:80", "zone": "b"},
]


def test_zone_affinity_keeps_to_the_zone_while_enough_of_it_is_eligible():
    group = runtime(
        {"servers": ZONED, "zone_affinity": {"min_healthy_percent": 60}}, zone="a"
    ).groups["u"]
    assert set(picks(group)) == {"10.0.1.1:80", "10.0.1.2:80"}
    group.servers[0].draining = True  # 1 of 2 eligible: 50% < 60%: everyone's turn
    assert set(picks(group)) == {"10.0.1.2:80", "10.0.2.1:80", "10.0.2.2:80"}
    group.servers[0].draining = False
    group.servers[1].draining = True
    group.servers[0].breaker.record_failure()  # still eligible: affinity resumes
    assert set(picks(group)) == {"10.0.1.1:80", "10.0.2.1:80", "10.0.2.2:80"}


def test_zone_affinity_needs_an_instance_zone_and_the_option():
    without_zone = runtime({"servers": ZONED, "zone_affinity": {}}).groups["u"]
    assert len(picks(without_zone)) == 4
    without_option = runtime({"servers": ZONED}, zone="a").groups["u"]
    assert len(picks(without_option)) == 4


def test_zone_from_the_environment(monkeypatch):
    monkeypatch.setenv("SG_TEST_ZONE", "b")
    group = runtime(
        {"servers": ZONED, "zone_affinity": {"min_healthy_percent": 50}}, zone="${SG_TEST_ZONE}"
    ).groups["u"]
    assert set(picks(group)) == {"10.0.2.1:80", "10.0.2.2:80"}


def test_zone_affinity_falls_back_when_the_zone_is_tried_out():
    group = runtime({"servers": ZONED, "zone_affinity": {}}, zone="a").groups["u"]
    local = set(group.servers[:2])
    assert group.select(None, local).zone == "b"  # retries leave the zone when they must


# -- entries that DNS changes ---------------------------------------------------------------------


def test_resolved_entry_servers_join_ramping_and_leave_retired():
    rt = runtime(
        {
            "servers": [
                {"url": "http://10.9.9.9:80"},
                {"url": "http://api.test:8080", "resolve": 5},
            ],
            "slow_start": "10s",
            "sticky": {},
        }
    )
    group = rt.groups["u"]
    assert [s.label for s in group.servers] == ["10.9.9.9:80"]  # no lookup yet
    entry = rt.discovery.entries[0]
    rt._addresses_found(entry, [("10.0.0.9", 8080), ("10.0.0.10", 8080)], False)
    labels = [s.label for s in group.servers]
    assert labels == ["10.9.9.9:80", "10.0.0.9:8080", "10.0.0.10:8080"]
    resolved = group.servers[1]
    assert resolved.url == "http://api.test:8080" and resolved.ramp_ends == 0.0  # first: full
    assert resolved.pool.host == "10.0.0.9" and resolved.pool.tls_name == "api.test"
    status = resolved.status()
    assert (status["url"], status["address"]) == ("http://api.test:8080", "10.0.0.9:8080")
    value = group.sticky.set_cookie(resolved, None).split(b"=", 1)[1].split(b";", 1)[0]

    rt._addresses_found(entry, [("10.0.0.10", 8080), ("10.0.0.11", 8080)], True)
    assert [s.label for s in group.servers] == ["10.9.9.9:80", "10.0.0.10:8080", "10.0.0.11:8080"]
    assert group.servers[1] is rt.servers[("u", "http://api.test:8080", "10.0.0.10:8080")]
    assert group.servers[2].ramp_ends > 0.0  # joined later: ramps
    assert resolved.draining and resolved.pool.closed  # left: drains, pool closed
    assert group.sticky.server_for(value) is None  # its cookie names nobody now


def test_reload_carries_resolved_servers_and_ramps_added_ones():
    upstream = {"servers": [{"url": "http://api.test:8080", "resolve": 5}], "slow_start": "10s"}
    first = runtime(upstream)
    entry = first.discovery.entries[0]
    first._addresses_found(entry, [("10.0.0.9", 8080)], False)
    kept = first.groups["u"].servers[0]
    upstream = {**upstream, "servers": [*upstream["servers"], {"url": "http://10.1.1.1:80"}]}
    config = parse_config(
        {
            "listen": [{"address": "127.0.0.1:18080"}],
            "admin": {"address": "127.0.0.1:18081"},
            "upstreams": {"u": upstream},
            "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "u"}],
        },
        "test.yaml",
    )
    second = Runtime(config, previous=first, limiter=None, access_log=None)
    servers = second.groups["u"].servers
    assert servers[0] is kept and kept.ramp_ends == 0.0  # carried, live state and all
    assert servers[1].ramp_ends > 0.0  # added by the reload: ramps
    assert first.retired_servers(second) == []


# -- what counts as joining -----------------------------------------------------------------------


def test_health_up_and_breaker_closed_start_a_ramp_at_daemon_start_nothing_does():
    upstream = {
        "servers": [{"url": "http://10.0.0.1:80"}],
        "slow_start": "10s",
        "health_check": {"healthy_threshold": 1, "unhealthy_threshold": 1},
        "circuit_breaker": {"failure_threshold": 1, "open_duration": "5s"},
    }
    rt = runtime(upstream)
    assert rt.groups["u"].servers[0].ramp_ends == 0.0  # present at start: full weight
    clock = FakeClock()
    cfg = rt.config.upstreams["u"]
    server = Server(
        "u",
        cfg.servers[0],
        cfg,
        metrics=metrics.ServerMetrics("u", "10.0.0.1:80"),
        on_breaker_transition=_breaker_transition,
        slow_start=SlowStart(10.0, clock=clock),
        clock=clock,
    )
    for ok in (True, False):  # unknown -> up is no join; up -> down neither
        server.health.observe(ok)
        _health_result(server, ok, "test")
    assert server.ramp_ends == 0.0
    server.health.observe(True)
    _health_result(server, True, "test")  # down -> up: joins
    assert server.ramp_ends == clock.now + 10.0
    assert server.effective_weight(clock.now) == 0.1

    clock.advance(20.0)
    assert server.effective_weight(clock.now) == 1
    assert server.breaker.acquire()
    server.breaker.record_failure()  # opens
    clock.advance(5.0)
    assert server.breaker.acquire()  # half-open trial
    assert server.ramp_ends < clock.now
    server.breaker.record_success()  # closes: joins
    assert server.ramp_ends == clock.now + 10.0


def test_undrain_starts_a_ramp_drain_does_not():
    rt = runtime({"servers": THREE, "slow_start": "10s"})
    server = rt.groups["u"].servers[0]
    server.set_draining(True)
    assert server.draining and server.ramp_ends == 0.0
    server.set_draining(False)
    assert not server.draining and server.ramp_ends > 0.0
