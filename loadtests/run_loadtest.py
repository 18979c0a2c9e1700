"""`make loadtest`: run the locust mix for 30 s against `sluicegate demo`.

Starts the demo (3 backends, proxy on 127.0.0.1:8080, admin on 127.0.0.1:9901), waits
for the proxy, runs locust headless with 20 users, stops the demo and exits with
locust's exit code (non-zero when a threshold in locustfile.py failed).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROXY = ("127.0.0.1", 8080)
LOCUST_ARGS = ["--headless", "-u", "20", "-r", "10", "-t", "30s"]


def port_open(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(address: tuple[str, int], proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo exited with {proc.returncode} before it was ready")
        if port_open(address):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the demo did not listen on {address[0]}:{address[1]} in {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C the demo (it stops its backends too); kill the group if it hangs."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def locust_command() -> list[str]:
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    return [locust] if locust else [sys.executable, "-m", "locust"]


def main() -> int:
    if port_open(PROXY):
        print(f"something already listens on {PROXY[0]}:{PROXY[1]}; stop it first", file=sys.stderr)
        return 1
    demo = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so stop() reaches the backends too
    )
    try:
        wait_for(PROXY, demo)
        command = [
            *locust_command(),
            "-f",
            str(REPO_ROOT / "loadtests" / "locustfile.py"),
            *LOCUST_ARGS,
            "--host",
            f"http://{PROXY[0]}:{PROXY[1]}",
        ]
        print("running:", " ".join(command), flush=True)
        return subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
    except RuntimeError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1
    finally:
        stop(demo)


if __name__ == "__main__":
    sys.exit(main())
