"""ChunkedScanner: chunked bodies cut into reads at every place, the scanner's verdict and
the body's end checked against how they were built (and against llhttp, for the bodies
the scanner passes)."""

from __future__ import annotations

import itertools
import random

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.chunkline import LINE_LIMIT, LINE_TOO_LONG, TRAILERS_TOO_LARGE, ChunkedScanner

HEAD = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
TRAILER_LIMIT = 8192


def body(*chunks: tuple[bytes, bytes], trailers: bytes = b"") -> bytes:
    """(data, extension) pairs, then the last chunk and ``trailers``."""
    out = [b"%x%b\r\n%b\r\n" % (len(data), extension, data) for data, extension in chunks]
    return b"".join([*out, b"0\r\n", trailers, b"\r\n"])


def extension(line_length: int, size_digits: int = 1) -> bytes:
    """An extension making a chunk-size line (size plus extensions) ``line_length`` long."""
    return b";e=" + b"x" * (line_length - size_digits - 3)


def scan(chunked: bytes, cuts: list[int] = ()) -> tuple[str | None, int]:
    """Scan HEAD + ``chunked`` + NEXT delivered as reads split at ``cuts``, from the body's
    first byte. Returns (refusal, offset of the body's end from the body's start)."""
    wire = HEAD + chunked + NEXT
    bounds = sorted({0, len(wire), *(c for c in cuts if 0 < c < len(wire))})
    scanner = ChunkedScanner(trailer_limit=TRAILER_LIMIT)
    scanner.begin()
    for low, high in itertools.pairwise(bounds):
        if high <= len(HEAD):
            continue
        read = wire[low:high]  # a read of its own, as the socket gives it
        refused, end = scanner.scan(read, max(0, len(HEAD) - low), len(read))
        if refused is not None or end >= 0:
            assert not scanner.active
            return refused, (low + end - len(HEAD)) if end >= 0 else -1
    return None, -1


def llhttp_accepts(chunked: bytes) -> bool:
    class Sink:
        complete = False

        def on_message_complete(self) -> None:
            self.complete = True

    sink = Sink()
    try:
        httptools.HttpRequestParser(sink).feed_data(HEAD + chunked)
    except httptools.HttpParserError:
        return False
    return sink.complete


CUTS = [[], [len(HEAD) + 1], [len(HEAD) + 3, len(HEAD) + 4], list(range(0, 300, 1))]


@pytest.mark.parametrize("cuts", CUTS, ids=["one read", "after 1", "around CRLF", "bytewise"])
def test_a_line_at_the_limit_passes_and_one_byte_more_is_refused(cuts):
    ok = body((b"ab", b";a=1"), (b"hello", extension(LINE_LIMIT)))
    assert scan(ok, cuts) == (None, len(ok))
    assert llhttp_accepts(ok)
    too_long = body((b"ab", b";a=1"), (b"hello", extension(LINE_LIMIT + 1)))
    assert scan(too_long, cuts) == (LINE_TOO_LONG, -1)


def test_100_kib_of_extensions_is_refused_before_the_line_ends():
    scanner = ChunkedScanner(trailer_limit=TRAILER_LIMIT)
    scanner.begin()
    assert scanner.scan(b"5;e=" + b"x" * 4000, 0, 4004) == (None, -1)
    assert scanner.scan(b"x" * 4000, 0, 4000) == (LINE_TOO_LONG, -1)


def test_the_last_chunk_line_and_zero_padding_count():
    assert scan(b"0" + extension(LINE_LIMIT + 1) + b"\r\n\r\n")[0] == LINE_TOO_LONG
    padded = b"0" * LINE_LIMIT + b"5\r\nhello\r\n0\r\n\r\n"
    assert scan(padded)[0] == LINE_TOO_LONG
    fine = b"0" * 100 + b"5\r\nhello\r\n0\r\n\r\n"
    assert scan(fine) == (None, len(fine))
    assert llhttp_accepts(fine)


def test_big_chunks_and_many_small_ones_end_where_they_end():
    data = random.Random(7).randbytes(50_000)  # holds CR, LF and ';' bytes: all skipped
    big = body((data, b""), (data[:3], b";a=b"))
    assert scan(big, [1000, 60_000, 60_001]) == (None, len(big))
    small = body(*[(bytes([b]), b";k=v") for b in data[:3000]])
    assert scan(small) == (None, len(small))
    assert scan(small, list(range(0, len(small), 7))) == (None, len(small))


def test_trailers_are_bounded_and_ordinary_ones_pass():
    ok = body((b"hello", b""), trailers=b"X-Sum: 1\r\nX-Other: 2\r\n")
    assert scan(ok, [len(HEAD) + 17]) == (None, len(ok))
    assert llhttp_accepts(ok)
    huge = body((b"hello", b""), trailers=b"X-Big: " + b"a" * 100_000 + b"\r\n")
    assert scan(huge) == (TRAILERS_TOO_LARGE, -1)
    many = body((b"hello", b""), trailers=b"X-A: 1\r\n" * 2000)
    assert scan(many) == (TRAILERS_TOO_LARGE, -1)


def test_a_line_that_is_not_a_size_line_is_left_to_the_parser():
    scanner = ChunkedScanner(trailer_limit=TRAILER_LIMIT)
    scanner.begin()
    assert scanner.scan(b"zz\r\nhello\r\n", 0, 11) == (None, -1)
    assert not scanner.active
    for line in (b"-5\r\nhello\r\n", b"\r\n", b";a=b\r\n"):
        scanner.begin()
        assert scanner.scan(line, 0, len(line)) == (None, -1)
        assert not scanner.active


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.integers(min_value=4, max_value=LINE_LIMIT + 40), min_size=1, max_size=4),
    sizes=st.lists(st.integers(min_value=1, max_value=9000), min_size=4, max_size=4),
    trailers=st.sampled_from([b"", b"X-T: 1\r\n", b"A: b\r\nC: d\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=30_000), max_size=8),
)
def test_refused_exactly_when_a_line_is_over_the_limit(lines, sizes, trailers, cuts):
    pairs = zip(lines, sizes[: len(lines)], strict=True)
    chunks = [(bytes([size % 251]) * size, extension(length)) for length, size in pairs]
    chunked = body(*chunks, trailers=trailers)
    over = any(len(b"%x" % len(data)) + len(ext) > LINE_LIMIT for data, ext in chunks)
    refused, end = scan(chunked, cuts)
    if over:
        assert (refused, end) == (LINE_TOO_LONG, -1)
    else:
        assert (refused, end) == (None, len(chunked))
        assert llhttp_accepts(chunked)
