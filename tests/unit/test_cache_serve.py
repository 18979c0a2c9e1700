"""The cache filter's pure parts: the client's conditionals, and the store kept on reload."""

from __future__ import annotations

import pytest

from proxy.cache.memory import MemoryStore
from proxy.cache.policy import Freshness
from proxy.cache.serve import SharedCache, _not_modified
from proxy.cache.store import StoredResponse
from proxy.config import CacheConfig

FRESH = Freshness(60.0, 0.0, 0.0, False, False, 0.0, 0.0)


def entry(*headers: tuple[bytes, bytes], status: int = 200) -> StoredResponse:
    return StoredResponse("k", "k", (), status, b"OK", list(headers), b"body", FRESH)


@pytest.mark.parametrize(
    ("if_none_match", "expected"),
    [
        (b'"a"', True),
        (b'W/"a"', True),  # weak comparison
        (b'"b", "a"', True),
        (b"*", True),
        (b'"b"', False),
    ],
)
def test_if_none_match(if_none_match, expected):
    assert _not_modified(if_none_match, None, entry((b"ETag", b'W/"a"'))) is expected


def test_if_none_match_needs_an_etag_and_a_200():
    assert not _not_modified(b'"a"', None, entry())
    assert not _not_modified(b'"a"', None, entry((b"ETag", b'"a"'), status=404))


def test_if_modified_since_against_last_modified_or_date():
    last_modified = (b"Last-Modified", b"Sun, 06 Nov 1994 08:49:37 GMT")
    assert _not_modified(None, b"Sun, 06 Nov 1994 08:49:37 GMT", entry(last_modified))
    assert not _not_modified(None, b"Sat, 05 Nov 1994 08:49:37 GMT", entry(last_modified))
    date = (b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT")
    assert _not_modified(None, b"Mon, 07 Nov 1994 00:00:00 GMT", entry(date))
    assert not _not_modified(None, b"garbage", entry(last_modified))


def test_if_none_match_wins_over_if_modified_since():
    stored = entry((b"ETag", b'"a"'), (b"Last-Modified", b"Sun, 06 Nov 1994 08:49:37 GMT"))
    assert not _not_modified(b'"b"', b"Mon, 07 Nov 1994 00:00:00 GMT", stored)


def test_a_reload_with_the_same_cache_section_keeps_the_store():
    first = SharedCache(CacheConfig())
    assert isinstance(first.store, MemoryStore)
    assert SharedCache(CacheConfig(), first).store is first.store
    assert SharedCache(CacheConfig(max_size=1024), first).store is not first.store
