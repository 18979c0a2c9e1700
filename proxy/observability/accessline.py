"""The access log's line as the request path formats it: the time, JSON values, and the
whole JSON line of a served request in one pass.

``json_line`` runs once for every request, so it reads the request and its outcome
directly and builds the line from literal pieces and C-formatted numbers; it says exactly
what accesslog's generic ``format_json`` says of the same record (same fields, same order,
same escaping: tests/unit/test_access_line.py). Strings are escaped by the C encoder
``json.dumps`` itself uses (every non-ASCII or control character as ``\\uXXXX``), and the
strings that repeat line after line (methods, route, upstream and server names, Host
values) are encoded once and looked up after.

Compiled (proxy/compiled.py): no bytecode runs for a line, and the numbers and the
time stamp's caches are C values.
"""

from __future__ import annotations

import json
import time
from typing import Any

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

if cython.compiled:  # C's rint rounds half to even in the default rounding mode
    from cython.cimports.libc.math import rint as _round_half_even
    from cython.cimports.proxy.pipeline.state import ExchangeState
else:
    from proxy.pipeline.state import ExchangeState

    _round_half_even = round

_escape = json.encoder.encode_basestring_ascii  # C; quotes and escapes one string
_wall_clock = time.time  # a module global: no attribute lookup on ``time`` a line
_EMPTY = '""'  # an empty string field

# format_time's caches: tens of lines share each millisecond under load, and strftime runs
# once a second, not once a line.
_cached_second = cython.declare(cython.longlong, -1)
_cached_second_text = cython.declare(str, "")
_cached_milli = cython.declare(cython.longlong, -1)
_cached_milli_text = cython.declare(str, "")
_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))  # a table, not a format a line


def format_time(epoch_seconds: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
    return _format_time(epoch_seconds)


@cython.cfunc
def _format_time(epoch_seconds: cython.double) -> str:
    global _cached_second, _cached_second_text, _cached_milli, _cached_milli_text
    # Round once on the whole millisecond count (half to even, as Python's round): 0.123
    # is 0.12299.. as a float.
    count: cython.longlong = cython.cast(cython.longlong, _round_half_even(epoch_seconds * 1000))
    if count == _cached_milli:
        return _cached_milli_text
    whole: cython.longlong = count // 1000
    if whole != _cached_second:
        _cached_second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _cached_second = whole
    text: str = _cached_second_text + _MILLIS[count - whole * 1000]
    _cached_milli = count
    _cached_milli_text = text
    return text


def json_value(value: Any) -> str:
    """One value as JSON, as ``json.dumps`` with compact separators writes it."""
    kind = type(value)
    if kind is str:
        return _escape(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int or kind is float:
        return repr(value)
    if value is None:
        return "null"
    if kind is list:
        return "[" + ",".join([json_value(item) for item in value]) + "]"
    if kind is dict:
        return (
            "{" + ",".join([f"{_escape(str(k))}:{json_value(v)}" for k, v in value.items()]) + "}"
        )
    # default=str: a stray exception object or enum in a field must not lose the line.
    return json.dumps(value, separators=(",", ":"), default=str)


# JSON forms of the strings that repeat line after line, each encoded the first time it is
# asked for. Plain dicts read in C: a dict subclass with __missing__ costs ~500
# instructions a lookup. Methods and route, upstream and server names come from the config
# or llhttp's method table (bounded sets); Host values from clients, so they are bounded
# here.
_json_names = cython.declare(dict, {})  # str or bytes -> its JSON string
_json_places = cython.declare(dict, {})  # (route, upstream, server) -> '"route":..,' x 3
_json_hosts = cython.declare(dict, {})  # Host value -> its JSON string


@cython.cfunc
def _json_name(name: Any) -> str:
    encoded = _json_names.get(name)
    if encoded is None:
        if len(_json_names) >= 4096:  # a bound, should a config ever have that many names
            _json_names.clear()
        text = name.decode("latin-1") if isinstance(name, bytes) else name
        encoded = _json_names[name] = _escape(text)
    return encoded


@cython.cfunc
def _json_place(route: Any, upstream: Any, server: Any) -> str:
    """``"route":..,"upstream":..,"server":..,``: one lookup a line instead of three."""
    place = (route, upstream, server)
    text = _json_places.get(place)
    if text is None:
        if len(_json_places) >= 4096:
            _json_places.clear()
        text = _json_places[place] = (
            f'"route":{_json_name(route)},"upstream":{_json_name(upstream)},'
            f'"server":{_json_name(server)},'
        )
    return text


@cython.cfunc
def _json_host(host: bytes) -> str:
    encoded = _json_hosts.get(host)
    if encoded is None:
        if len(_json_hosts) >= 1024:
            _json_hosts.clear()
        encoded = _json_hosts[host] = _escape(host.decode("latin-1"))
    return encoded


def json_line(request: Any, outcome: ExchangeState, client_ip: str, duration: float) -> str:
    """The access log's JSON line of a served request (see the module's docstring): the
    outcome is an exchange's (or a refusal's) fields, C fields here (state.pxd)."""
    body = request.body
    request_id = request.request_id
    host = request.host
    bytes_in: cython.longlong = body.received if body is not None else 0
    status: cython.longlong = outcome.status
    bytes_out: cython.longlong = outcome.bytes_out
    tries: cython.longlong = outcome.tries
    duration_ms: cython.double = duration * 1000
    upstream_ms: cython.double = outcome.upstream_seconds * 1000
    return (
        f'{{"time":"{_format_time(_wall_clock())}"'
        f',"request_id":{_json_bytes(request_id) if request_id else _EMPTY}'
        f',"client_ip":{_json_str(client_ip)}'
        f',"method":{_json_name(request.method)}'
        f',"host":{_json_host(host) if host else _EMPTY}'
        f',"path":{_json_bytes(request.path)}'
        f",{_json_place(outcome.route, outcome.upstream, outcome.server)}"
        f'"status":{status},"bytes_in":{bytes_in},"bytes_out":{bytes_out}'
        f',"duration_ms":{duration_ms:.3f},"upstream_duration_ms":{upstream_ms:.3f}'
        f',"tries":{tries},"rate_limited":{"true" if outcome.rate_limited else "false"}'
        f',"error":{_json_str(outcome.error) if outcome.error else _EMPTY}'
        f',"cache":{_json_name(outcome.cache_status)}'
        f"{_attempts_field(outcome.attempts)}}}"
    )


@cython.cfunc
def _json_str(text: str) -> str:
    """``text`` as a JSON string: quoted as it is when no character needs escaping (the
    common case, and what the encoder would return), else by the encoder."""
    char: cython.Py_UCS4
    code: cython.long
    for char in text:
        code = ord(char)
        if code < 0x20 or code > 0x7E or code == 0x22 or code == 0x5C:  # control, ", backslash
            return _escape(text)
    return '"' + text + '"'


@cython.cfunc
def _json_bytes(data: bytes) -> str:
    """Latin-1 ``data`` as a JSON string, as ``_escape(data.decode("latin-1"))`` says it."""
    byte: cython.uchar
    for byte in data:
        if byte < 0x20 or byte > 0x7E or byte == 0x22 or byte == 0x5C:  # as for a str
            return _escape(data.decode("latin-1"))
    return '"' + data.decode("ascii") + '"'


@cython.cfunc
def _attempts_field(attempts: Any) -> str:
    """``,"attempts":[..]``, or nothing: each as forwarding builds it (server, outcome, ms,
    and status when a response failed mid-body); anything else as the generic encoder."""
    if not attempts:
        return ""
    parts = []
    for attempt in attempts:
        if len(attempt) > 4:
            return ',"attempts":' + json_value(attempts)
        outcome = attempt["outcome"]
        outcome_json = str(outcome) if type(outcome) is int else _escape(str(outcome))
        status = attempt.get("status")
        status_json = "" if status is None else f',"status":{status:d}'
        parts.append(
            f'{{"server":{_json_name(attempt["server"])},"outcome":{outcome_json}'
            f',"ms":{attempt["ms"]!r}{status_json}}}'
        )
    return f',"attempts":[{",".join(parts)}]'
