"""TLS termination on listeners and WebSocket tunnelling, on the real daemon.

TLS: certificates come from ``trustme`` (a throwaway CA); the client trusts that CA only.
WebSockets: aiohttp's client against ``ws://<proxy>/ws`` in front of a demo backend running
as a subprocess (so the test's event loop serves nothing the proxy waits for), plus a raw
upstream that closes from its side.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from tests.integration.test_hostile_input import RawUpstream
from tests.support.daemon import REPO, free_port

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def proxy_config(upstream_port: int, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {
            "app": {"servers": [{"url": f"http://127.0.0.1:{upstream_port}"}], **upstream}
        },
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"}],
    }


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        with cert_path.open("ab") as out:
            out.write(extra.bytes())
    return str(cert_path), str(key_path)


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def tls_listen(port: int, tls_files: tuple[str, str]) -> dict[str, Any]:
    """A listen entry serving TLS on ``port`` with the test certificate."""
    cert, key = tls_files
    return {"address": f"127.0.0.1:{port}", "tls": {"cert": cert, "key": key}}


def https_get(port: int, path: str, context: ssl.SSLContext) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_tls_listener_answers_https_and_sets_forwarded_proto(
    start_sluicegate, spawn_backend, tls_files, client_context
):
    _, backend = spawn_backend("tls")
    tls_port, plain_port = free_port(), free_port()
    config = proxy_config(backend)
    config["listen"] = [tls_listen(tls_port, tls_files), {"address": f"127.0.0.1:{plain_port}"}]
    start_sluicegate(config)

    status, headers, body = https_get(tls_port, "/echo", client_context)
    assert status == 200
    assert headers["X-Backend"] == "tls"
    echoed = dict((name.lower(), value) for name, value in json.loads(body)["headers"])
    assert echoed["x-forwarded-proto"] == "https"
    # Keep-alive over TLS: several requests on one connection.
    conn = http.client.HTTPSConnection("127.0.0.1", tls_port, context=client_context, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"tls\n")
    finally:
        conn.close()
    # The plain listener next to it says http.
    plain = http.client.HTTPConnection("127.0.0.1", plain_port, timeout=10)
    plain.request("GET", "/echo")
    echoed = dict((n.lower(), v) for n, v in json.loads(plain.getresponse().read())["headers"])
    plain.close()
    assert echoed["x-forwarded-proto"] == "http"


def test_tls_listener_refuses_plain_http_and_untrusted_clients(
    start_sluicegate, spawn_backend, tls_files, client_context
):
    _, backend = spawn_backend("tls")
    port = free_port()
    config = proxy_config(backend)
    config["listen"] = [tls_listen(port, tls_files)]
    daemon = start_sluicegate(config)
    # Plain HTTP on the TLS port: no HTTP answer, the connection ends.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        assert not data.startswith(b"HTTP/1.1 200")
    # A client that does not trust the CA fails the handshake.
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(port, "/", ssl.create_default_context())
    # The daemon is unharmed by either.
    assert https_get(port, "/", client_context)[0] == 200
    assert daemon.proc.poll() is None


def test_check_fails_with_a_located_message_when_the_cert_is_missing(tmp_path, tls_files):
    _, key = tls_files
    config = proxy_config(9)
    config["listen"] = [
        {"address": "127.0.0.1:8443", "tls": {"cert": str(tmp_path / "missing.crt"), "key": key}}
    ]
    path = tmp_path / "sluicegate.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "listen[0].tls.cert" in output
    assert "missing.crt" in output
    assert "Traceback" not in output


# -- WebSockets --------------------------------------------------------------------------------


@pytest.fixture
def ws_proxy(start_sluicegate, spawn_backend):
    _, backend = spawn_backend("ws")
    return start_sluicegate(proxy_config(backend, timeouts={"read": "1s"}))


async def test_websocket_text_and_binary_frames_both_ways(ws_proxy):
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_proxy.url("/ws").replace("http", "ws")) as ws,
    ):
        assert ws._response.headers["X-Backend"] == "ws"
        for i in range(5):
            await ws.send_str(f"hello {i}")
            assert (await ws.receive(timeout=5)).data == f"hello {i}"
            payload = bytes(range(256)) * (i + 1)
            await ws.send_bytes(payload)
            message = await ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.BINARY
            assert message.data == payload
        big = os.urandom(300_000)  # several TCP segments, in both directions
        await ws.send_bytes(big)
        assert (await ws.receive(timeout=10)).data == big


async def test_websocket_close_from_the_client(ws_proxy):
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_proxy.url("/ws").replace("http", "ws"))
        await ws.send_str("bye")
        assert (await ws.receive(timeout=5)).data == "bye"
        started = time.monotonic()
        await ws.close(code=1000, message=b"done")
        assert ws.closed
        assert ws.close_code == 1000  # the server's close frame came back through the proxy
        assert time.monotonic() - started < 2
    # The proxy still serves ordinary requests (and new websockets) afterwards.
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_proxy.url("/ws").replace("http", "ws")) as ws,
    ):
        await ws.send_str("again")
        assert (await ws.receive(timeout=5)).data == "again"


class ClosingWebSocketUpstream(RawUpstream):
    """Accepts the upgrade, sends one text frame, then closes from its side: with a close
    frame (``clean``) or by just dropping the TCP connection."""

    def __init__(self, clean: bool) -> None:
        super().__init__()
        self.clean = clean

    async def _serve(self, reader, writer) -> None:  # type: ignore[override]
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append((self.connections, head))
            key = b""
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            writer.write(b"\x81\x05hello")  # FIN + text, unmasked (server to client)
            await writer.drain()
            await asyncio.sleep(0.2)
            if self.clean:
                writer.write(b"\x88\x02\x03\xe9")  # close, code 1001 (going away)
                await writer.drain()
                await asyncio.sleep(0.2)
        except Exception:
            return
        finally:
            writer.close()


@pytest.mark.parametrize("clean", [True, False], ids=["close_frame", "tcp_drop"])
async def test_websocket_close_from_the_server(start_sluicegate, clean):
    upstream = ClosingWebSocketUpstream(clean).start()
    try:
        proxy = start_sluicegate(proxy_config(upstream.port, timeouts={"read": "10s"}))
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(proxy.url("/ws").replace("http", "ws"))
            first = await ws.receive(timeout=5)
            assert (first.type, first.data) == (aiohttp.WSMsgType.TEXT, "hello")
            started = time.monotonic()
            ending = await ws.receive(timeout=5)
            assert time.monotonic() - started < 3, "the server's close must reach the client"
            if clean:
                assert ending.type == aiohttp.WSMsgType.CLOSE
                assert ending.data == 1001
            else:
                assert ending.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            await ws.close()
    finally:
        upstream.stop()


async def test_idle_websocket_is_closed_after_the_read_timeout(ws_proxy):
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_proxy.url("/ws").replace("http", "ws"), autoping=False)
        await ws.send_str("ping")
        assert (await ws.receive(timeout=5)).data == "ping"
        started = time.monotonic()
        message = await ws.receive(timeout=5)  # nothing flows: the proxy ends it (read 1s)
        waited = time.monotonic() - started
        assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        assert 0.9 <= waited < 2.5, waited
        await ws.close()


async def test_busy_websocket_outlives_the_read_timeout(ws_proxy):
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_proxy.url("/ws").replace("http", "ws")) as ws,
    ):
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 2.5:  # 2.5x the read timeout, traffic every 0.3s
            await ws.send_str(f"m{i}")
            assert (await ws.receive(timeout=5)).data == f"m{i}"
            await asyncio.sleep(0.3)
            i += 1
        assert not ws.closed


async def test_websocket_over_tls(start_sluicegate, spawn_backend, tls_files, client_context):
    _, backend = spawn_backend("wss")
    port = free_port()
    config = proxy_config(backend)
    config["listen"] = [tls_listen(port, tls_files)]
    start_sluicegate(config)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"wss://127.0.0.1:{port}/ws", ssl=client_context) as ws,
    ):
        await ws.send_str("secure")
        assert (await ws.receive(timeout=5)).data == "secure"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=5)).data == b"\x00\x01"


def test_stalled_tls_handshake_is_bounded_by_client_header_timeout(
    start_sluicegate, spawn_backend, tls_files, client_context
):
    _, backend = spawn_backend("tls")
    port = free_port()
    config = proxy_config(backend)
    config["listen"] = [tls_listen(port, tls_files)]
    config["limits"] = {"client_header_timeout": "500ms"}
    start_sluicegate(config)
    for partial in (b"", b"\x16\x03\x01\x00"):  # silent, then half a ClientHello record
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(partial)
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            assert data == b""
            assert time.monotonic() - started < 2.5, "the handshake must time out"
    assert https_get(port, "/", client_context)[0] == 200
