"""What may be stored (RFC 9111 §3), for how long (§4.2), and what a stored response may
answer (§4, §5.2.1) — pure functions of headers, directives and times.

Times are wall-clock seconds (``Date`` and ``Expires`` are wall-clock facts), passed in by
the caller so tests need no clock at all. The cache is *shared*: ``s-maxage`` and
``proxy-revalidate`` apply, ``private`` responses are not stored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.cache.control import (
    CacheControl,
    field_value,
    field_values,
    parse_http_date,
    response_control,
)
from proxy.dataplane.client import HOP_BY_HOP

# RFC 9110 §15.1: statuses a cache may store with heuristic freshness (and that a response
# with only a validator can be stored for).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Statuses whose semantics this cache knows (`must-understand`, RFC 9111 §5.2.2.3).
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | {302, 303, 307, 400, 403, 451, 500, 502, 503, 504}
HEURISTIC_FRACTION = 0.1

# Never stored with a response (RFC 9111 §3.1: hop-by-hop, and what we recompute).
NOT_STORED_FIELDS = HOP_BY_HOP | {b"age", b"x-request-id"}
# Not replaced by a 304's fields when a stored response is freshened (RFC 9111 §3.2).
NOT_UPDATED_FIELDS = NOT_STORED_FIELDS | {b"content-length", b"content-encoding"}


@dataclass(frozen=True, slots=True)
class Freshness:
    """How a stored response ages: computed when stored, and again when a 304 freshens it."""

    lifetime: float  # freshness lifetime (s)
    initial_age: float  # corrected initial age (s) at response_time
    response_time: float  # when the response arrived (wall clock)
    must_revalidate: bool  # never served stale (must-revalidate, proxy-revalidate, s-maxage)
    no_cache: bool  # every use needs a successful revalidation first
    stale_while_revalidate: float
    stale_if_error: float

    def age(self, now: float) -> float:
        """Current age (RFC 9111 §4.2.3)."""
        return self.initial_age + max(0.0, now - self.response_time)

    def staleness(self, now: float) -> float:
        """How long past its lifetime (negative while fresh)."""
        return self.age(now) - self.lifetime


@dataclass(frozen=True, slots=True)
class StoreDecision:
    storable: bool
    reason: str  # why not, for the trace; "" when storable
    freshness: Freshness | None = None
    strip: tuple[str, ...] = ()  # fields a qualified `private` keeps out of the stored copy


def _refuse(reason: str) -> StoreDecision:
    return StoreDecision(False, reason)


def decide_storage(
    *,
    method: bytes,
    status: int,
    headers: list[tuple[bytes, bytes]],
    request_control: CacheControl,
    has_authorization: bool,
    heuristic: bool,
    request_time: float,
    response_time: float,
) -> StoreDecision:
    """May this response be stored (RFC 9111 §3), and how fresh is it then?"""
    if method != b"GET":
        return _refuse("method")
    cc = response_control(headers)
    understood = status in UNDERSTOOD_STATUSES
    if status < 200 or status in (206, 304):
        return _refuse("status")
    if "must-understand" in cc:
        if not understood:
            return _refuse("must-understand")
    elif "no-store" in cc:
        return _refuse("no-store")
    if "no-store" in request_control:
        return _refuse("request no-store")
    private = cc.field_names("private")
    if private == ():
        return _refuse("private")
    if field_value(headers, b"set-cookie") is not None:
        return _refuse("set-cookie")
    if any(name == "*" for name in vary_names(headers)):
        return _refuse("vary *")
    if has_authorization and not ("public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
        return _refuse("authorization")
    explicit = _explicit_lifetime(cc, headers, response_time)
    if explicit is None and "public" not in cc and status not in HEURISTIC_STATUSES:
        return _refuse("status")
    freshness = compute_freshness(status, headers, heuristic, request_time, response_time)
    has_validator = (
        field_value(headers, b"etag") is not None
        or field_value(headers, b"last-modified") is not None
    )
    if (
        freshness.lifetime <= freshness.initial_age
        and not has_validator
        and not freshness.stale_while_revalidate
        and not freshness.stale_if_error
    ):
        return _refuse("stale on arrival")  # nothing it could ever answer
    return StoreDecision(True, "", freshness, private or ())


def compute_freshness(
    status: int,
    headers: list[tuple[bytes, bytes]],
    heuristic: bool,
    request_time: float,
    response_time: float,
) -> Freshness:
    """How fresh a response is, and how it may be used once stale."""
    cc = response_control(headers)
    explicit = _explicit_lifetime(cc, headers, response_time)
    lifetime = explicit
    if lifetime is None:
        lifetime = _heuristic_lifetime(status, headers, response_time) if heuristic else 0.0
    return Freshness(
        lifetime=float(lifetime),
        initial_age=_initial_age(headers, request_time, response_time),
        response_time=response_time,
        must_revalidate=("must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc),
        # A qualified no-cache may be treated as unqualified (RFC 9111 §5.2.2.4).
        no_cache="no-cache" in cc,
        stale_while_revalidate=float(cc.seconds("stale-while-revalidate") or 0),
        stale_if_error=float(cc.seconds("stale-if-error") or 0),
    )


def _explicit_lifetime(
    cc: CacheControl, headers: list[tuple[bytes, bytes]], response_time: float
) -> float | None:
    """s-maxage, then max-age, then Expires - Date (RFC 9111 §4.2.1); None when none."""
    for name in ("s-maxage", "max-age"):
        if name in cc:
            seconds = cc.seconds(name)
            return 0.0 if seconds is None else float(seconds)  # invalid: stale
    expires_values = field_values(headers, b"expires")
    if not expires_values:
        return None
    if len(expires_values) > 1:
        return 0.0
    expires = parse_http_date(expires_values[0])
    if expires is None:
        return 0.0  # an invalid Expires (e.g. "0") means already expired
    return max(0.0, expires - _date(headers, response_time))


def _heuristic_lifetime(
    status: int, headers: list[tuple[bytes, bytes]], response_time: float
) -> float:
    if status not in HEURISTIC_STATUSES:
        return 0.0
    last_modified = parse_http_date(field_value(headers, b"last-modified"))
    if last_modified is None:
        return 0.0
    return max(0.0, (_date(headers, response_time) - last_modified) * HEURISTIC_FRACTION)


def _date(headers: list[tuple[bytes, bytes]], response_time: float) -> float:
    date = parse_http_date(field_value(headers, b"date"))
    return response_time if date is None else date


def _initial_age(
    headers: list[tuple[bytes, bytes]], request_time: float, response_time: float
) -> float:
    """The corrected initial age (RFC 9111 §4.2.3)."""
    apparent_age = max(0.0, response_time - _date(headers, response_time))
    age_value = field_value(headers, b"age")
    age = 0.0
    if age_value is not None:
        # A list ("7200, 0") is invalid; its first member is what an old cache meant.
        text = age_value.decode("latin-1").split(",")[0].strip()
        if text.isdigit():
            age = float(min(int(text), 2**31))
    response_delay = max(0.0, response_time - request_time)
    return max(apparent_age, age + response_delay)


def vary_names(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """Every field name any Vary line lists, lower-cased, in order, once each."""
    names: list[str] = []
    for value in field_values(headers, b"vary"):
        for part in value.decode("latin-1").split(","):
            name = part.strip().lower()
            if name and name not in names:
                names.append(name)
    return names


class Use(enum.Enum):
    """What a stored response may do for a request (RFC 9111 §4)."""

    FRESH = "fresh"  # answer from it
    STALE = "stale"  # answer from it, stale, as the request's max-stale allows
    STALE_WHILE_REVALIDATE = "stale-while-revalidate"  # answer, and revalidate in background
    REVALIDATE = "revalidate"  # ask the origin with its validators first


def judge(freshness: Freshness, request_control: CacheControl, now: float) -> Use:
    age = freshness.age(now)
    if freshness.no_cache or "no-cache" in request_control:
        return Use.REVALIDATE
    max_age = request_control.seconds("max-age")
    if max_age is not None and age > max_age:
        return Use.REVALIDATE
    remaining = freshness.lifetime - age
    if remaining > 0:
        min_fresh = request_control.seconds("min-fresh")
        if min_fresh is not None and remaining < min_fresh:
            return Use.REVALIDATE
        return Use.FRESH
    if freshness.must_revalidate:
        return Use.REVALIDATE
    staleness = -remaining
    if "max-stale" in request_control:
        max_stale = request_control.seconds("max-stale")
        if max_stale is None or staleness <= max_stale:
            return Use.STALE
    if staleness < freshness.stale_while_revalidate:
        return Use.STALE_WHILE_REVALIDATE
    return Use.REVALIDATE


def may_serve_on_error(freshness: Freshness, request_control: CacheControl, now: float) -> bool:
    """stale-if-error (RFC 5861 §4): a stale response may answer when the origin fails."""
    if freshness.must_revalidate:
        return False
    staleness = freshness.staleness(now)
    if staleness <= 0:
        return True
    window = freshness.stale_if_error
    requested = request_control.seconds("stale-if-error")
    if requested is not None:
        window = max(window, float(requested))
    return staleness <= window


def updated_headers(
    stored: list[tuple[bytes, bytes]], fresh: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """A stored response's fields freshened by a 304's (RFC 9111 §3.2)."""
    replacing = {name.lower() for name, _ in fresh if name.lower() not in NOT_UPDATED_FIELDS}
    kept = [(name, value) for name, value in stored if name.lower() not in replacing]
    return kept + [(name, value) for name, value in fresh if name.lower() in replacing]


def stored_headers(
    headers: list[tuple[bytes, bytes]], strip: tuple[str, ...] = ()
) -> list[tuple[bytes, bytes]]:
    """The fields kept with a stored response."""
    dropped = NOT_STORED_FIELDS | {name.encode("latin-1") for name in strip}
    connection = field_values(headers, b"connection")
    for value in connection:
        dropped |= {token.strip().lower() for token in value.split(b",")}
    return [(name, value) for name, value in headers if name.lower() not in dropped]
