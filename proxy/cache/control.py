"""Cache-Control (RFC 9111 §5.2), CDN-Cache-Control (RFC 9213), Pragma, and HTTP dates.

Directives are parsed once per header set into a ``CacheControl``: names lower-cased,
values unquoted. A directive that appears twice with different values is *conflicting*:
RFC 9111 §4.2.1 lets a cache treat such a response as stale, which is what ``seconds``
does (it answers 0) — the most restrictive reading, never the most generous one.
"""

from __future__ import annotations

import calendar
import email.utils
import re
import time
from collections.abc import Iterable

# delta-seconds beyond this are taken as this (RFC 9111 §1.2.2).
DELTA_SECONDS_CAP = 2**31

_DIRECTIVE = re.compile(
    r"""\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)      # name (a token)
        (?:\s*=\s*(?:"((?:[^"\\]|\\.)*)"       # = quoted-string
                   |([^,\s]*)))?               #   or token (possibly empty)
        \s*(?:,|$)""",
    re.VERBOSE,
)
_QUOTED_PAIR = re.compile(r"\\(.)")


class CacheControl:
    """The directives of one or more Cache-Control field lines."""

    __slots__ = ("conflicting", "directives")

    def __init__(self, directives: dict[str, str | None], conflicting: frozenset[str]) -> None:
        self.directives = directives
        self.conflicting = conflicting

    @classmethod
    def parse(cls, values: Iterable[bytes | str]) -> CacheControl:
        directives: dict[str, str | None] = {}
        conflicting: set[str] = set()
        for raw in values:
            text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
            for name, value in _directives(text):
                if name in directives and directives[name] != value:
                    conflicting.add(name)
                directives.setdefault(name, value)
        return cls(directives, frozenset(conflicting))

    def __contains__(self, name: str) -> bool:
        return name in self.directives

    def __bool__(self) -> bool:
        return bool(self.directives)

    def __repr__(self) -> str:
        return f"CacheControl({self.directives!r})"

    def seconds(self, name: str) -> int | None:
        """A delta-seconds directive: None when absent or invalid, 0 when conflicting."""
        if name not in self.directives:
            return None
        if name in self.conflicting:
            return 0
        return delta_seconds(self.directives[name])

    def field_names(self, name: str) -> tuple[str, ...] | None:
        """The field names a qualified directive lists (``no-cache="Set-Cookie"``): None
        when the directive is absent, () when present without names."""
        if name not in self.directives:
            return None
        value = self.directives[name]
        if not value:
            return ()
        return tuple(part.strip().lower() for part in value.split(",") if part.strip())


def _directives(text: str) -> Iterable[tuple[str, str | None]]:
    position = 0
    length = len(text)
    while position < length:
        match = _DIRECTIVE.match(text, position)
        if match is None or match.end() == position:
            # Garbage up to the next comma is skipped, not allowed to poison the rest.
            comma = text.find(",", position)
            if comma < 0:
                return
            position = comma + 1
            continue
        position = match.end()
        name, quoted, token = match.groups()
        if quoted is not None:
            value: str | None = _QUOTED_PAIR.sub(r"\1", quoted)
        else:
            value = token
        yield name.lower(), value


def delta_seconds(value: str | None) -> int | None:
    if value is None or not value.isdigit() or not value.isascii():
        return None
    return min(int(value), DELTA_SECONDS_CAP)


def response_control(headers: list[tuple[bytes, bytes]]) -> CacheControl:
    """The directives this cache obeys: CDN-Cache-Control when present and valid (RFC 9213
    §2.1: it then replaces Cache-Control for this cache entirely), else Cache-Control."""
    cdn = field_values(headers, b"cdn-cache-control")
    if cdn and valid_cdn_cache_control(cdn):
        return CacheControl.parse(cdn)
    return CacheControl.parse(field_values(headers, b"cache-control"))


# RFC 9213 makes CDN-Cache-Control a Structured Field dictionary (RFC 8941 §3.2): one that
# does not parse, or gives a delta-seconds directive another type, is ignored as a whole.
_SF_KEY = r"[a-z*][a-z0-9_\-.*]*"
_SF_ITEM = (
    r"(?:-?\d{1,15}(?:\.\d{1,3})?"  # integer or decimal
    r'|"(?:[^"\\]|\\["\\])*"'  # string
    r"|[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*"  # token
    r"|:[A-Za-z0-9+/=]*:"  # byte sequence
    r"|\?[01])"  # boolean
)
_SF_MEMBER = re.compile(rf"^({_SF_KEY})(?:=({_SF_ITEM}))?(?:;{_SF_KEY}(?:={_SF_ITEM})?)*$")
_DELTA_DIRECTIVES = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})


def valid_cdn_cache_control(values: list[bytes]) -> bool:
    text = ",".join(value.decode("latin-1") for value in values)
    for member in _split_members(text):
        match = _SF_MEMBER.match(member.strip(" \t"))
        if match is None:
            return False
        name, value = match.groups()
        if name in _DELTA_DIRECTIVES and (value is None or not value.lstrip("-").isdigit()):
            return False
    return True


def _split_members(text: str) -> list[str]:
    """Split at commas outside quoted strings."""
    members, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            members.append("".join(current))
            current = []
            continue
        current.append(char)
    members.append("".join(current))
    return members


def request_control(headers: list[tuple[bytes, bytes]]) -> CacheControl:
    """A request's directives; ``Pragma: no-cache`` counts as ``no-cache`` only when the
    request has no Cache-Control (RFC 9111 §5.4)."""
    values = field_values(headers, b"cache-control")
    if values:
        return CacheControl.parse(values)
    pragma = CacheControl.parse(field_values(headers, b"pragma"))
    if "no-cache" in pragma:
        return CacheControl({"no-cache": None}, frozenset())
    return CacheControl({}, frozenset())


def field_values(headers: Iterable[tuple[bytes, bytes]], lowered_name: bytes) -> list[bytes]:
    return [value for name, value in headers if name.lower() == lowered_name]


def field_value(headers: Iterable[tuple[bytes, bytes]], lowered_name: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lowered_name:
            return value
    return None


# -- HTTP dates (RFC 9110 §5.6.7): IMF-fixdate, and the obsolete RFC 850 and asctime --------

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_IMF = re.compile(
    r"^(?:mon|tue|wed|thu|fri|sat|sun), (\d\d) ([a-z]{3}) (\d{4}) (\d\d):(\d\d):(\d\d) gmt$"
)
_RFC850 = re.compile(
    r"^(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday), "
    r"(\d\d)-([a-z]{3})-(\d\d) (\d\d):(\d\d):(\d\d) gmt$"
)
_ASCTIME = re.compile(
    r"^(?:mon|tue|wed|thu|fri|sat|sun) ([a-z]{3}) ( \d|\d\d) (\d\d):(\d\d):(\d\d) (\d{4})$"
)


def parse_http_date(value: bytes | str | None) -> float | None:
    """Seconds since the epoch, or None when absent or not an HTTP date."""
    if value is None:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip().lower()
    match = _IMF.match(text)
    if match:
        day, month, year, hour, minute, second = match.groups()
    else:
        match = _RFC850.match(text)
        if match:
            day, month, short_year, hour, minute, second = match.groups()
            # RFC 9110: a two-digit year more than 50 years in the future is in the past.
            year = str(2000 + int(short_year))
            if int(year) > _this_year() + 50:
                year = str(1900 + int(short_year))
        else:
            match = _ASCTIME.match(text)
            if not match:
                return None
            month, day, hour, minute, second, year = match.groups()
    month_number = _MONTHS.get(month)
    if month_number is None:
        return None
    try:
        return float(
            calendar.timegm(
                (int(year), month_number, int(day), int(hour), int(minute), int(second))
            )
        )
    except (ValueError, OverflowError):
        return None


def _this_year() -> int:
    return time.gmtime().tm_year


def format_http_date(seconds: float) -> bytes:
    return email.utils.formatdate(seconds, usegmt=True).encode()
