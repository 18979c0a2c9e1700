"""The demo backend (`sluicegate backend`): every endpoint, in-process and as a process."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from proxy.demo.backend import run_backend
from tests.support import backends as _backends
from tests.support.backends import (
    REPO_ROOT,
    free_port,
    spawn_backend_process,
    stop_process,
    wait_http_ok,
)

# The fixture, for when the root conftest does not register tests.support.backends.
start_backend = _backends.start_backend


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def test_cacheable_is_a_page_a_shared_cache_may_keep(start_backend, session):
    backend = await start_backend("alpha")
    async with session.get(backend.url + "/cacheable/30") as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "public, max-age=30"
        assert r.headers["Cache-Tag"] == "demo cacheable-30"
        assert r.headers["ETag"].startswith('"')
        assert r.content_type == "application/json"
        page = await r.json()
        assert page["backend"] == "alpha" and page["max_age"] == 30
        assert r.content_length >= 1024  # over compress.min_size: the demo compresses it
    for bad in ("-1", "86401", "x"):
        async with session.get(backend.url + "/cacheable/" + bad) as r:
            assert r.status in (400, 404)


async def test_index_names_itself(start_backend, session):
    backend = await start_backend("alpha")
    async with session.get(backend.url + "/") as r:
        assert r.status == 200
        assert await r.text() == "alpha\n"
        assert r.headers["X-Backend"] == "alpha"
        assert r.content_type == "text/plain"


async def test_default_name_is_backend_port(start_backend, session):
    backend = await start_backend()
    assert backend.name == f"backend-{backend.port}"
    async with session.get(backend.url) as r:
        assert await r.text() == f"backend-{backend.port}\n"


async def test_every_response_carries_x_backend(start_backend, session):
    backend = await start_backend("b")
    for path in ("/nope", "/status/500", "/delay/abc", "/bytes/200000", "/stream/10"):
        async with session.get(backend.url + path) as r:
            await r.read()
            assert r.headers["X-Backend"] == "b", path
    async with session.get(backend.url + "/nope") as r:
        assert r.status == 404


async def test_health_toggle(start_backend, session):
    backend = await start_backend("h")
    async with session.get(backend.url + "/health") as r:
        assert (r.status, await r.text()) == (200, "ok")
    async with session.post(backend.url + "/health/fail") as r:
        assert r.status == 200
    async with session.get(backend.url + "/health") as r:
        assert r.status == 503
    assert backend.healthy is False
    async with session.post(backend.url + "/health/ok") as r:
        assert r.status == 200
    async with session.get(backend.url + "/health") as r:
        assert (r.status, await r.text()) == (200, "ok")
    backend.healthy = False
    async with session.get(backend.url + "/health") as r:
        assert r.status == 503


async def test_delay(start_backend, session):
    backend = await start_backend("d")
    started = time.monotonic()
    async with session.get(backend.url + "/delay/150") as r:
        assert r.status == 200
        assert "150ms" in await r.text()
    assert time.monotonic() - started >= 0.14
    for bad in ("/delay/abc", "/delay/-1", "/delay/99999999"):
        async with session.get(backend.url + bad) as r:
            assert r.status == 400, bad


async def test_delay_is_cut_off_by_a_client_timeout(start_backend, session):
    backend = await start_backend("d")
    with pytest.raises(asyncio.TimeoutError):
        async with session.get(
            backend.url + "/delay/5000", timeout=aiohttp.ClientTimeout(total=0.2)
        ) as r:
            await r.read()


@pytest.mark.parametrize("code", [200, 201, 404, 418, 500, 502, 503, 504])
async def test_status(start_backend, session, code):
    backend = await start_backend("s")
    async with session.post(backend.url + f"/status/{code}", data=b"ignored") as r:
        assert r.status == code
        assert await r.text() == f"s status {code}\n"


async def test_status_without_body_and_invalid(start_backend, session):
    backend = await start_backend("s")
    for code in (204, 304):
        async with session.get(backend.url + f"/status/{code}") as r:
            assert r.status == code
            assert await r.read() == b""
    for bad in ("/status/99", "/status/600", "/status/x", "/status/101"):
        async with session.get(backend.url + bad) as r:
            assert r.status == 400, bad


@pytest.mark.parametrize("n", [0, 1, 1000, 65536, 65537, 3 * 1024 * 1024 + 7])
async def test_bytes_sets_content_length(start_backend, session, n):
    backend = await start_backend("b")
    async with session.get(backend.url + f"/bytes/{n}") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(n)
        assert "Transfer-Encoding" not in r.headers
        body = await r.read()
    assert len(body) == n
    assert body == b"x" * n


async def test_bytes_rejects_bad_sizes(start_backend, session):
    backend = await start_backend("b")
    for bad in ("/bytes/-5", "/bytes/lots"):
        async with session.get(backend.url + bad) as r:
            assert r.status == 400


@pytest.mark.parametrize("n", [0, 10, 200_000])
async def test_stream_is_chunked(start_backend, session, n):
    backend = await start_backend("c")
    async with session.get(backend.url + f"/stream/{n}") as r:
        assert r.status == 200
        assert "Content-Length" not in r.headers
        assert r.headers["Transfer-Encoding"] == "chunked"
        body = await r.read()
    assert len(body) == n


async def test_echo_reports_method_path_headers_body(start_backend, session):
    backend = await start_backend("e")
    headers = [("X-Dup", "one"), ("X-Dup", "two"), ("X-Single", "v")]
    async with session.post(
        backend.url + "/echo?a=1&b=2", data=b'{"hello": "w\xc3\xb6rld"}', headers=headers
    ) as r:
        assert r.status == 200
        assert r.headers["X-Backend"] == "e"
        echoed = await r.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo?a=1&b=2"
    assert echoed["body"] == '{"hello": "wörld"}'
    assert echoed["body_length"] == len(b'{"hello": "w\xc3\xb6rld"}')
    pairs = [tuple(p) for p in echoed["headers"]]
    assert [v for k, v in pairs if k == "X-Dup"] == ["one", "two"]
    assert ("X-Single", "v") in pairs
    assert any(k.lower() == "host" for k, _ in pairs)


async def test_echo_other_methods_and_binary_body(start_backend, session):
    backend = await start_backend("e")
    async with session.put(backend.url + "/echo", data=b"\xff\x00abc") as r:
        echoed = await r.json()
    assert echoed["method"] == "PUT"
    assert echoed["body_length"] == 5
    async with session.get(backend.url + "/echo") as r:
        echoed = await r.json()
    assert (echoed["method"], echoed["body"], echoed["body_length"]) == ("GET", "", 0)


async def test_websocket_echo_text_and_binary(start_backend, session):
    backend = await start_backend("w")
    async with session.ws_connect(backend.url + "/ws") as ws:
        await ws.send_str("hello")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "hello")
        await ws.send_bytes(b"\x00\x01\x02")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"\x00\x01\x02")
    async with session.get(
        backend.url + "/ws",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as r:
        assert r.status == 101
        assert r.headers["X-Backend"] == "w"


async def test_count_counts_requests_but_not_health_or_count(start_backend, session):
    backend = await start_backend("n")
    async with session.get(backend.url + "/count") as r:
        assert await r.json() == {"name": "n", "requests": 0}
    for path in ("/", "/echo", "/status/503", "/bytes/3", "/health", "/count"):
        async with session.get(backend.url + path) as r:
            await r.read()
    async with session.post(backend.url + "/health/fail") as r:
        await r.read()
    async with session.get(backend.url + "/count") as r:
        assert await r.json() == {"name": "n", "requests": 4}
    assert backend.hits == 4
    backend.reset_hits()
    assert backend.hits == 0


async def test_backends_are_independent_and_stoppable(start_backend, session):
    a = await start_backend("a")
    b = await start_backend("b")
    assert a.port != b.port
    async with session.get(a.url) as r:
        await r.read()
    assert (a.hits, b.hits) == (1, 0)
    await b.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(b.url) as r:
            await r.read()


# --- run_backend, the function the CLI calls ---------------------------------------


def _run_backend_process(port: int, name: str | None = None) -> subprocess.Popen:
    code = (
        "import sys; from proxy.demo.backend import run_backend; "
        f"sys.exit(run_backend('127.0.0.1', {port}, {name!r}))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_backend_stops_cleanly_on_signal(sig):
    port = free_port()
    proc = _run_backend_process(port)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", proc=proc)
        with urlopen(f"http://127.0.0.1:{port}/") as response:
            assert response.read() == f"backend-{port}\n".encode()
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        stderr = proc.stderr.read().decode()
        assert "Traceback" not in stderr
        assert f"http://127.0.0.1:{port}" in proc.stdout.read().decode()
    finally:
        stop_process(proc)


def test_run_backend_port_in_use():
    from proxy.errors import StartupError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StartupError, match="in use"):
            run_backend("127.0.0.1", port, "x")


def urlopen(url: str):
    import urllib.request

    return urllib.request.urlopen(url, timeout=5)


# --- the helpers daemon tests use ----------------------------------------------------


def test_spawn_backend_process_runs_the_cli():
    proc, port = spawn_backend_process("spawned")
    try:
        with urlopen(f"http://127.0.0.1:{port}/count") as response:
            assert json.load(response) == {"name": "spawned", "requests": 0}
        with urlopen(f"http://127.0.0.1:{port}/") as response:
            assert response.headers["X-Backend"] == "spawned"
    finally:
        assert stop_process(proc) == 0
