"""A fresh hit from a store that answers at once (memory), answered in compiled code.

Most answers on a cached route are the same case: a plain GET (no directives, no
conditionals of its own) for a key with one stored variant, fresh, without Vary or
``no-cache``. ``FreshHits`` answers exactly that case and nothing else; whatever it does not
answer, the general path (``serve._CachedRequest``) does, with the entry it found.

Each entry's answer is prepared once (``PreparedHead``): the status line and the stored
fields as they leave, the freshness figures the hit checks, and the ``Age`` line, built
again only when the age in whole seconds changes. A revalidation replaces the entry's
fields and freshness, and the next hit sees it and prepares again.

Compiled (proxy/compiled.py): the exchange's fields are cimported (state.pxd), so they are
C fields here; the prepared head is an extension type of this module. What stays Python
(the request, the stored entry) is read a few times a hit.
"""

from __future__ import annotations

import math
from typing import Any

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

from proxy.cache.key import cache_url
from proxy.cache.memory import MAX_FREQUENCY
from proxy.dataplane.client import REASONS
from proxy.pipeline.framing import RESPONSE_REWRITTEN

if cython.compiled:
    from cython.cimports.proxy.pipeline.state import ExchangeState
else:
    from proxy.pipeline.state import ExchangeState

HIT_STATUS = b"Cache-Status: sluicegate; hit\r\n"
# Request fields that may change how a stored response answers: without any of them, a
# GET for a fresh entry is answered as it is stored.
ANSWER_CHANGING_FIELDS = frozenset(
    {b"cache-control", b"pragma", b"if-none-match", b"if-modified-since"}
)
_KEEP_ALIVE_END = b"Connection: keep-alive\r\n\r\n"
_CLOSE_END = b"Connection: close\r\n\r\n"


@cython.cclass
class PreparedHead:
    """A stored response's head as every plain GET hit sends it, up to ``Age``: the status
    line and the stored fields (those the proxy rewrites left out), built once per entry
    and again when a revalidation replaces its fields; then with ``Age`` and
    ``Content-Length`` (``head_with_age``), built again when the Age in whole seconds
    changes (once a second at most: the hits in between send the same bytes). With it,
    the entry's freshness as the hit checks it."""

    headers = cython.declare(object)  # what it was built from (a 304 replaces the list)
    freshness = cython.declare(object)  # ... and the freshness it was built with
    plain = cython.declare(cython.bint)  # no Vary, no no-cache: a plain GET may have it
    lifetime = cython.declare(cython.double)
    initial_age = cython.declare(cython.double)
    response_time = cython.declare(cython.double)
    status = cython.declare(object)
    body = cython.declare(bytes)
    has_request_id = cython.declare(cython.bint)
    head = cython.declare(bytes)
    length_line = cython.declare(bytes)
    age_from = cython.declare(cython.double)
    age_until = cython.declare(cython.double)
    head_with_age = cython.declare(bytes)

    def __init__(self, entry: Any) -> None:
        self.headers = entry.headers
        freshness = self.freshness = entry.freshness
        self.plain = not entry.variance and not freshness.no_cache
        self.lifetime = freshness.lifetime
        self.initial_age = freshness.initial_age
        self.response_time = freshness.response_time
        self.status = entry.status
        self.body = entry.body
        reason = entry.reason or REASONS.get(entry.status, b"")
        parts = [b"HTTP/1.1 %d %b\r\n" % (entry.status, reason)]
        dropped: set[bytes] = set()
        for name, value in entry.headers:
            if name.lower() == b"connection":
                dropped.update(token.strip().lower() for token in value.split(b","))
        self.has_request_id = False
        for name, value in entry.headers:
            lowered = name.lower()
            if lowered in RESPONSE_REWRITTEN or lowered in dropped:
                continue
            if lowered == b"x-request-id":
                self.has_request_id = True
            parts += (name, b": ", value, b"\r\n")
        self.head = b"".join(parts)
        self.length_line = b"Content-Length: %d\r\n" % len(entry.body)  # the body stays
        self.age_from = self.age_until = 0.0  # no Age yet: the first answer sets it
        self.head_with_age = b""

    @cython.cfunc
    def set_age(self, age: cython.double) -> None:
        """``head_with_age`` for ``age`` seconds, and the ages it stays right for."""
        whole: cython.longlong = int(age)  # as b"%d" % age writes it
        # [whole, whole + 1) truncates to whole; a negative age (never, as computed) is
        # kept for no other.
        self.age_from = float(whole) if age >= 0.0 else math.inf
        self.age_until = whole + 1.0
        self.head_with_age = self.head + b"Age: %d\r\n" % whole + self.length_line


@cython.cfunc
def _prepared(entry: Any) -> PreparedHead:
    """The entry's prepared head: built on its first hit, and again after a revalidation."""
    prepared: PreparedHead = entry.prepared
    if (
        prepared is None
        or prepared.headers is not entry.headers
        or prepared.freshness is not entry.freshness
    ):
        prepared = PreparedHead(entry)
        entry.prepared = prepared
    return prepared


@cython.cfunc
def _send(ex: ExchangeState, prepared: PreparedHead, age: cython.double, extra: bytes) -> None:
    request = ex.request
    conn = ex.conn
    if not prepared.age_from <= age < prepared.age_until:  # Age counts whole seconds
        prepared.set_age(age)
    if not request.keep_alive or conn.listener.shutting_down:
        end = _CLOSE_END
        request.close_after()
    elif request.version == "1.0":
        end = _KEEP_ALIVE_END
    else:
        end = b"\r\n"
    ex.extra_headers = extra
    # One join, not a bytes object per piece added.
    if prepared.has_request_id:
        head = b"".join((prepared.head_with_age, extra, ex.sticky_cookie, end))
    else:
        head = b"".join(
            (
                prepared.head_with_age,
                b"X-Request-ID: ",
                request.request_id,
                b"\r\n",
                extra,
                ex.sticky_cookie,
                end,
            )
        )
    body: bytes = prepared.body
    conn.respond(head, body)
    ex.status = prepared.status
    ex.bytes_out += len(body)


def send_prepared(ex: ExchangeState, entry: Any, age: float, extra: bytes) -> None:
    """A plain GET's answer from ``entry``, ``age`` seconds old: the same bytes the general
    path (``send_stored`` through ``send_buffered``) makes for a 200 with no compression
    and no trace."""
    _send(ex, _prepared(entry), age, extra)


@cython.cclass
class FreshHits:
    """A cached route's fresh hits from a memory store (see the module's docstring)."""

    variants = cython.declare(dict)  # the memory store's: primary key -> its variants
    keys = cython.declare(object)  # the route's KeyMaker, None without key parts
    clock = cython.declare(object)
    counts = cython.declare(dict)  # the route's result counts, for /status
    metrics = cython.declare(object)
    upstream = cython.declare(object)
    hit_counter = cython.declare(object)  # the route's hit series, found on the first hit

    def __init__(
        self, store: Any, keys: Any, clock: Any, counts: dict, metrics: Any, upstream: str
    ) -> None:
        self.variants = store.variants_by_key
        self.keys = keys if keys.parts else None
        self.clock = clock
        self.counts = counts
        self.metrics = metrics
        self.upstream = upstream
        self.hit_counter = None

    @cython.ccall
    def lookup(self, ex: ExchangeState) -> object:
        """The one variant stored for a plain GET's key (a use, for eviction), or None:
        not a plain GET, nothing stored, or several variants (the general path looks)."""
        request = ex.request
        if (
            request.method != b"GET"
            or ex.trace is not None
            or not ANSWER_CHANGING_FIELDS.isdisjoint(request.lowered)
        ):
            return None
        url = cache_url(request.host, request.path, request.target)
        keys = self.keys
        stored = self.variants.get(url if keys is None else keys.primary(url, request.header))
        if stored is None or len(stored) != 1:
            return None
        for entry in stored.values():
            # A use, as the store counts one for eviction (memory.py, S3-FIFO).
            if entry.frequency < MAX_FREQUENCY:
                entry.frequency += 1
            return entry
        return None

    @cython.ccall
    def answer(self, ex: ExchangeState, entry: Any) -> cython.bint:
        """Answer with ``entry`` when it is fresh and plain (True); else leave it to the
        general path (False). The same answer ``judge`` gives a request without directives:
        fresh while the age is under the lifetime, unless ``no-cache``."""
        prepared = _prepared(entry)
        if not prepared.plain:
            return False
        since: cython.double = self.clock() - prepared.response_time
        age: cython.double = prepared.initial_age + since if since > 0.0 else prepared.initial_age
        if age >= prepared.lifetime:
            return False
        self.counts["hit"] += 1
        counter = self.hit_counter
        if counter is None:  # metrics.cache_result("hit"), its series kept for the next hit
            counter = self.hit_counter = self.metrics.cache_counter("hit")
        counter.value += 1  # as per-request series count: the files get it at the flush
        ex.cache_status = "hit"
        ex.upstream = self.upstream
        _send(ex, prepared, age, ex.extra_headers + HIT_STATUS)
        return True
