"""``sluicegate demo``: three demo backends and the proxy, from ``config/demo.yaml``.

That file is ``demo.yaml`` beside this module (``config/demo.yaml`` links to it), so the
demo runs from an installed wheel in any working directory.

The backends run as child processes so the proxy's event loop measures only itself; the
proxy runs in this process. Ctrl-C (or SIGTERM) stops everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from proxy.config import load_config
from proxy.errors import StartupError

DEMO_CONFIG = Path(__file__).resolve().with_name("demo.yaml")


def _start_backends(config) -> list[subprocess.Popen]:
    processes = []
    servers = [server for upstream in config.upstreams.values() for server in upstream.servers]
    for server in servers:
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "proxy",
                    "backend",
                    "--host",
                    server.host,
                    "--port",
                    str(server.port),
                ],
                stdin=subprocess.DEVNULL,
            )
        )
    deadline = time.monotonic() + 10
    for server, process in zip(servers, processes, strict=True):
        while True:
            if process.poll() is not None:
                _stop(processes)
                raise StartupError(f"demo backend {server.url} did not start (port in use?)")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    _stop(processes)
                    raise StartupError(f"demo backend {server.url} did not answer") from None
                time.sleep(0.05)
    return processes


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


def run_demo(config_path: str | os.PathLike[str] = DEMO_CONFIG) -> int:
    from proxy.control.daemon import serve

    if not Path(config_path).exists():
        raise StartupError(f"demo config {config_path}: file not found")
    config = load_config(str(config_path))
    backends = _start_backends(config)
    try:
        listen = config.listen[0].address
        admin = config.admin.address
        print(
            f"Sluicegate demo\n"
            f"  proxy:        http://{listen}/  (try: curl http://{listen}/ a few times)\n"
            f"  rate-limited: http://{listen}/limited/\n"
            f"  status page:  http://{admin}/\n"
            f"  metrics:      http://{admin}/metrics\n"
            f"Ctrl-C stops everything.",
            flush=True,
        )
        return serve(str(config_path), config)
    finally:
        _stop(backends)
