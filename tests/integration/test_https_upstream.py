"""``https://`` upstreams: the proxy verifies the server certificate (chain and name).

The test CA comes from ``trustme``. The daemon trusts what OpenSSL's default verify paths
trust, so ``SSL_CERT_FILE`` in its environment points at the test CA bundle.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.daemon import http_request
from tests.support.rawupstream import RawRequest, RawUpstream


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_bundle(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


def describe(request: RawRequest, sock: socket.socket) -> bool:
    body = json.dumps(
        {
            "target": request.target.decode(),
            "host": request.header("Host"),
            "proto": request.header("X-Forwarded-Proto"),
            "length": request.body_length,
        }
    ).encode()
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    return True


def config(url: str, **upstream: Any) -> dict[str, Any]:
    return {
        "limits": {"max_body_bytes": "64MiB"},
        "upstreams": {"tls": {"servers": [{"url": url}], "retry": {"tries": 1}, **upstream}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "tls"}],
    }


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_verified_https_upstream(start_sluicegate, ca, ca_bundle, host):
    with RawUpstream(describe, ssl_context=server_context(ca, "localhost", "127.0.0.1")) as up:
        daemon = start_sluicegate(config(up.https_url(host)), env={"SSL_CERT_FILE": ca_bundle})
        for i in range(5):
            status, _, body = http_request(
                daemon.port, "GET", f"/p?i={i}", headers={"Host": "app.test"}
            )
            assert status == 200, body
            seen = json.loads(body)
            assert seen["target"] == f"/p?i={i}"
            assert seen["host"] == "app.test"  # the client's Host, not the upstream's name
            assert seen["proto"] == "http"  # the client side was plain HTTP
        # a body of several MiB through TLS, then the pooled connection was kept throughout
        status, _, body = http_request(daemon.port, "POST", "/up", body=b"z" * (5 << 20))
        assert status == 200 and json.loads(body)["length"] == 5 << 20
        assert up.connections == 1
        assert up.tls_errors == []


def test_untrusted_certificate_is_502(start_sluicegate, ca_bundle):
    stranger = trustme.CA()  # not in the daemon's trust store
    with RawUpstream(describe, ssl_context=server_context(stranger, "localhost")) as up:
        daemon = start_sluicegate(config(up.https_url()), env={"SSL_CERT_FILE": ca_bundle})
        status, headers, body = http_request(daemon.port, "GET", "/")
        assert status == 502, body
        payload = json.loads(body)
        assert payload["request_id"] == headers["x-request-id"]
        assert up.connections == 0  # no request ever reached the impostor


def test_certificate_for_another_name_is_502(start_sluicegate, ca, ca_bundle):
    with RawUpstream(describe, ssl_context=server_context(ca, "other.example")) as up:
        daemon = start_sluicegate(config(up.https_url()), env={"SSL_CERT_FILE": ca_bundle})
        status, _, body = http_request(daemon.port, "GET", "/")
        assert status == 502, body
        assert up.connections == 0


def test_without_the_ca_the_system_store_does_not_trust_it(start_sluicegate, ca):
    with RawUpstream(describe, ssl_context=server_context(ca, "localhost")) as up:
        daemon = start_sluicegate(config(up.https_url()))
        assert http_request(daemon.port, "GET", "/")[0] == 502


def test_plain_http_server_behind_https_url_is_502(start_sluicegate, ca_bundle):
    """A server that answers the TLS ClientHello in plain HTTP: a handshake error, 502."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            with sock:
                sock.recv(4096)
                sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        daemon = start_sluicegate(
            config(f"https://localhost:{port}"), env={"SSL_CERT_FILE": ca_bundle}
        )
        status, _, body = http_request(daemon.port, "GET", "/")
        assert status == 502, body
    finally:
        listener.close()


def test_tls_handshake_that_never_completes_is_a_connect_timeout(start_sluicegate, ca_bundle):
    """A peer that accepts TCP but never speaks TLS: the connect timeout covers the handshake."""
    with RawUpstream(describe) as up:  # waits for an HTTP head that never comes
        daemon = start_sluicegate(
            config(up.https_url(), timeouts={"connect": "300ms", "read": "5s"}),
            env={"SSL_CERT_FILE": ca_bundle},
        )
        started = time.monotonic()
        assert http_request(daemon.port, "GET", "/", timeout=15)[0] == 504
        assert time.monotonic() - started < 3
