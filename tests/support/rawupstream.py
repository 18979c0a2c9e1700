"""A scriptable upstream on plain sockets, served from a thread.

For what the aiohttp demo backend cannot do: send hop-by-hop or malformed response heads,
delimit a body by closing, count TCP connections, or pour bytes as fast as loopback goes.
Because it runs in its own thread, tests may use blocking clients against the proxy.

``RawUpstream(respond)``: ``respond(request, sock)`` is called per request with the parsed
``RawRequest`` (head fields and the whole body, de-chunked) and writes the answer on
``sock`` itself; it returns False to close the connection afterwards. ``discard_body=True``
reads request bodies without keeping them (uploads); ``request.body_length`` still counts.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any


class _RawMessage:
    """A head as it came on the wire: its first line, and its fields in order."""

    def __init__(self, head: bytes) -> None:
        self.head = head
        lines = head.split(b"\r\n")
        self.first_line = lines[0]
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


class RawRequest(_RawMessage):
    def __init__(self, head: bytes) -> None:
        super().__init__(head)
        self.method, self.target, self.version = self.first_line.split(b" ", 2)
        self.body = b""
        self.body_length = 0


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.buf += data
        return True

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            if len(self.buf) > 1 << 20 or not self.fill():
                return None
        out, _, self.buf = self.buf.partition(marker)
        return out

    def exactly(self, n: int, keep: bool) -> tuple[bytes, int]:
        parts, got = [], 0
        while got < n:
            if not self.buf and not self.fill():
                raise ConnectionError("short body")
            take = self.buf[: n - got]
            self.buf = self.buf[len(take) :]
            got += len(take)
            if keep:
                parts.append(take)
        return b"".join(parts), got


def read_request(reader: _Reader, *, discard_body: bool) -> RawRequest | None:
    head = reader.until(b"\r\n\r\n")
    if head is None:
        return None
    request = RawRequest(head)
    keep = not discard_body
    te = (request.header("transfer-encoding") or "").lower()
    if te == "chunked":
        parts = []
        while True:
            size_line = reader.until(b"\r\n")
            if size_line is None:
                raise ConnectionError("short chunked body")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while reader.until(b"\r\n"):  # trailers, then the empty line
                    pass
                break
            data, got = reader.exactly(size, keep)
            parts.append(data)
            request.body_length += got
            reader.exactly(2, False)
        request.body = b"".join(parts)
    elif request.header("content-length"):
        request.body, request.body_length = reader.exactly(
            int(request.header("content-length")), keep
        )
    return request


class RawUpstream:
    def __init__(
        self,
        respond: Callable[[RawRequest, socket.socket], bool | None],
        *,
        discard_body: bool = False,
        ssl_context: Any = None,
    ) -> None:
        self.respond = respond
        self.tls_errors: list[Exception] = []
        self.discard_body = discard_body
        self.connections = 0
        self.requests: list[RawRequest] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                if ssl_context is not None:
                    try:
                        sock = ssl_context.wrap_socket(sock, server_side=True)
                    except (OSError, ValueError) as error:  # the client refused our cert
                        upstream.tls_errors.append(error)
                        return
                with upstream.lock:
                    upstream.connections += 1
                reader = _Reader(sock)
                try:
                    while True:
                        request = read_request(reader, discard_body=upstream.discard_body)
                        if request is None:
                            return
                        with upstream.lock:
                            upstream.requests.append(request)
                        if upstream.respond(request, sock) is False:
                            return
                except OSError:
                    return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def https_url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}"

    def __enter__(self) -> RawUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def simple_response(
    body: bytes = b"ok", *, status: str = "200 OK", headers: bytes = b""
) -> Callable[[RawRequest, socket.socket], bool]:
    def respond(request: RawRequest, sock: socket.socket) -> bool:
        sock.sendall(
            b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%b\r\n%b"
            % (status.encode(), len(body), headers, body)
        )
        return True

    return respond


class RawResponse(_RawMessage):
    def __init__(self, head: bytes, body: bytes) -> None:
        super().__init__(head)
        self.status_line = self.first_line
        self.status = int(self.first_line.split(b" ")[1])
        self.body = body

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class RawClient:
    """A blocking socket client that reads responses by their framing (keep-alive aware)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = _Reader(self.sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self, *, head_request: bool = False) -> RawResponse:
        head = self.reader.until(b"\r\n\r\n")
        if head is None:
            raise ConnectionError(f"connection closed before a response head: {self.reader.buf!r}")
        response = RawResponse(head, b"")
        if head_request or response.status in (204, 304) or 100 <= response.status < 200:
            return response
        te = (response.header("transfer-encoding") or "").lower()
        if te == "chunked":
            parts = []
            while True:
                size_line = self.reader.until(b"\r\n")
                assert size_line is not None, "short chunked response"
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self.reader.until(b"\r\n"):
                        pass
                    break
                parts.append(self.reader.exactly(size, True)[0])
                assert self.reader.exactly(2, True)[0] == b"\r\n"
            response.body = b"".join(parts)
        elif response.header("content-length") is not None:
            response.body = self.reader.exactly(int(response.header("content-length")), True)[0]
        else:
            while self.reader.fill():
                pass
            response.body, self.reader.buf = self.reader.buf, b""
        return response

    def request(self, data: bytes, **kwargs: Any) -> RawResponse:
        self.send(data)
        return self.read_response(**kwargs)

    def is_closed(self, timeout: float = 2.0) -> bool:
        """True when the server closed (EOF or reset) within ``timeout`` and sent nothing more."""
        if self.reader.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, float]:
    """Everything until the peer closes (or resets); returns (bytes, seconds it took)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started
