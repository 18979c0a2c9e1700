"""On-the-fly response compression: negotiation, eligibility, streaming encoders.

A route's ``compress`` rule is compiled once (``CompressRule``). For each response the
pipeline asks ``rule.plan(...)``: the content-coding to apply, if any, and whether the
response varies by ``Accept-Encoding`` at all (then ``Vary: Accept-Encoding`` is added even
when this client gets it uncompressed, so that caches downstream keep the variants apart).
The encoders stream: each chunk relayed is compressed and flushed as it comes, so a large
or endless body is never held, and memory per response is the codec's window.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol

import brotli
import zstandard

from proxy.cache.control import CacheControl, field_value, field_values

NOT_COMPRESSED_STATUSES = frozenset({204, 206, 304})
DEFAULT_LEVELS = {"gzip": 6, "br": 4, "zstd": 3}  # on-the-fly: speed over the last percent


def accepted_codings(accept_encoding: bytes | None) -> dict[str, float]:
    """Accept-Encoding as coding -> q (RFC 9110 §12.5.3); a bad q counts as 0."""
    if accept_encoding is None:
        return {}
    accepted: dict[str, float] = {}
    for item in accept_encoding.decode("latin-1").split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        if not coding:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        accepted.setdefault(coding.lower(), q)
    return accepted


def negotiate(accept_encoding: bytes | None, algorithms: tuple[str, ...]) -> str | None:
    """The listed coding the client prefers (ties: the config's order); None for identity.
    ``*`` stands for any coding the client did not name; ``q=0`` refuses."""
    accepted = accepted_codings(accept_encoding)
    if not accepted:
        return None
    wildcard = accepted.get("*", 0.0)
    best: str | None = None
    best_q = 0.0
    for algorithm in algorithms:
        q = accepted.get(algorithm, accepted.get("x-gzip") if algorithm == "gzip" else None)
        if q is None:
            q = wildcard
        if q > best_q:
            best, best_q = algorithm, q
    return best


@dataclass(frozen=True, slots=True)
class Plan:
    algorithm: str | None  # the coding to apply, or None
    varies: bool  # the answer depends on Accept-Encoding: say so in Vary


NO_PLAN = Plan(None, False)


class CompressRule:
    """A route's ``compress`` settings, compiled at config load."""

    __slots__ = ("algorithms", "exact_types", "level", "min_size", "type_prefixes")

    def __init__(self, config: object) -> None:
        self.algorithms: tuple[str, ...] = config.algorithms  # type: ignore[attr-defined]
        self.min_size: int = config.min_size  # type: ignore[attr-defined]
        self.level: int | None = config.level  # type: ignore[attr-defined]
        types = [t.lower() for t in config.types]  # type: ignore[attr-defined]
        self.exact_types = frozenset(t for t in types if not t.endswith("/*"))
        self.type_prefixes = tuple(t[:-1] for t in types if t.endswith("/*"))

    def plan(
        self,
        *,
        method: bytes,
        status: int,
        headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        accept_encoding: bytes | None,
    ) -> Plan:
        if not self.compressible(method, status, headers, content_length):
            return NO_PLAN
        if method == b"HEAD":
            # No body to code, but a GET's fields would vary: a HEAD's must say so too.
            return Plan(None, True)
        return Plan(negotiate(accept_encoding, self.algorithms), True)

    def compressible(
        self,
        method: bytes,
        status: int,
        headers: list[tuple[bytes, bytes]],
        content_length: int | None,
    ) -> bool:
        """Would this response (a HEAD's: the same GET's) be compressed for a client
        that accepts it?"""
        if status < 200 or status in NOT_COMPRESSED_STATUSES:
            return False
        if content_length is not None and content_length < self.min_size:
            return False
        encoding = field_value(headers, b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            return False
        if field_value(headers, b"content-range") is not None:
            return False
        if "no-transform" in CacheControl.parse(field_values(headers, b"cache-control")):
            return False
        return self.listed_type(field_value(headers, b"content-type"))

    def listed_type(self, content_type: bytes | None) -> bool:
        if content_type is None:
            return False
        media = content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
        return media in self.exact_types or media.startswith(self.type_prefixes)

    def encoder(self, algorithm: str) -> Encoder:
        return ENCODERS[algorithm](self.level)


def compressed_headers(headers: list[tuple[bytes, bytes]], plan: Plan) -> list[tuple[bytes, bytes]]:
    """The response fields once ``plan`` applies: Content-Encoding set, Content-Length and
    Accept-Ranges gone (the length is unknown, byte ranges would address the coded form),
    a strong ETag weakened, Accept-Encoding in Vary."""
    algorithm = plan.algorithm
    out: list[tuple[bytes, bytes]] = []
    vary_done = False
    for name, value in headers:
        lowered = name.lower()
        if algorithm is not None:
            if lowered in (b"content-length", b"accept-ranges", b"content-encoding"):
                continue
            if lowered == b"etag" and not value.lstrip().startswith(b"W/"):
                value = b"W/" + value.strip()
        if lowered == b"vary" and plan.varies and not vary_done:
            tokens = [t.strip().lower() for t in value.split(b",")]
            if b"accept-encoding" not in tokens and b"*" not in tokens:
                value = value + b", Accept-Encoding"
            vary_done = True
        out.append((name, value))
    if plan.varies and not vary_done:
        out.append((b"Vary", b"Accept-Encoding"))
    if algorithm is not None:
        out.append((b"Content-Encoding", algorithm.encode()))
    return out


class Encoder(Protocol):
    def compress(self, chunk: bytes) -> bytes:
        """``chunk`` coded and flushed, so the client can decode all it has received."""
        ...

    def finish(self) -> bytes: ...


class GzipEncoder:
    __slots__ = ("_z",)

    def __init__(self, level: int | None) -> None:
        self._z = zlib.compressobj(level or DEFAULT_LEVELS["gzip"], zlib.DEFLATED, 31)

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class BrotliEncoder:
    __slots__ = ("_b",)

    def __init__(self, level: int | None) -> None:
        self._b = brotli.Compressor(quality=level or DEFAULT_LEVELS["br"])

    def compress(self, chunk: bytes) -> bytes:
        return self._b.process(chunk) + self._b.flush()

    def finish(self) -> bytes:
        return self._b.finish()


class ZstdEncoder:
    __slots__ = ("_z",)

    def __init__(self, level: int | None) -> None:
        self._z = zstandard.ZstdCompressor(level=level or DEFAULT_LEVELS["zstd"]).compressobj()

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk) + self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        return self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


ENCODERS: dict[str, type] = {"gzip": GzipEncoder, "br": BrotliEncoder, "zstd": ZstdEncoder}


def compress_all(algorithm: str, body: bytes, level: int | None = None) -> bytes:
    encoder = ENCODERS[algorithm](level)
    return encoder.compress(body) + encoder.finish()


def begin_compression(
    rule: CompressRule, request: object, response: object, length: int | None
) -> tuple[Encoder | None, str | None]:
    """Apply ``rule`` to a response head about to leave (its fields rewritten in place):
    the encoder for its body and the algorithm, or (None, None) when it goes as it is.
    ``length``: the body's length when known."""
    plan = rule.plan(
        method=request.method,  # type: ignore[attr-defined]
        status=response.status,  # type: ignore[attr-defined]
        headers=response.headers,  # type: ignore[attr-defined]
        content_length=length,
        accept_encoding=request.header(b"accept-encoding"),  # type: ignore[attr-defined]
    )
    if not plan.varies:
        return None, None
    headers = compressed_headers(response.headers, plan)  # type: ignore[attr-defined]
    response.replace_headers(headers)  # type: ignore[attr-defined]
    if plan.algorithm is None:
        return None, None
    response.reframe(None)  # type: ignore[attr-defined]
    return rule.encoder(plan.algorithm), plan.algorithm
