"""`sluicegate backend`: a small demo upstream for the demo, the compose stack and tests.

Every response carries ``X-Backend: <name>`` so a client (or a test) can tell which
server a proxied request reached. Endpoints:

=====================  ===========================================================
``/``                  ``<name>\\n`` as text/plain
``/health``            200 ``ok``; after ``POST /health/fail`` 503 ``failing`` until
                       ``POST /health/ok`` (lets health-check demos fail a server)
``/delay/{ms}``        answers after ``ms`` milliseconds (capped at 10 minutes)
``/status/{code}``     answers with that status (100-599 accepted, 1xx mapped to 400)
``/bytes/{n}``         ``n`` bytes with Content-Length, streamed in 64 KiB chunks
``/stream/{n}``        ``n`` bytes, chunked transfer encoding, no Content-Length
``/echo``              JSON: method, path (with query), headers (list of [name, value]
                       pairs, repeats kept, in arrival order), body (text), body_length
``/ws``                websocket echo (text and binary)
``/count``             JSON ``{"name": ..., "requests": N}``: requests served since start
``/cacheable/{s}``     a JSON catalogue page a cache may keep ``s`` seconds
                       (``Cache-Control: public, max-age=s``, an ``ETag``, ``Cache-Tag:
                       demo cacheable-{s}``); it names the backend and when it was made,
                       so a cached copy shows, and it is large enough to compress
=====================  ===========================================================

``/count`` and ``/health*`` are not counted, so active health checks and the counting
itself never disturb the hit counts tests assert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import signal
import time
from dataclasses import dataclass

from aiohttp import web

CHUNK_SIZE = 64 * 1024
_CHUNK = b"x" * CHUNK_SIZE
MAX_DELAY_MS = 600_000
MAX_CACHEABLE_SECONDS = 86_400
# Requests to these paths are not counted by /count.
_UNCOUNTED = ("/count", "/health")


@dataclass
class BackendState:
    """Mutable state of one backend app; tests read ``hits`` and flip ``healthy``."""

    name: str
    hits: int = 0
    healthy: bool = True


STATE: web.AppKey[BackendState] = web.AppKey("sluicegate_backend_state", BackendState)


def _state(request: web.Request) -> BackendState:
    return request.app[STATE]


@web.middleware
async def _count_hits(request: web.Request, handler):
    path = request.path
    if not any(path == p or path.startswith(p + "/") for p in _UNCOUNTED):
        _state(request).hits += 1
    return await handler(request)


async def _tag_response(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare also covers streamed, websocket and error responses.
    response.headers["X-Backend"] = _state(request).name


async def _index(request: web.Request) -> web.Response:
    return web.Response(text=_state(request).name + "\n")


async def _health(request: web.Request) -> web.Response:
    if _state(request).healthy:
        return web.Response(text="ok")
    return web.Response(status=503, text="failing")


async def _health_fail(request: web.Request) -> web.Response:
    _state(request).healthy = False
    return web.Response(text="failing")


async def _health_ok(request: web.Request) -> web.Response:
    _state(request).healthy = True
    return web.Response(text="ok")


def _int_param(request: web.Request, key: str) -> int:
    try:
        return int(request.match_info[key])
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be an integer\n") from None


async def _delay(request: web.Request) -> web.Response:
    ms = _int_param(request, "ms")
    if ms < 0 or ms > MAX_DELAY_MS:
        raise web.HTTPBadRequest(text=f"ms must be between 0 and {MAX_DELAY_MS}\n")
    await asyncio.sleep(ms / 1000)
    return web.Response(text=f"{_state(request).name} delayed {ms}ms\n")


async def _status(request: web.Request) -> web.Response:
    code = _int_param(request, "code")
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="code must be between 200 and 599\n")
    if code in (204, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"{_state(request).name} status {code}\n")


async def _write_bytes(response: web.StreamResponse, n: int) -> None:
    remaining = n
    while remaining > 0:
        size = min(remaining, CHUNK_SIZE)
        await response.write(_CHUNK if size == CHUNK_SIZE else _CHUNK[:size])
        remaining -= size


async def _bytes(request: web.Request) -> web.StreamResponse:
    n = _int_param(request, "n")
    if n < 0:
        raise web.HTTPBadRequest(text="n must be >= 0\n")
    if n <= CHUNK_SIZE:
        return web.Response(body=_CHUNK[:n], content_type="application/octet-stream")
    response = web.StreamResponse()
    response.content_type = "application/octet-stream"
    response.content_length = n
    await response.prepare(request)
    await _write_bytes(response, n)
    await response.write_eof()
    return response


async def _stream(request: web.Request) -> web.StreamResponse:
    n = _int_param(request, "n")
    if n < 0:
        raise web.HTTPBadRequest(text="n must be >= 0\n")
    response = web.StreamResponse()
    response.content_type = "application/octet-stream"
    response.enable_chunked_encoding()
    await response.prepare(request)
    await _write_bytes(response, n)
    await response.write_eof()
    return response


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    headers = [
        [name.decode("latin-1"), value.decode("latin-1")] for name, value in request.raw_headers
    ]
    return web.json_response(
        {
            "backend": _state(request).name,
            "method": request.method,
            "path": request.raw_path,
            "headers": headers,
            "body": body.decode("utf-8", errors="replace"),
            "body_length": len(body),
        }
    )


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == web.WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == web.WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def _count(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response({"name": state.name, "requests": state.hits})


async def _cacheable(request: web.Request) -> web.Response:
    seconds = _int_param(request, "seconds")
    if not 0 <= seconds <= MAX_CACHEABLE_SECONDS:
        raise web.HTTPBadRequest(text=f"seconds must be between 0 and {MAX_CACHEABLE_SECONDS}\n")
    page = {
        "backend": _state(request).name,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "max_age": seconds,
        "items": [{"id": n, "name": f"item {n}", "price_cents": 100 + 7 * n} for n in range(40)],
    }
    body = json.dumps(page, indent=1).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
    headers = {
        "Cache-Control": f"public, max-age={seconds}",
        "ETag": etag,
        "Cache-Tag": f"demo cacheable-{seconds}",
    }
    return web.Response(body=body, content_type="application/json", headers=headers)


def build_backend_app(name: str) -> web.Application:
    """The demo backend as an aiohttp application; ``app[STATE]`` holds its state."""
    app = web.Application(middlewares=[_count_hits], client_max_size=1024**3)
    app[STATE] = BackendState(name=name)
    app.on_response_prepare.append(_tag_response)
    app.router.add_route("*", "/", _index)
    app.router.add_get("/health", _health)
    app.router.add_post("/health/fail", _health_fail)
    app.router.add_post("/health/ok", _health_ok)
    app.router.add_route("*", "/delay/{ms}", _delay)
    app.router.add_route("*", "/status/{code}", _status)
    app.router.add_get("/bytes/{n}", _bytes)
    app.router.add_get("/stream/{n}", _stream)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_get("/ws", _ws)
    app.router.add_get("/count", _count)
    app.router.add_get("/cacheable/{seconds}", _cacheable)
    return app


def _startup_error(message: str) -> Exception | None:
    try:
        from proxy.errors import StartupError
    except ImportError:
        return None
    return StartupError(message)


async def _serve(host: str, port: int, name: str) -> None:
    runner = web.AppRunner(build_backend_app(name), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        print(f"backend {name} listening on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run_backend(host: str, port: int, name: str | None) -> int:
    """Serve the demo backend until SIGINT/SIGTERM; returns the exit code.

    A port already in use raises ``proxy.errors.StartupError`` (when that module exists),
    otherwise prints one line and returns 1.
    """
    name = name or f"backend-{port}"
    try:
        asyncio.run(_serve(host, port, name))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            message = f"backend: cannot listen on {host}:{port}: address already in use"
        else:
            message = f"backend: cannot listen on {host}:{port}: {exc.strerror or exc}"
        error = _startup_error(message)
        if error is not None:
            raise error from None
        print(message)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
