"""Accept-Encoding negotiation, eligibility, header rewriting, streaming encoders."""

from __future__ import annotations

import gzip
import os
import zlib

import brotli
import pytest
import zstandard

from proxy.config import CompressConfig
from proxy.pipeline.compress import (
    CompressRule,
    Plan,
    accepted_codings,
    compress_all,
    compressed_headers,
    negotiate,
)

ALL = ("zstd", "br", "gzip")


def decode(algorithm: str, data: bytes) -> bytes:
    if algorithm == "gzip":
        return gzip.decompress(data)
    if algorithm == "br":
        return brotli.decompress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, None),
        (b"", None),
        (b"gzip", "gzip"),
        (b"gzip, br", "br"),  # equal q: the config's order
        (b"gzip, br, zstd", "zstd"),
        (b"gzip;q=1, br;q=0.5", "gzip"),
        (b"br;q=0, gzip;q=0.1", "gzip"),
        (b"br;q=0", None),
        (b"*", "zstd"),
        (b"*;q=0.5, zstd;q=0, gzip", "gzip"),
        (b"*;q=0", None),
        (b"identity", None),
        (b"GZIP", "gzip"),
        (b"x-gzip", "gzip"),
        (b"gzip;q=abc, br", "br"),
        (b"gzip;q=2", None),
        (b"deflate, compress", None),
    ],
)
def test_negotiation(accept, expected):
    assert negotiate(accept, ALL) == expected


def test_negotiation_among_listed_only():
    assert negotiate(b"zstd, br", ("gzip",)) is None
    assert negotiate(b"gzip, zstd", ("gzip", "zstd")) == "gzip"


def test_accepted_codings_first_occurrence_wins():
    assert accepted_codings(b"gzip;q=0.2, gzip;q=1") == {"gzip": 0.2}


def rule(**kwargs) -> CompressRule:
    return CompressRule(CompressConfig(**kwargs))


def plan(r, *, method=b"GET", status=200, headers=None, length=None, accept=b"gzip"):
    if headers is None:
        headers = [(b"Content-Type", b"text/html; charset=utf-8")]
    return r.plan(
        method=method, status=status, headers=headers, content_length=length, accept_encoding=accept
    )


def test_eligible_response_gets_the_negotiated_algorithm():
    assert plan(rule(), length=5000) == Plan("gzip", True)
    assert plan(rule(), length=None) == Plan("gzip", True)  # unknown length: compress


def test_head_is_never_coded_but_varies_as_its_get_would():
    assert plan(rule(), method=b"HEAD", length=5000) == Plan(None, True)
    assert plan(rule(), method=b"HEAD", length=100) == Plan(None, False)  # a GET: as it is


def test_not_accepted_still_varies():
    assert plan(rule(), accept=None, length=5000) == Plan(None, True)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"status": 204}, "204"),
        ({"status": 206}, "206"),
        ({"status": 304}, "304"),
        ({"length": 100}, "small"),
        ({"headers": [(b"Content-Type", b"text/html"), (b"Content-Encoding", b"br")]}, "coded"),
        ({"headers": [(b"Content-Type", b"image/png")]}, "type"),
        ({"headers": []}, "no type"),
        (
            {"headers": [(b"Content-Type", b"text/html"), (b"Cache-Control", b"No-Transform")]},
            "no-transform",
        ),
    ],
)
def test_not_eligible(kwargs, why):
    kwargs.setdefault("length", 5000)
    assert plan(rule(), **kwargs).algorithm is None, why


def test_types_exact_and_wildcard():
    r = rule(types=["text/*", "application/json"])
    assert r.listed_type(b"text/plain") and r.listed_type(b"Application/JSON; charset=x")
    assert not r.listed_type(b"application/json-seq") and not r.listed_type(b"textual/x")


def test_identity_content_encoding_is_compressible():
    headers = [(b"Content-Type", b"text/html"), (b"Content-Encoding", b"identity")]
    assert plan(rule(), headers=headers, length=5000).algorithm == "gzip"


def test_headers_rewritten_for_a_compressed_response():
    headers = [
        (b"Content-Type", b"text/html"),
        (b"Content-Length", b"5000"),
        (b"ETag", b'"abc"'),
        (b"Accept-Ranges", b"bytes"),
        (b"Vary", b"Accept-Language"),
    ]
    out = compressed_headers(headers, Plan("br", True))
    assert out == [
        (b"Content-Type", b"text/html"),
        (b"ETag", b'W/"abc"'),
        (b"Vary", b"Accept-Language, Accept-Encoding"),
        (b"Content-Encoding", b"br"),
    ]


def test_headers_when_only_varying():
    headers = [(b"ETag", b'"abc"'), (b"Content-Length", b"9")]
    out = compressed_headers(headers, Plan(None, True))
    assert out == [*headers, (b"Vary", b"Accept-Encoding")]
    already = [(b"Vary", b"accept-encoding"), (b"ETag", b'W/"x"')]
    assert compressed_headers(already, Plan("gzip", True)) == [
        *already,
        (b"Content-Encoding", b"gzip"),
    ]


@pytest.mark.parametrize("algorithm", ALL)
def test_round_trip(algorithm):
    body = b"hello sluicegate " * 1000
    coded = compress_all(algorithm, body)
    assert len(coded) < len(body) // 10
    assert decode(algorithm, coded) == body


@pytest.mark.parametrize("algorithm", ALL)
def test_streaming_each_chunk_is_decodable_as_it_comes(algorithm):
    """Each compressed chunk is flushed: a client can decode all it has so far."""
    encoder = rule().encoder(algorithm)
    chunks = [os.urandom(10) + b"a" * 3000 for _ in range(5)]
    if algorithm == "gzip":
        decoder = zlib.decompressobj(31)
        feed = decoder.decompress
    elif algorithm == "br":
        decoder = brotli.Decompressor()
        feed = decoder.process
    else:
        decoder = zstandard.ZstdDecompressor().decompressobj()
        feed = decoder.decompress
    seen = b""
    for chunk in chunks:
        seen += feed(encoder.compress(chunk))
        assert seen == b"".join(chunks[: chunks.index(chunk) + 1])
    feed(encoder.finish())
    assert seen == b"".join(chunks)


def test_level_is_honoured():
    body = b" ".join(b"%d" % (i * 7919 % 1000) for i in range(20000))
    fast = compress_all("gzip", body, level=1)
    best = compress_all("gzip", body, level=9)
    assert len(best) < len(fast)
