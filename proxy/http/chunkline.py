"""Bounds on the chunked-framing bytes llhttp reads without telling us: no I/O.

Theory of operation. httptools calls back for chunk data and for each complete trailer
field, never for the bytes of a chunk-size line: left alone it takes a line of any length,
so 100 KiB of chunk extensions pass a 4 KiB head limit and a 1 KiB body limit (Node's
CVE-2024-22019, Go's CVE-2023-39326). A line (size plus extensions) longer than
``LINE_LIMIT`` must be refused, and the trailer section, which httptools buffers field by
field, bounded.

``ChunkedScanner`` walks the framing of one chunked body next to the parser, over the same
bytes, before the parser sees them: a chunk-size line up to its LF (one ``bytes.find``),
its size, then that many data bytes skipped by arithmetic, the CRLF, the next line; after
the last chunk, trailer lines up to the empty one. The cost is a few operations per chunk,
none per data byte, and nothing at all for a body that is not chunked. Its one input is
where the body starts: the connection cuts what it feeds the parser at the end of each
head (the first CRLFCRLF, llhttp requiring CRLF), so a body always starts at a slice
boundary. The scanner never decides whether framing is valid (llhttp does, and refuses
what the scanner cannot read); it only bounds what llhttp would accept.
"""

from __future__ import annotations

import enum

LINE_LIMIT = 4096

LINE_TOO_LONG = "chunk-size line longer than 4096 bytes"
TRAILERS_TOO_LARGE = "chunked trailer section too large"


class _At(enum.Enum):
    SIZE_LINE = "size line"
    DATA = "data"
    DATA_CRLF = "CRLF after data"
    TRAILERS = "trailer section"


class ChunkedScanner:
    """The framing of the chunked body being read; ``begin`` at its first byte, then
    ``scan`` every byte of it, in order, before the parser gets them."""

    __slots__ = (
        "_at",
        "_line",
        "_line_bytes",
        "_remaining",
        "_trailer_bytes",
        "active",
        "trailer_limit",
    )

    def __init__(self, trailer_limit: int) -> None:
        self.trailer_limit = trailer_limit
        self.active = False
        self._at = _At.SIZE_LINE
        self._line = b""  # the size line so far (bounded by LINE_LIMIT)
        self._line_bytes = 0  # bytes of the current line so far, CRLF included
        self._remaining = 0  # data or CRLF bytes still to come
        self._trailer_bytes = 0

    def begin(self) -> None:
        self.active = True
        self._at = _At.SIZE_LINE
        self._line = b""
        self._line_bytes = 0
        self._trailer_bytes = 0

    def stop(self) -> None:
        self.active = False
        self._line = b""

    def scan(self, data: bytes, start: int, end: int) -> tuple[str | None, int]:
        """Walk ``data[start:end]``. Returns (the reason to refuse the message or None,
        the offset just past the body's last byte, or -1 when the body goes on)."""
        position = start
        while position < end:
            at = self._at
            if at is _At.DATA or at is _At.DATA_CRLF:
                step = min(self._remaining, end - position)
                position += step
                self._remaining -= step
                if self._remaining == 0:
                    if at is _At.DATA:
                        self._at = _At.DATA_CRLF
                        self._remaining = 2
                    else:
                        self._at = _At.SIZE_LINE
                continue
            newline = data.find(b"\n", position, end)
            stop = end if newline < 0 else newline + 1
            self._line_bytes += stop - position
            if at is _At.SIZE_LINE:
                if self._line_bytes > LINE_LIMIT + 2:  # size and extensions, then CRLF
                    self.stop()
                    return LINE_TOO_LONG, -1
                self._line += data[position:stop]
                position = stop
                if newline < 0:
                    break
                size = _chunk_size(self._line)
                self._line = b""
                self._line_bytes = 0
                if size is None:
                    self.stop()  # not a size line: the parser refuses it
                    return None, -1
                if size:
                    self._at = _At.DATA
                    self._remaining = size
                else:
                    self._at = _At.TRAILERS
                continue
            self._trailer_bytes += stop - position
            if self._trailer_bytes > self.trailer_limit:
                self.stop()
                return TRAILERS_TOO_LARGE, -1
            position = stop
            if newline < 0:
                break
            if self._line_bytes == 2:  # the empty line: the message ends here
                self.stop()
                return None, position
            self._line_bytes = 0
        return None, -1


def _chunk_size(line: bytes) -> int | None:
    """``1a;name=value\\r\\n`` -> 26; None when the line does not start with a hex size.

    ``int`` is more lenient than llhttp (``0x``, ``_``, blanks): what it reads that llhttp
    does not, llhttp refuses anyway; what both read, they read alike.
    """
    try:
        size = int(line.partition(b";")[0], 16)
    except ValueError:
        return None
    return size if size >= 0 else None  # "-5": int reads it, llhttp refuses it
