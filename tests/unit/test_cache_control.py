"""Cache-Control / CDN-Cache-Control / Pragma parsing and HTTP dates."""

from __future__ import annotations

import calendar

import pytest

from proxy.cache.control import (
    DELTA_SECONDS_CAP,
    CacheControl,
    format_http_date,
    parse_http_date,
    request_control,
    response_control,
)


def cc(*values: str) -> CacheControl:
    return CacheControl.parse([v.encode() for v in values])


def test_directives_with_and_without_values():
    parsed = cc("public, max-age=60, s-maxage=120, no-transform")
    assert "public" in parsed and "no-transform" in parsed
    assert parsed.seconds("max-age") == 60
    assert parsed.seconds("s-maxage") == 120
    assert parsed.seconds("stale-if-error") is None


def test_names_are_case_insensitive_and_whitespace_is_tolerated():
    parsed = cc("  Max-Age = 30 ,NO-STORE")
    assert parsed.seconds("max-age") == 30
    assert "no-store" in parsed


def test_quoted_strings_keep_commas_and_escapes():
    parsed = cc('no-cache="Set-Cookie, X-Foo", private="a\\"b", max-age=5')
    assert parsed.field_names("no-cache") == ("set-cookie", "x-foo")
    assert parsed.directives["private"] == 'a"b'
    assert parsed.seconds("max-age") == 5


def test_unqualified_field_names_are_empty_and_absent_is_none():
    parsed = cc("no-cache")
    assert parsed.field_names("no-cache") == ()
    assert parsed.field_names("private") is None


def test_several_field_lines_combine():
    parsed = cc("max-age=10", "must-revalidate")
    assert parsed.seconds("max-age") == 10 and "must-revalidate" in parsed


def test_a_directive_twice_with_different_values_is_stale():
    assert cc("max-age=10, max-age=20").seconds("max-age") == 0
    assert cc("max-age=10", "max-age=10").seconds("max-age") == 10  # same value: no conflict


@pytest.mark.parametrize("value", ["max-age=-1", "max-age=abc", "max-age=", "max-age=1.5"])
def test_invalid_delta_seconds_are_none(value):
    assert cc(value).seconds("max-age") is None


def test_quoted_delta_seconds_are_accepted():
    assert cc('max-age="30"').seconds("max-age") == 30


def test_huge_delta_seconds_are_capped():
    assert cc("max-age=99999999999999").seconds("max-age") == DELTA_SECONDS_CAP


def test_garbage_does_not_poison_later_directives():
    parsed = cc('=oops, "x", max-age=7')
    assert parsed.seconds("max-age") == 7


def test_cdn_cache_control_replaces_cache_control():
    headers = [(b"Cache-Control", b"no-store"), (b"CDN-Cache-Control", b"max-age=60")]
    parsed = response_control(headers)
    assert "no-store" not in parsed and parsed.seconds("max-age") == 60
    assert "no-store" in response_control([(b"cache-control", b"no-store")])


def test_pragma_no_cache_only_without_cache_control():
    assert "no-cache" in request_control([(b"Pragma", b"no-cache")])
    both = request_control([(b"Pragma", b"no-cache"), (b"Cache-Control", b"max-age=5")])
    assert "no-cache" not in both and both.seconds("max-age") == 5


EPOCH_1994 = calendar.timegm((1994, 11, 6, 8, 49, 37))


@pytest.mark.parametrize(
    "text",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "sun, 06 nov 1994 08:49:37 gmt",
    ],
)
def test_the_three_http_date_formats(text):
    assert parse_http_date(text) == EPOCH_1994


@pytest.mark.parametrize(
    "text",
    ["0", "-1", "", "tomorrow", "Sun, 06 Nov 1994 08:49:37 PST", "Sun, 06 Foo 1994 08:49:37 GMT"],
)
def test_invalid_dates_are_none(text):
    assert parse_http_date(text) is None


def test_date_round_trip():
    assert parse_http_date(format_http_date(EPOCH_1994)) == EPOCH_1994


@pytest.mark.parametrize(
    "value",
    ["max-age=10000, &&&&&", 'max-age="10000"', "max-age=1.5", "Max-Age=5", "max-age"],
)
def test_an_invalid_cdn_cache_control_is_ignored_as_a_whole(value):
    headers = [(b"CDN-Cache-Control", value.encode()), (b"Cache-Control", b"no-store")]
    assert "no-store" in response_control(headers)


@pytest.mark.parametrize(
    "value", ["max-age=60", "max-age=60, no-store", 'max-age=60, x="a,b"', "private;a=1, max-age=9"]
)
def test_valid_cdn_cache_control_structured_fields(value):
    headers = [(b"CDN-Cache-Control", value.encode()), (b"Cache-Control", b"max-age=1")]
    assert response_control(headers).directives != {"max-age": "1"}
