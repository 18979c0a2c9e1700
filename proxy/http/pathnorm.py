"""The request-target as routes see it: one normal form per path, no I/O.

Theory of operation. Two spellings of one resource (``/limited/x``, ``/%6Cimited/x``,
``//limited/x``, ``/./limited/x``, ``/a/../limited/x``) must match the same route, count
against the same rate-limit bucket and cache entry, and reach the upstream as the same
bytes: otherwise a client picks the spelling that escapes a rule and the upstream, which
normalises for itself, serves what the rule was meant to guard. So the path is put in
normal form once, as nginx's locations do, and everything downstream sees only that:

1. percent-encoded *unreserved* characters (RFC 3986 2.3: ALPHA DIGIT ``-._~``) are
   decoded, hex case-insensitive; every other escape stays encoded with its hex in upper
   case (``%2f`` -> ``%2F``), so ``%2F`` and ``%5C`` never become separators;
2. runs of ``/`` merge into one;
3. dot segments are removed (RFC 3986 5.2.4), ``%2E`` included since step 1 decoded it; a
   path that climbs above the root is refused rather than clamped.

Refused (``InvalidTarget``, a 400): a fragment (``#``: never sent by a conforming client,
and forwarding it lets an upstream read a different path, CVE-2021-32779), a NUL (raw or
``%00``, anywhere in the target), an invalid escape (``%zz``, a trailing ``%``: nginx says
400 too). The query is returned untouched apart from those checks.

Invariants (tested): the result is a fixed point (normalising it again changes nothing); it
never contains ``//``, ``/./`` or ``/../`` nor ends in ``/.`` or ``/..``; it never decodes a
byte outside the unreserved set. A path with none of ``%``, ``//``, ``/.`` is returned as
it came, after a few C-level scans (compiled, proxy/compiled.py: one C loop): that is every
request of a sane client.
"""

from __future__ import annotations

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_HASH, _PERCENT, _DOT = b"#%."


class InvalidTarget(ValueError):
    """A request-target no route may see; ``reason`` is the one-line answer (a 400)."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normalize_target(raw: bytes) -> tuple[bytes, bytes | None]:
    """Origin-form ``raw`` (it starts with ``/``) -> (normal path, query or None).

    The query is what followed the first ``?`` (``b""`` for a bare ``?``), unchanged.
    """
    # Single bytes are looked up as ints (``35 in raw``): a C memchr, several times
    # cheaper here than ``b"#" in raw``.
    if _HASH in raw:
        raise InvalidTarget("fragment in request target")
    if 0 in raw:
        raise InvalidTarget("NUL in request target")
    path, question, query = raw.partition(b"?")
    if not question:
        query = None
    elif _PERCENT in query and query.find(b"%00") >= 0:
        raise InvalidTarget("NUL in request target")
    if not _plain(path):
        path = normalize_path(path)
    return path, query


@cython.cfunc
@cython.locals(byte=cython.uchar, after_slash=cython.bint)
def _plain(path: bytes) -> cython.bint:
    """Already in normal form as it came: none of ``%``, ``//``, ``/.``."""
    if cython.compiled:
        # One pass over the bytes in C: bytes.find parses its arguments from a tuple
        # (about 900 instructions a call, more than the whole scan).
        after_slash = False
        for byte in path:
            if byte == 37 or (after_slash and (byte == 47 or byte == 46)):  # % after / // /.
                return False
            after_slash = byte == 47
        return True
    return not (
        _PERCENT in path or path.find(b"//") >= 0 or (_DOT in path and path.find(b"/.") >= 0)
    )


def normalize_path(path: bytes) -> bytes:
    """The slow part of ``normalize_target``: ``path`` holds ``%``, ``//`` or ``/.``."""
    if _PERCENT in path:
        path = _decode_unreserved(path)
    while path.find(b"//") >= 0:
        path = path.replace(b"//", b"/")
    if path.find(b"/.") >= 0:
        path = _remove_dot_segments(path)
    return path


def _decode_unreserved(path: bytes) -> bytes:
    pieces = path.split(b"%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            raise InvalidTarget("invalid percent-encoding in request target")
        byte = int(piece[:2], 16)
        if byte == 0:
            raise InvalidTarget("NUL in request target")
        if byte in _UNRESERVED:
            out.append(bytes((byte,)))
        else:
            out.append(b"%" + piece[:2].upper())
        out.append(piece[2:])
    return b"".join(out)


def _remove_dot_segments(path: bytes) -> bytes:
    """``path`` starts with ``/`` and has no ``//``: each ``/``-separated segment is a name,
    ``.`` or ``..``. A last segment ``.`` or ``..`` leaves a trailing slash, as in RFC 3986."""
    segments = path.split(b"/")
    kept: list[bytes] = []
    for segment in segments[1:-1]:
        if segment == b".":
            continue
        if segment == b"..":
            if not kept:
                raise InvalidTarget("request target climbs above the root")
            kept.pop()
            continue
        kept.append(segment)
    last = segments[-1] if len(segments) > 1 else b""
    if last == b".":
        last = b""
    elif last == b"..":
        if not kept:
            raise InvalidTarget("request target climbs above the root")
        kept.pop()
        last = b""
    kept.append(last)
    return b"/" + b"/".join(kept)
