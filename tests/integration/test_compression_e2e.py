"""Compression through the real daemon: negotiated, framed, decodable, streamed."""

from __future__ import annotations

import gzip
import re
import threading
import zlib

import brotli
import pytest
import zstandard

from tests.support.rawupstream import RawClient, RawUpstream

PAGE = b"<p>sluicegate compresses this page</p>\n" * 500  # 19.5 KB, very compressible
COMPRESS = {"algorithms": ["zstd", "br", "gzip"], "min_size": "1KiB"}


def decode(algorithm: str | None, data: bytes) -> bytes:
    if algorithm == "gzip":
        return gzip.decompress(data)
    if algorithm == "br":
        return brotli.decompress(data)
    if algorithm == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def respond_with(body: bytes, extra: bytes = b"", content_type: bytes = b"text/html"):
    def respond(request, sock):
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nContent-Length: %d\r\n"
            b'ETag: "v1"\r\n%b\r\n%b'
            % (content_type, len(body), extra, b"" if request.method == b"HEAD" else body)
        )
        return True

    return respond


def config_for(upstream: RawUpstream, compress=COMPRESS) -> dict:
    return {
        "upstreams": {"app": {"servers": [{"url": upstream.url}], "retry": {"tries": 1}}},
        "routes": [
            {
                "name": "squeezed",
                "match": {"path_prefix": "/"},
                "upstream": "app",
                "compress": compress,
            }
        ],
    }


def get(port: int, accept: str | None, method: str = "GET", path: str = "/page"):
    client = RawClient(port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
        if accept is not None:
            head += f"Accept-Encoding: {accept}\r\n"
        return client.request((head + "\r\n").encode(), head_request=method == "HEAD")
    finally:
        client.close()


@pytest.mark.parametrize(
    ("accept", "algorithm"),
    [("gzip", "gzip"), ("gzip, br", "br"), ("gzip, br, zstd", "zstd"), ("br;q=0, gzip", "gzip")],
)
def test_negotiated_and_decodable(start_sluicegate, accept, algorithm):
    with RawUpstream(respond_with(PAGE)) as upstream:
        daemon = start_sluicegate(config_for(upstream))
        response = get(daemon.port, accept)
        assert response.status == 200
        assert response.header("content-encoding") == algorithm
        assert response.header("transfer-encoding") == "chunked"
        assert response.header("content-length") is None
        assert response.header("vary") == "Accept-Encoding"
        assert response.header("etag") == 'W/"v1"'
        assert len(response.body) < len(PAGE) // 10
        assert decode(algorithm, response.body) == PAGE
        metrics = daemon.metrics()
        assert (
            f'sluicegate_compressed_responses_total{{algorithm="{algorithm}",route="squeezed"}} 1.0'
            in metrics
        )


@pytest.mark.parametrize("accept", [None, "identity", "gzip;q=0", "deflate"])
def test_not_accepted_goes_as_it_is_and_varies(start_sluicegate, accept):
    with RawUpstream(respond_with(PAGE)) as upstream:
        daemon = start_sluicegate(config_for(upstream))
        response = get(daemon.port, accept)
        assert response.header("content-encoding") is None
        assert response.header("content-length") == str(len(PAGE))
        assert response.header("vary") == "Accept-Encoding"
        assert response.header("etag") == '"v1"'
        assert response.body == PAGE


@pytest.mark.parametrize(
    ("body", "extra", "content_type", "method"),
    [
        (b"tiny", b"", b"text/html", "GET"),  # under min_size
        (PAGE, b"Cache-Control: no-transform\r\n", b"text/html", "GET"),
        (PAGE, b"Content-Encoding: br\r\n", b"text/html", "GET"),
        (PAGE, b"", b"image/png", "GET"),
        (PAGE, b"", b"text/html", "HEAD"),
    ],
)
def test_ineligible_responses_are_left_alone(start_sluicegate, body, extra, content_type, method):
    with RawUpstream(respond_with(body, extra, content_type)) as upstream:
        daemon = start_sluicegate(config_for(upstream))
        response = get(daemon.port, "gzip, br, zstd", method=method)
        assert response.status == 200
        assert response.header("content-encoding") in (None, "br")
        assert response.header("content-encoding") != "gzip"
        if method == "GET":
            assert response.body == body
        else:  # a HEAD is never coded, but a GET of it would be: it says so
            assert response.header("vary") == "Accept-Encoding"
        assert "sluicegate_compressed_responses_total{" not in daemon.metrics()


def test_route_without_compress_is_untouched(start_sluicegate):
    with RawUpstream(respond_with(PAGE)) as upstream:
        config = config_for(upstream)
        del config["routes"][0]["compress"]
        daemon = start_sluicegate(config)
        response = get(daemon.port, "gzip")
        assert response.header("content-encoding") is None and response.header("vary") is None
        assert response.body == PAGE


def test_a_chunked_body_is_compressed_as_it_streams(start_sluicegate):
    """The upstream holds back the rest of its body until the client has decoded the
    first part: a proxy that held the body before compressing would deadlock here."""
    first_part_seen = threading.Event()
    part = b"streamed line of text\n" * 3000  # 66 KB

    def respond(request, sock):
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(b"%x\r\n%b\r\n" % (len(part), part))
        assert first_part_seen.wait(10), "the proxy held the first part back"
        for _ in range(20):
            sock.sendall(b"%x\r\n%b\r\n" % (len(part), part))
        sock.sendall(b"0\r\n\r\n")
        return True

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(config_for(upstream))
        client = RawClient(daemon.port)
        client.send(b"GET /stream HTTP/1.1\r\nHost: test\r\nAccept-Encoding: gzip\r\n\r\n")
        head = client.reader.until(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head and b"Transfer-Encoding: chunked" in head
        decoder = zlib.decompressobj(31)
        seen = b""
        while len(seen) < len(part):
            size = int(client.reader.until(b"\r\n"), 16)
            assert size > 0
            seen += decoder.decompress(client.reader.exactly(size, True)[0])
            client.reader.exactly(2, False)
        first_part_seen.set()
        while True:
            size = int(client.reader.until(b"\r\n"), 16)
            if size == 0:
                break
            seen += decoder.decompress(client.reader.exactly(size, True)[0])
            client.reader.exactly(2, False)
        client.close()
        assert seen == part * 21


def test_compression_level_and_type_list_from_config(start_sluicegate):
    with RawUpstream(respond_with(PAGE, content_type=b"application/json")) as upstream:
        daemon = start_sluicegate(
            config_for(
                upstream, {"algorithms": ["gzip"], "types": ["application/json"], "level": 9}
            )
        )
        response = get(daemon.port, "br, zstd, gzip")
        assert response.header("content-encoding") == "gzip"
        assert decode("gzip", response.body) == PAGE
        assert re.search(r"\\bzstd\\b", response.header("vary") or "") is None
