"""The fault matrix: scenario -> client status, attempts per backend, time taken.

One daemon serves every scenario: scenario ``i`` has its own upstream ``u<i>`` (fresh
round-robin state, its own fault servers) behind route ``/s<i>/``. Each scenario sends one
request and checks the client's status, each backend's request count (and the proxy's own
view of the attempts, from the access log) and a time bound. The table is printed at the
end of the run (``pytest_terminal_summary`` in ``tests/support/faulty.py``), ready to paste:

    pytest tests/integration/test_fault_matrix.py
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.daemon import start_daemon, wait_for
from tests.support.faulty import (
    FAULT_MATRIX,
    FaultServer,
    lb_config,
    refused_port,
)
from tests.support.rawupstream import read_until_closed

REFUSED = "refused"


@dataclass
class Scenario:
    name: str
    backends: list[tuple[str, dict[str, Any]]]  # (mode or REFUSED, FaultServer options)
    status: int | str  # what the client sees; "cut" = head sent, connection cut mid-body
    attempts: list[int]  # per backend, in config order
    seconds: float  # upper bound
    retry: dict[str, Any] = field(default_factory=dict)
    read: str = "300ms"
    method: str = "GET"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


OK: tuple[str, dict[str, Any]] = ("ok", {})
S503: tuple[str, dict[str, Any]] = ("status", {"status": 503})
ALL = ["error", "timeout", "invalid_header", "http_502", "http_503", "http_504"]

SCENARIOS = [
    Scenario("connect refused -> next server", [(REFUSED, {}), OK], 200, [1, 1], 1.0),
    Scenario("reset before response head", [("reset", {}), OK], 200, [1, 1], 1.0),
    Scenario("closed before response head", [("close", {}), OK], 200, [1, 1], 1.0),
    Scenario("reset mid response head", [("reset_head", {}), OK], 200, [1, 1], 1.0),
    Scenario("read timeout -> next server", [("hang", {}), OK], 200, [1, 1], 1.0),
    Scenario("malformed head, invalid_header unlisted", [("malformed", {}), OK], 502, [1, 0], 1.0),
    Scenario(
        "malformed head, invalid_header listed",
        [("malformed", {}), OK],
        200,
        [1, 1],
        1.0,
        retry={"on": ALL},
    ),
    Scenario("503, http_503 listed", [S503, OK], 200, [1, 1], 1.0, retry={"on": ALL}),
    Scenario("503, http_503 not listed", [S503, OK], 503, [1, 0], 1.0),
    Scenario(
        "500, http_500 listed",
        [("status", {"status": 500}), OK],
        200,
        [1, 1],
        1.0,
        retry={"on": ["http_500"]},
    ),
    Scenario("all 503: last response relayed", [S503] * 3, 503, [1, 1, 1], 1.0, retry={"on": ALL}),
    Scenario("all reset: 502", [("reset", {})] * 2, 502, [1, 1], 1.0),
    Scenario("all hang: 504", [("hang", {})] * 2, 504, [1, 1], 1.5),
    Scenario(
        "503 then reset: the 503 wins", [S503, ("reset", {})], 503, [1, 1], 1.0, retry={"on": ALL}
    ),
    Scenario(
        "tries: 2 of 3 failing servers",
        [("reset", {})] * 3,
        502,
        [1, 1, 0],
        1.0,
        retry={"tries": 2},
    ),
    Scenario(
        "retry.timeout 450ms spent",
        [("hang", {})] * 3,
        504,
        [1, 1, 0],
        1.5,
        retry={"tries": 3, "timeout": "450ms"},
    ),
    Scenario("POST not retried", [("reset", {}), OK], 502, [1, 0], 1.0, method="POST", body=b"x"),
    Scenario(
        "POST + Idempotency-Key, listed",
        [("reset", {}), OK],
        200,
        [1, 1],
        1.0,
        retry={"on": ["error", "idempotency_key"]},
        method="POST",
        body=b"x",
        headers={"Idempotency-Key": "k1"},
    ),
    Scenario(
        "POST, non_idempotent listed",
        [("reset", {}), OK],
        200,
        [1, 1],
        1.0,
        retry={"on": ["error", "non_idempotent"]},
        method="POST",
        body=b"x" * 1000,
    ),
    Scenario(
        "POST body > max_body_bytes",
        [("reset", {}), OK],
        502,
        [1, 0],
        1.0,
        retry={"on": ["error", "non_idempotent"], "max_body_bytes": "1KiB"},
        method="POST",
        body=b"x" * 2000,
    ),
    Scenario("reset mid body: never retried", [("reset_body", {}), OK], "cut", [1, 0], 1.0),
    Scenario("read timeout mid body", [("stall_body", {}), OK], "cut", [1, 0], 1.5),
    Scenario("tries: 1", [("reset", {}), OK], 502, [1, 0], 1.0, retry={"tries": 1}),
]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    servers: list[list[FaultServer | None]] = []
    config: dict[str, Any] = {
        "logging": {"level": "info", "access_log": True, "format": "json"},
        "upstreams": {},
        "routes": [],
    }
    try:
        for index, scenario in enumerate(SCENARIOS):
            row: list[FaultServer | None] = []
            urls = []
            for number, (mode, options) in enumerate(scenario.backends):
                if mode == REFUSED:
                    row.append(None)
                    urls.append(f"http://127.0.0.1:{refused_port()}")
                else:
                    server = FaultServer(f"s{index}b{number}", mode, **options).start()
                    row.append(server)
                    urls.append(server.url)
            servers.append(row)
            upstream = lb_config(urls, read=scenario.read, retry=scenario.retry)["upstreams"]["app"]
            config["upstreams"][f"u{index}"] = upstream
            config["routes"].append(
                {
                    "name": f"s{index}",
                    "match": {"path_prefix": f"/s{index}/"},
                    "upstream": f"u{index}",
                }
            )
        daemon = start_daemon(tmp_path_factory.mktemp("matrix"), config)
        try:
            yield daemon, servers
        finally:
            daemon.stop()
    finally:
        for row in servers:
            for server in row:
                if server is not None:
                    server.stop()


def exchange(port: int, scenario: Scenario, path: str) -> tuple[int | str, float]:
    """One request on a fresh connection; (status or "cut", seconds)."""
    headers = {"Host": "matrix", "Connection": "close", **scenario.headers}
    if scenario.body:
        headers["Content-Length"] = str(len(scenario.body))
    head = f"{scenario.method} {path} HTTP/1.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode() + b"\r\n" + scenario.body)
        received, _ = read_until_closed(sock)
    seconds = time.monotonic() - started
    response_head, _, body = received.partition(b"\r\n\r\n")
    status = int(response_head.split(b" ", 2)[1])
    for line in response_head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and len(body) < int(value):
            return "cut", seconds
    return status, seconds


@pytest.mark.parametrize(
    "index", range(len(SCENARIOS)), ids=[s.name.replace(" ", "_") for s in SCENARIOS]
)
def test_fault_matrix(matrix, index):
    daemon, servers = matrix
    scenario = SCENARIOS[index]
    route = f"s{index}"

    status, seconds = exchange(daemon.port, scenario, f"/{route}/")

    line = wait_for(
        lambda: next((line for line in daemon.access_log() if line["route"] == route), None),
        timeout=5,
        message=f"the access log line of {route}",
    )
    labels = [server.address if server is not None else None for server in servers[index]]
    proxy_view = [
        sum(1 for a in line.get("attempts", []) if label and a["server"] == label)
        for label in labels
    ]
    for position, server in enumerate(servers[index]):
        if server is None:  # a refused connect: only the proxy saw the attempt
            proxy_view[position] = sum(
                1 for a in line.get("attempts", []) if a["server"] not in labels
            )
    backend_view = [
        server.requests if server is not None else proxy_view[position]
        for position, server in enumerate(servers[index])
    ]
    FAULT_MATRIX.append(
        (scenario.name, str(status), "/".join(map(str, backend_view)), f"{seconds:.2f}")
    )

    assert status == scenario.status
    assert backend_view == scenario.attempts
    assert proxy_view == scenario.attempts
    assert seconds < scenario.seconds
