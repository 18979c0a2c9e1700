"""The admin API: an aiohttp application on its own listener, apart from traffic.

Endpoints (SPEC "Admin API"):

    GET  /healthz                                   200 {"status": "ok"} while the process runs
    GET  /readyz                                    200 {"ready": true, "reasons": []}
                                                    503 {"ready": false, "reasons": [...]}
    GET  /metrics                                   Prometheus text exposition
    GET  /status                                    JSON status object
    GET  /                                          live status page (self-contained HTML)
    POST /reload                                    200 {"status": "reloaded", "message": ..}
                                                    400 {"error": ..} and nothing changes
    POST /upstreams/{name}/servers/{index}/drain     200 the server's status object
    POST /upstreams/{name}/servers/{index}/undrain   404 for an unknown upstream or index
    POST /cache/purge                               {"url"|"prefix"|"tag": ".."} -> 200
                                                    {"purged": N}; 400 on a bad body

The application knows nothing of the proxy's internals: it talks to a ``control`` object
(see ``AdminControl``), so it is tested with a small fake and the daemon supplies the
real one. When a token is configured every POST needs ``Authorization: Bearer <token>``;
GETs stay open because Prometheus and load-balancer probes scrape them. Every error is
JSON ``{"error": "..."}``, including aiohttp's own 404 and 405.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

from aiohttp import web

from proxy.observability import metrics

log = logging.getLogger(__name__)

STATUS_PAGE = "static/status.html"
DRAIN_ACTIONS = {"drain": True, "undrain": False}

_CONTROL_KEY = web.AppKey("control", object)
_TOKEN_KEY = web.AppKey("token", object)
_PAGE_KEY = web.AppKey("status_page", bytes)


class AdminControl(Protocol):
    """What the admin API needs from the running proxy.

    ``status``, ``readiness`` and ``set_draining`` may also be coroutines: a worker
    answers from its own state at once, a supervisor of several workers asks them first.
    """

    def status(self) -> dict[str, Any]: ...

    def readiness(self) -> tuple[bool, list[str]]: ...

    async def reload(self) -> tuple[bool, str]: ...

    def set_draining(self, upstream: str, index: int, draining: bool) -> dict | None: ...

    # Optional: ``render_metrics() -> (body, content type)``; defaults to metrics.render().
    # Optional: ``purge_cache(by, value) -> int | None`` (None: no cache configured).


def build_admin_app(control: AdminControl, *, token: str | None) -> web.Application:
    """The admin application. ``token``: required bearer token for POSTs (None: open)."""
    app = web.Application(middlewares=[_json_errors, _require_token_for_writes])
    app[_CONTROL_KEY] = control
    app[_TOKEN_KEY] = token or None
    app[_PAGE_KEY] = load_status_page()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/status", status)
    app.router.add_get("/", status_page)
    app.router.add_post("/reload", reload)
    app.router.add_post("/upstreams/{name}/servers/{index}/{action:drain|undrain}", drain)
    app.router.add_post("/cache/purge", purge_cache)
    return app


def load_status_page() -> bytes:
    """The live page, read once from the package data."""
    return resources.files("proxy.control").joinpath(STATUS_PAGE).read_bytes()


def json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTML error pages and unexpected exceptions into JSON errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return json_error(exc.status, exc.reason.lower(), **headers)
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return json_error(500, "internal error")


@web.middleware
async def _require_token_for_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[_TOKEN_KEY]
    if token is not None and request.method == "POST" and not _bearer_matches(request, token):
        return json_error(401, "unauthorized", **{"WWW-Authenticate": "Bearer"})
    return await handler(request)


def _bearer_matches(request: web.Request, token: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant-time comparison: response timing must not reveal a token prefix.
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def _control(request: web.Request) -> AdminControl:
    return request.app[_CONTROL_KEY]


async def _answer(value: Any) -> Any:
    """A worker answers at once; the workers' supervisor has to ask them first."""
    return await value if inspect.isawaitable(value) else value


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, reasons = await _answer(_control(request).readiness())
    return web.json_response(
        {"ready": bool(ready), "reasons": list(reasons)}, status=200 if ready else 503
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    render = getattr(_control(request), "render_metrics", metrics.render)
    # Multiprocess mode reads every worker's files: keep that disk work off the loop.
    body, content_type = await _answer(await asyncio.to_thread(render))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type  # keeps the exposition's version
    return response


async def status(request: web.Request) -> web.Response:
    return web.json_response(
        await _answer(_control(request).status()), headers={"Cache-Control": "no-store"}
    )


async def status_page(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[_PAGE_KEY],
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def reload(request: web.Request) -> web.Response:
    ok, message = await _control(request).reload()
    if not ok:
        return json_error(400, message)
    return web.json_response({"status": "reloaded", "message": message})


async def drain(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    raw_index = request.match_info["index"]
    draining = DRAIN_ACTIONS[request.match_info["action"]]
    index = _server_index(raw_index)
    server = None
    if index is not None:
        server = await _answer(_control(request).set_draining(name, index, draining))
    if server is None:
        return json_error(404, f"no server {raw_index} in upstream {name!r}")
    return web.json_response(server)


def _server_index(raw: str) -> int | None:
    """A 0-based index in config order; None for anything else ("x", "-1", "01x")."""
    if not raw.isascii() or not raw.isdigit():
        return None
    return int(raw)


PURGE_KINDS = ("url", "prefix", "tag")


async def purge_cache(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return json_error(400, "body must be JSON")
    if not isinstance(body, dict) or len(body) != 1:
        return json_error(400, 'body must have one of "url", "prefix" or "tag"')
    ((by, value),) = body.items()
    if by not in PURGE_KINDS or not isinstance(value, str) or not value:
        return json_error(400, 'body must have one of "url", "prefix" or "tag" (a string)')
    purge = getattr(_control(request), "purge_cache", None)
    purged = None if purge is None else await _answer(purge(by, value))
    if purged is None:
        return json_error(404, "no cache configured")
    return web.json_response({"purged": purged})
