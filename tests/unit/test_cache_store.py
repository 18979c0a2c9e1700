"""Keys, variance, and the bounded memory store with S3-FIFO eviction."""

from __future__ import annotations

import random

from proxy.cache.key import KeyMaker, cache_url, url_from_purge, url_of
from proxy.cache.memory import MemoryStore
from proxy.cache.policy import Freshness
from proxy.cache.store import ENTRY_OVERHEAD, BodyWriter, StoredResponse, tags_of
from proxy.cache.variance import matches, normalise, secondary_key, variance

FRESH = Freshness(60.0, 0.0, 0.0, False, False, 0.0, 0.0)


def response(primary: str, body: bytes = b"x", *, url=None, tags=(), vary=()) -> StoredResponse:
    return StoredResponse(
        primary=primary,
        url=url or primary,
        variance=vary,
        status=200,
        reason=b"OK",
        headers=[],
        body=body,
        freshness=FRESH,
        tags=tags,
    )


def size_of(body_len: int, primary: str) -> int:
    return body_len + len(primary) + ENTRY_OVERHEAD


# -- keys -----------------------------------------------------------------------------


def test_url_is_host_path_and_query():
    assert cache_url(b"Example.COM", b"/a/b", b"/a/b?x=1") == "example.com/a/b?x=1"
    assert cache_url(b"h", b"/a", b"/a") == "h/a"
    assert url_from_purge("http://Example.com/a/b?x=1") == "example.com/a/b?x=1"
    assert url_from_purge("https://h") == "h"


def test_key_parts_from_headers_and_cookies():
    maker = KeyMaker.from_config(("header:accept-language", "cookie:tier"))
    headers = {b"accept-language": b"fr", b"cookie": b"a=1; tier=gold"}
    key = maker.primary("h/p", headers.get)
    assert url_of(key) == "h/p"
    assert key != maker.primary("h/p", {b"accept-language": b"de", b"cookie": b"tier=gold"}.get)
    assert key != maker.primary("h/p", {b"accept-language": b"fr"}.get)
    assert KeyMaker.from_config(()).primary("h/p", headers.get) == "h/p"


# -- variance -------------------------------------------------------------------------


def values(fields: dict[bytes, list[bytes]]):
    return lambda name: fields.get(name, [])


def test_variance_normalises_whitespace_and_combines_lines():
    assert normalise([b"gzip,  br"]) == normalise([b"gzip", b"br"]) == "gzip, br"
    assert normalise([]) is None
    stored = variance(["accept-encoding"], values({b"accept-encoding": [b"gzip,br"]}))
    assert matches(stored, values({b"accept-encoding": [b"gzip , br"]}))
    assert not matches(stored, values({b"accept-encoding": [b"br"]}))
    assert not matches(stored, values({}))


def test_absent_and_empty_are_different_variants():
    absent = variance(["x-a"], values({}))
    empty = variance(["x-a"], values({b"x-a": [b""]}))
    assert secondary_key(absent) != secondary_key(empty)
    assert secondary_key(()) == ""


def test_tags_space_or_comma_separated():
    headers = [(b"Cache-Tag", b"a, b c"), (b"Surrogate-Key", b"c d")]
    assert tags_of(headers) == ("a", "b", "c", "d")


# -- body writer ----------------------------------------------------------------------


def test_body_writer_gives_up_over_the_limit():
    writer = BodyWriter(limit=10)
    assert writer.write(b"12345") and writer.write(b"67890")
    assert writer.body() == b"1234567890"
    assert not writer.write(b"x")
    assert writer.body() is None and not writer.write(b"")


# -- memory store ---------------------------------------------------------------------


async def test_put_get_replace_delete():
    store = MemoryStore(max_size=10_000, max_object_size=1000)
    assert await store.put(response("k", b"one"))
    assert await store.put(response("k", b"two"))  # same variant: replaced
    [got] = await store.variants("k")
    assert got.body == b"two"
    assert store.objects == 1 and store.bytes == size_of(3, "k")
    assert await store.delete("k") == 1
    assert await store.variants("k") == [] and store.bytes == 0 and store.objects == 0


async def test_variants_are_kept_apart_and_deleted_together():
    store = MemoryStore(10_000, 1000)
    await store.put(response("k", b"fr", vary=(("accept-language", "fr"),)))
    await store.put(response("k", b"de", vary=(("accept-language", "de"),)))
    assert sorted(r.body for r in await store.variants("k")) == [b"de", b"fr"]
    assert await store.delete("k") == 2


async def test_objects_over_max_object_size_or_store_are_refused():
    store = MemoryStore(max_size=2000, max_object_size=100)
    assert not await store.put(response("big", b"x" * 101))
    assert await store.put(response("ok", b"x" * 100))
    assert store.objects == 1


async def test_purge_by_url_prefix_and_tag():
    store = MemoryStore(100_000, 1000)
    await store.put(response("h/a?1", url="h/a?1", tags=("t1",)))
    await store.put(response("h/a?1\x1ffr", url="h/a?1", tags=("t2",)))  # same URL, key part
    await store.put(response("h/b/c", url="h/b/c", tags=("t1", "t2")))
    await store.put(response("h/b/d", url="h/b/d"))
    await store.put(response("g/b/e", url="g/b/e", tags=("t3",)))
    assert await store.purge_url("h/a?1") == 2
    assert await store.purge_tag("t2") == 1
    assert await store.purge_prefix("h/b/") == 1
    assert await store.purge_tag("t3") == 1
    assert store.objects == 0 and store.bytes == 0
    assert await store.purge_url("nothing") == 0 and await store.purge_tag("none") == 0


async def test_freshen_replaces_head_and_keeps_the_accounts_right():
    store = MemoryStore(10_000, 1000)
    stored = response("k", b"body")
    await store.put(stored)
    later = Freshness(99.0, 0.0, 5.0, False, False, 0.0, 0.0)
    await store.freshen(stored, [(b"ETag", b'"v2"')], later)
    [got] = await store.variants("k")
    assert got.freshness is later and got.headers == [(b"ETag", b'"v2"')]
    assert store.bytes == size_of(4, "k") + len(b"ETag") + len(b'"v2"') + 4


def test_bytes_never_exceed_max_size_under_churn():
    rng = random.Random(7)
    store = MemoryStore(max_size=50_000, max_object_size=5_000)
    for i in range(5_000):
        key = f"k{rng.randrange(400)}"
        if rng.random() < 0.5:
            store.variants_now(key)
        else:
            store.put_now(response(key, b"x" * rng.randrange(5_000), tags=(f"t{i % 7}",)))
        assert store.bytes <= store.max_size
    recount = sum(r.size for v in store._variants.values() for r in v.values())
    assert recount == store.bytes and store.objects == sum(map(len, store._variants.values()))
    assert store.evictions > 0


def test_s3_fifo_keeps_popular_objects_through_a_scan():
    """A scan of one-hit objects passes through the small queue: the hot set survives,
    where plain LRU would lose all of it."""
    store = MemoryStore(max_size=100 * size_of(100, "hot00"), max_object_size=1000)
    hot = [f"hot{i:02d}" for i in range(50)]
    for key in hot:
        store.put_now(response(key, b"x" * 100))
    for _ in range(2):
        for key in hot:
            assert store.variants_now(key)
    for i in range(1000):
        store.put_now(response(f"s{i:04d}", b"x" * 100))
    surviving = sum(1 for key in hot if store.variants_now(key))
    assert surviving == len(hot)
    assert store.evictions >= 950


def test_an_evicted_object_that_returns_soon_goes_to_main():
    store = MemoryStore(max_size=10 * size_of(10, "k00"), max_object_size=1000)
    for i in range(11):
        store.put_now(response(f"k{i:02d}", b"x" * 10))
    assert not store.variants_now("k00")  # evicted from the small queue: a ghost now
    store.put_now(response("k00", b"x" * 10))
    assert ("k00", "") in store._main
