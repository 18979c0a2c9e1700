"""``sluicegate demo`` binds fixed ports (SPEC: proxy 8080, admin 9901, backends 8081-8083).

Only the tests that run the demo use these ports: every other test takes ports from
``free_port()``, which the kernel picks in its ephemeral range (32768 and up here), and the
daemon fixture fills in such ports for any config without ``listen``/``admin``. Another
checkout's suite may be running the demo on the same machine, so a demo test waits for the
ports to be free rather than failing at once.
"""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request

from tests.support.daemon import wait_for

DEMO_PORTS = (8080, 9901, 8081, 8082, 8083)
PROXY = "http://127.0.0.1:8080"
ADMIN = "http://127.0.0.1:9901"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def busy_demo_ports() -> list[int]:
    return [port for port in DEMO_PORTS if not port_free(port)]


def wait_for_demo_ports_free(timeout: float = 60.0) -> None:
    wait_for(
        lambda: not busy_demo_ports(),
        timeout=timeout,
        interval=0.2,
        message="the demo's fixed ports to be free (another demo running?)",
    )


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def answers(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def wait_until_demo_serves(demo: subprocess.Popen, timeout: float = 30.0) -> None:
    def up() -> bool:
        assert demo.poll() is None, f"the demo exited with {demo.returncode}"
        return answers(f"{ADMIN}/healthz")

    wait_for(up, timeout=timeout, message="the demo's admin API")
