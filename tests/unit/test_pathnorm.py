"""normalize_target: a table of spellings and their normal form, refusals, and properties."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.http.pathnorm import InvalidTarget, normalize_target

NORMALISED = [
    # (raw target, normal path, query)
    (b"/", b"/", None),
    (b"/limited/x", b"/limited/x", None),
    (b"/limited/x?a=1&b=%2F", b"/limited/x", b"a=1&b=%2F"),
    (b"/x?", b"/x", b""),
    # percent-encoded unreserved characters are decoded, hex case-insensitive
    (b"/%6Cimited/x", b"/limited/x", None),
    (b"/%6cimited/x", b"/limited/x", None),
    (b"/%41%5a%61%7A%30%39%2D%2E%5F%7E", b"/AZaz09-._~", None),
    # every other escape stays encoded, its hex upper-cased
    (b"/%2flimited", b"/%2Flimited", None),
    (b"/%2Flimited", b"/%2Flimited", None),
    (b"/a%5cb", b"/a%5Cb", None),
    (b"/a%20b%3f%23%25", b"/a%20b%3F%23%25", None),
    (b"/caf%c3%a9", b"/caf%C3%A9", None),
    (b"/%252e%252e/x", b"/%252e%252e/x", None),  # %25 stays encoded: no double decoding
    # repeated slashes merge
    (b"//limited/x", b"/limited/x", None),
    (b"/limited///x//", b"/limited/x/", None),
    (b"/a/%2F/b", b"/a/%2F/b", None),
    # dot segments (RFC 3986 5.2.4), encoded dots too
    (b"/./limited/x", b"/limited/x", None),
    (b"/limited/./x", b"/limited/x", None),
    (b"/a/../limited/x", b"/limited/x", None),
    (b"/a/b/../../limited/x", b"/limited/x", None),
    (b"/%2e/limited/x", b"/limited/x", None),
    (b"/a/%2e%2e/limited/x", b"/limited/x", None),
    (b"/a/%2E%2E/limited/x", b"/limited/x", None),
    (b"/a/.%2e/limited/x", b"/limited/x", None),
    (b"/a/.", b"/a/", None),
    (b"/a/..", b"/", None),
    (b"/a/b/..", b"/a/", None),
    (b"/.", b"/", None),
    (b"/a//../b", b"/b", None),  # slashes merge first, as nginx does
    (b"/a/./../b?x=/../y", b"/b", b"x=/../y"),  # the query is never touched
    # names that merely start with a dot are names
    (b"/.well-known/x", b"/.well-known/x", None),
    (b"/a/...", b"/a/...", None),
    (b"/a/..b/.c", b"/a/..b/.c", None),
    # case is kept: paths are case-sensitive
    (b"/LIMITED/x", b"/LIMITED/x", None),
    (b"/a\\..\\b", b"/a\\..\\b", None),  # a backslash is no separator on the path
]

REFUSED = [
    (b"/echo#frag", "fragment in request target"),
    (b"/echo?a=1#frag", "fragment in request target"),
    (b"/#", "fragment in request target"),
    (b"/a\x00b", "NUL in request target"),
    (b"/a%00b", "NUL in request target"),
    (b"/a?x=%00", "NUL in request target"),
    (b"/..", "request target climbs above the root"),
    (b"/../x", "request target climbs above the root"),
    (b"/a/../../x", "request target climbs above the root"),
    (b"/%2e%2e/x", "request target climbs above the root"),
    (b"//..//x", "request target climbs above the root"),
    (b"/a/../..", "request target climbs above the root"),
    (b"/%zz", "invalid percent-encoding in request target"),
    (b"/a%", "invalid percent-encoding in request target"),
    (b"/a%4", "invalid percent-encoding in request target"),
    (b"/a%4g/x", "invalid percent-encoding in request target"),
    (b"/a%%41", "invalid percent-encoding in request target"),
]


@pytest.mark.parametrize(("raw", "path", "query"), NORMALISED)
def test_normal_form(raw: bytes, path: bytes, query: bytes | None) -> None:
    assert normalize_target(raw) == (path, query)


@pytest.mark.parametrize(("raw", "reason"), REFUSED)
def test_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidTarget) as caught:
        normalize_target(raw)
    assert caught.value.reason == reason
    assert caught.value.status == 400


def test_plain_path_is_returned_as_is() -> None:
    raw = b"/api/v1/users/42"
    path, query = normalize_target(raw)
    assert path is raw and query is None


# -- properties ---------------------------------------------------------------------------------

_SEGMENT_PIECES = st.sampled_from(
    [
        *(b"a", b"B", b"z9", b".", b"..", b"%2e", b"%2E", b"%2f", b"%2F", b"%5c", b"%41"),
        *(b"%7e", b"%3f", b"%c3%a9", b"~", b"-", b"_", b"", b"...", b"%25", b"%2e%2e", b".%2e"),
    ]
)
_PATHS = st.lists(st.lists(_SEGMENT_PIECES, max_size=3).map(b"".join), max_size=8).map(
    lambda segments: b"/" + b"/".join(segments)
)


def _normal_or_none(raw: bytes) -> bytes | None:
    try:
        return normalize_target(raw)[0]
    except InvalidTarget:
        return None


@settings(max_examples=400, deadline=None)
@given(_PATHS)
@example(b"/a/.%2e//%2e./x")
def test_normal_form_is_a_fixed_point_without_dot_or_empty_segments(raw: bytes) -> None:
    path = _normal_or_none(raw)
    if path is None:
        return
    assert path.startswith(b"/")
    assert normalize_target(path) == (path, None)
    assert b"//" not in path
    assert b"/./" not in path and b"/../" not in path
    assert not path.endswith((b"/.", b"/.."))
    # An encoded slash or backslash is never decoded into a separator: only a dot segment
    # removing the segment that holds it can make one disappear.
    for escape in (b"%2F", b"%5C"):
        kept, given_ = path.upper().count(escape), raw.upper().count(escape)
        assert kept <= given_
        if b"." not in raw and b"%2E" not in raw.upper():
            assert kept == given_


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_any_bytes_give_a_normal_form_or_invalid_target(tail: bytes) -> None:
    raw = b"/" + tail
    try:
        path, _ = normalize_target(raw)
    except InvalidTarget:
        return
    assert normalize_target(path)[0] == path
