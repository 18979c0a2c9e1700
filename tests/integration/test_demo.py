"""`sluicegate demo` (what `make run` starts), as a user runs it: the fixed demo ports."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from tests.support.daemon import REPO, wait_for

DEMO_PORTS = (8080, 9901, 8081, 8082, 8083)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, dict(reply.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def _answers(url: str) -> bool:
    try:
        return _get(url)[0] == 200
    except OSError:
        return False


def test_demo_serves_three_backends_in_turn_and_stops_on_ctrl_c():
    busy = [port for port in DEMO_PORTS if not _port_free(port)]
    assert not busy, f"the demo's fixed ports are in use here: {busy}"
    demo = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: _answers("http://127.0.0.1:9901/healthz"), timeout=20, message="demo")
        names = [_get("http://127.0.0.1:8080/")[1]["X-Backend"] for _ in range(3)]
        assert sorted(names) == ["backend-8081", "backend-8082", "backend-8083"]
        statuses = [_get("http://127.0.0.1:8080/limited/")[0] for _ in range(12)]
        assert statuses[:10] == [200] * 10 and 429 in statuses[10:]
        assert _get("http://127.0.0.1:9901/")[0] == 200
    finally:
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=20)
    assert demo.returncode == 0, output
    assert "http://127.0.0.1:8080/" in output and "http://127.0.0.1:9901/" in output
    assert "Traceback" not in output
    assert all(_port_free(port) for port in DEMO_PORTS), "something of the demo is left"
