"""The request path's JSON access line says exactly what the generic formatter says."""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _escape
from types import SimpleNamespace

import pytest

from proxy.control.runtime import Refusal
from proxy.observability.accessline import json_line as _json_line
from proxy.observability.accesslog import FIELDS, format_json
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.state import ExchangeState


def _exchange(path: bytes, error: str, attempts: list) -> tuple:
    request = SimpleNamespace(
        request_id=b"abc123",
        method=b"POST",
        host=b"api.example.com:8080",
        path=path,
        body=SimpleNamespace(received=42),
    )
    outcome = ExchangeState()
    outcome.route = "api"
    outcome.upstream = "backend"
    outcome.server = "10.0.0.1:80"
    outcome.status = 502
    outcome.bytes_out = 17
    outcome.upstream_seconds = 0.25
    outcome.tries = 2
    outcome.rate_limited = True
    outcome.error = error
    outcome.attempts = attempts
    outcome.cache_status = "hit"
    return request, outcome


@pytest.mark.parametrize(
    ("path", "error", "attempts"),
    [
        (b"/", "", []),
        (b"/one-try", "", [{"server": "10.0.0.1:80", "outcome": 200, "ms": 3.36}]),
        (b'/we"ird\\path\x01\xff', 'said "no"\nthen left', []),
        (
            b"/v1/items",
            "upstream closed mid-response",
            [
                {"server": "10.0.0.1:80", "outcome": "error", "ms": 1.5},
                {"server": "10.0.0.2:80", "outcome": "timeout", "ms": 300.0, "status": 200},
            ],
        ),
    ],
)
def test_fast_line_matches_the_generic_formatter(path, error, attempts):
    request, outcome = _exchange(path, error, attempts)
    fast = json.loads(_json_line(request, outcome, "203.0.113.9", 0.5))
    record = {
        "time": fast["time"],
        "request_id": "abc123",
        "client_ip": "203.0.113.9",
        "method": "POST",
        "host": "api.example.com:8080",
        "path": path.decode("latin-1"),
        "route": "api",
        "upstream": "backend",
        "server": "10.0.0.1:80",
        "status": 502,
        "bytes_in": 42,
        "bytes_out": 17,
        "duration_ms": 500.0,
        "upstream_duration_ms": 250.0,
        "tries": 2,
        "rate_limited": True,
        "error": error,
        "cache": "hit",
        "attempts": attempts or None,
    }
    generic = json.loads(format_json(record))
    assert fast == generic
    assert list(fast)[: len(FIELDS)] == list(FIELDS)


def test_cached_fragments_follow_each_line():
    # Route, upstream, server and Host are encoded once and reused: each line still
    # says its own.
    seen = []
    for route, upstream, server, host in [
        ("api", "backend", "10.0.0.1:80", b"a.example"),
        ("api", "backend", "10.0.0.2:80", b"b.example"),
        ("web", "backend", "10.0.0.1:80", b"a.example"),
        ("api", "other", "10.0.0.1:80", b""),
    ]:
        request, outcome = _exchange(b"/", "", [])
        request.host = host
        outcome.route, outcome.upstream, outcome.server = route, upstream, server
        line = json.loads(_json_line(request, outcome, "203.0.113.9", 0.5))
        seen.append((line["route"], line["upstream"], line["server"], line["host"]))
    assert seen == [
        ("api", "backend", "10.0.0.1:80", "a.example"),
        ("api", "backend", "10.0.0.2:80", "b.example"),
        ("web", "backend", "10.0.0.1:80", "a.example"),
        ("api", "other", "10.0.0.1:80", ""),
    ]


def test_a_routed_exchange_and_a_refusal_give_their_own_fields():
    """What the pipeline passes (an ``Exchange``) and what the daemon passes for a request
    it refused before routing (a ``Refusal``) are both an exchange's fields."""
    request, _ = _exchange(b"/v1/items", "", [])
    ex = Exchange(SimpleNamespace(), request, runtime=SimpleNamespace(clock=lambda: 0.0))  # type: ignore[arg-type]
    ex.route, ex.upstream, ex.server, ex.status = "api", "backend", "10.0.0.1:80", 200
    routed = json.loads(_json_line(request, ex, "203.0.113.9", 0.5))
    assert (routed["route"], routed["status"], routed["tries"], routed["cache"]) == (
        "api",
        200,
        0,
        "",
    )
    refused = json.loads(_json_line(request, Refusal(431, "head too large", 9), "::1", 0.0))
    assert (refused["status"], refused["error"], refused["bytes_out"]) == (431, "head too large", 9)
    assert (refused["route"], refused["upstream"], refused["server"]) == ("", "", "")
    assert "attempts" not in refused


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        "",
        'quote " inside',
        "back\\slash",
        "tab\tand\x01control",
        "del\x7f",
        "latin \xe9 and \xff",
        "~ and space ",
    ],
)
def test_strings_are_written_as_the_json_encoder_writes_them(text):
    """Strings with nothing to escape are quoted as they are; the others go through the
    encoder: either way the bytes are the encoder's."""
    request, outcome = _exchange(text.encode("latin-1"), text, [])
    request.request_id = text.encode("latin-1") or b"x"
    line = _json_line(request, outcome, text, 0.5)
    escaped = _escape(text)
    assert f',"client_ip":{escaped},' in line
    assert f',"path":{escaped},' in line
    assert f',"error":{escaped if text else chr(34) * 2},' in line
    if text:
        assert f',"request_id":{escaped},' in line
    json.loads(line)
