"""RFC 9111 storage and freshness decisions: pure functions, times passed in."""

from __future__ import annotations

import pytest

from proxy.cache.control import CacheControl, format_http_date, request_control
from proxy.cache.policy import (
    Freshness,
    Use,
    compute_freshness,
    decide_storage,
    judge,
    may_serve_on_error,
    stored_headers,
    updated_headers,
    vary_names,
)

NOW = 1_700_000_000.0


def hdrs(**fields: str) -> list[tuple[bytes, bytes]]:
    return [(name.replace("_", "-").encode(), value.encode()) for name, value in fields.items()]


def decide(headers, *, status=200, method=b"GET", request=(), auth=False, heuristic=False):
    return decide_storage(
        method=method,
        status=status,
        headers=headers,
        request_control=request_control(list(request)),
        has_authorization=auth,
        heuristic=heuristic,
        request_time=NOW,
        response_time=NOW,
    )


def rc(value: str) -> CacheControl:
    return CacheControl.parse([value.encode()])


# -- storable? --------------------------------------------------------------------------


def test_max_age_is_stored_with_its_lifetime():
    decision = decide(hdrs(Cache_Control="max-age=60"))
    assert decision.storable and decision.freshness.lifetime == 60


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (hdrs(Cache_Control="max-age=60, no-store"), "no-store"),
        (hdrs(Cache_Control="max-age=60, private"), "private"),
        (hdrs(Cache_Control="max-age=60", Set_Cookie="a=b"), "set-cookie"),
        (hdrs(Cache_Control="max-age=60", Vary="Accept, *"), "vary *"),
        (hdrs(X_Nothing="1"), "stale on arrival"),
        (hdrs(Cache_Control="max-age=0"), "stale on arrival"),
    ],
)
def test_never_stored(headers, reason):
    decision = decide(headers)
    assert not decision.storable and decision.reason == reason


def test_only_get_is_stored():
    assert decide(hdrs(Cache_Control="max-age=60"), method=b"POST").reason == "method"
    assert decide(hdrs(Cache_Control="max-age=60"), method=b"HEAD").reason == "method"


@pytest.mark.parametrize("status", [101, 206, 304])
def test_partial_and_not_modified_are_not_stored(status):
    assert decide(hdrs(Cache_Control="max-age=60"), status=status).reason == "status"


def test_status_without_explicit_freshness_needs_a_heuristic_status():
    assert decide(hdrs(ETag='"x"'), status=302).reason == "status"
    assert decide(hdrs(ETag='"x"'), status=200).storable  # validated: stored to revalidate
    assert decide(hdrs(Cache_Control="max-age=9"), status=302).storable


def test_request_no_store_prevents_storing():
    request = [(b"Cache-Control", b"no-store")]
    assert decide(hdrs(Cache_Control="max-age=60"), request=request).reason == "request no-store"


@pytest.mark.parametrize(
    "allowing", ["public, max-age=60", "s-maxage=60", "must-revalidate, max-age=60"]
)
def test_authorization_needs_a_directive_that_allows_sharing(allowing):
    assert decide(hdrs(Cache_Control="max-age=60"), auth=True).reason == "authorization"
    assert decide(hdrs(Cache_Control=allowing), auth=True).storable


def test_qualified_private_strips_the_named_fields():
    decision = decide(hdrs(Cache_Control='max-age=60, private="X-User"', X_User="alice"))
    assert decision.storable and decision.strip == ("x-user",)
    kept = stored_headers(hdrs(X_User="alice", Content_Type="text/plain"), decision.strip)
    assert kept == [(b"Content-Type", b"text/plain")]


def test_must_understand_overrides_no_store_for_understood_statuses():
    assert decide(hdrs(Cache_Control="max-age=60, no-store, must-understand")).storable
    result = decide(hdrs(Cache_Control="max-age=60, no-store, must-understand"), status=299)
    assert result.reason == "must-understand"


def test_cdn_cache_control_wins_over_cache_control():
    decision = decide([(b"Cache-Control", b"no-store"), (b"CDN-Cache-Control", b"max-age=30")])
    assert decision.storable and decision.freshness.lifetime == 30


# -- freshness lifetime -----------------------------------------------------------------


def lifetime(headers, heuristic=False, status=200) -> float:
    return compute_freshness(status, headers, heuristic, NOW, NOW).lifetime


def test_s_maxage_beats_max_age_beats_expires():
    expires = format_http_date(NOW + 500).decode()
    assert lifetime(hdrs(Cache_Control="max-age=10, s-maxage=20", Expires=expires)) == 20
    assert lifetime(hdrs(Cache_Control="max-age=10", Expires=expires)) == 10
    assert lifetime(hdrs(Expires=expires, Date=format_http_date(NOW).decode())) == 500


def test_expires_counts_from_the_date_header():
    headers = hdrs(
        Expires=format_http_date(NOW + 100).decode(), Date=format_http_date(NOW - 50).decode()
    )
    assert lifetime(headers) == 150


def test_invalid_or_repeated_expires_is_already_expired():
    assert lifetime(hdrs(Expires="0")) == 0
    later = format_http_date(NOW + 100)
    assert lifetime([(b"Expires", later), (b"Expires", later)]) == 0


def test_invalid_max_age_is_stale_not_ignored():
    assert (
        lifetime(hdrs(Cache_Control="max-age=abc", Expires=format_http_date(NOW + 9).decode())) == 0
    )


def test_heuristic_is_a_tenth_of_the_age_since_last_modified_when_enabled():
    headers = hdrs(Last_Modified=format_http_date(NOW - 1000).decode())
    assert lifetime(headers, heuristic=True) == 100
    assert lifetime(headers, heuristic=False) == 0
    assert lifetime(headers, heuristic=True, status=302) == 0  # not heuristically cacheable


# -- age ------------------------------------------------------------------------------


def test_current_age_takes_age_header_and_delays():
    headers = hdrs(Age="30", Date=format_http_date(NOW - 10).decode())
    freshness = compute_freshness(200, headers, False, NOW - 2, NOW)
    assert freshness.initial_age == 32  # Age + response delay beats apparent age (10)
    assert freshness.age(NOW + 5) == 37


def test_apparent_age_from_an_old_date():
    freshness = compute_freshness(
        200, hdrs(Date=format_http_date(NOW - 100).decode()), False, NOW, NOW
    )
    assert freshness.age(NOW) == 100


# -- using a stored response ----------------------------------------------------------


def stored(cc_value: str, *, age_at=NOW) -> Freshness:
    return compute_freshness(200, hdrs(Cache_Control=cc_value), False, age_at, age_at)


NONE = CacheControl({}, frozenset())


def test_fresh_then_stale():
    freshness = stored("max-age=60")
    assert judge(freshness, NONE, NOW + 59) is Use.FRESH
    assert judge(freshness, NONE, NOW + 60) is Use.REVALIDATE


def test_no_cache_always_revalidates():
    assert judge(stored("max-age=60, no-cache"), NONE, NOW) is Use.REVALIDATE
    assert judge(stored('max-age=60, no-cache="X-A"'), NONE, NOW) is Use.REVALIDATE
    assert judge(stored("max-age=60"), rc("no-cache"), NOW) is Use.REVALIDATE


def test_request_max_age_and_min_fresh():
    freshness = stored("max-age=60")
    assert judge(freshness, rc("max-age=10"), NOW + 11) is Use.REVALIDATE
    assert judge(freshness, rc("max-age=10"), NOW + 9) is Use.FRESH
    assert judge(freshness, rc("min-fresh=30"), NOW + 31) is Use.REVALIDATE
    assert judge(freshness, rc("min-fresh=30"), NOW + 29) is Use.FRESH


def test_max_stale_allows_stale_unless_must_revalidate():
    assert judge(stored("max-age=10"), rc("max-stale=5"), NOW + 14) is Use.STALE
    assert judge(stored("max-age=10"), rc("max-stale=5"), NOW + 16) is Use.REVALIDATE
    assert judge(stored("max-age=10"), rc("max-stale"), NOW + 1e6) is Use.STALE
    assert judge(stored("max-age=10, must-revalidate"), rc("max-stale"), NOW + 11) is Use.REVALIDATE
    assert judge(stored("s-maxage=10"), rc("max-stale"), NOW + 11) is Use.REVALIDATE
    assert (
        judge(stored("max-age=10, proxy-revalidate"), rc("max-stale"), NOW + 11) is Use.REVALIDATE
    )


def test_stale_while_revalidate_window():
    freshness = stored("max-age=10, stale-while-revalidate=30")
    assert judge(freshness, NONE, NOW + 20) is Use.STALE_WHILE_REVALIDATE
    assert judge(freshness, NONE, NOW + 41) is Use.REVALIDATE


def test_stale_if_error_window():
    freshness = stored("max-age=10, stale-if-error=30")
    assert may_serve_on_error(freshness, NONE, NOW + 39)
    assert not may_serve_on_error(freshness, NONE, NOW + 41)
    assert may_serve_on_error(stored("max-age=10"), rc("stale-if-error=100"), NOW + 50)
    assert not may_serve_on_error(
        stored("max-age=10, must-revalidate, stale-if-error=99"), NONE, NOW + 11
    )


# -- fields ---------------------------------------------------------------------------


def test_vary_names_from_every_line():
    headers = [(b"Vary", b"Accept-Encoding, Accept"), (b"vary", b"X-A,accept")]
    assert vary_names(headers) == ["accept-encoding", "accept", "x-a"]


def test_a_304_replaces_fields_but_not_the_length():
    old = hdrs(Content_Length="5", ETag='"a"', Cache_Control="max-age=1", X_Old="1")
    new = hdrs(Content_Length="0", ETag='"a"', Cache_Control="max-age=99", Connection="close")
    merged = dict(updated_headers(old, new))
    assert merged[b"Content-Length"] == b"5"
    assert merged[b"Cache-Control"] == b"max-age=99"
    assert merged[b"X-Old"] == b"1"
    assert b"Connection" not in merged


def test_hop_by_hop_and_connection_listed_fields_are_not_stored():
    headers = hdrs(Connection="X-Hop", X_Hop="1", Keep_Alive="5", Age="3", Content_Type="a/b")
    assert stored_headers(headers) == [(b"Content-Type", b"a/b")]


def test_an_age_list_counts_its_first_member():
    freshness = compute_freshness(200, hdrs(Age="7200, 0"), False, NOW, NOW)
    assert freshness.initial_age == 7200
    assert compute_freshness(200, hdrs(Age="0, 7200"), False, NOW, NOW).initial_age == 0
