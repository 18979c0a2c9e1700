"""RFC 9111 conformance: the http-tests/cache-tests suite against Sluicegate's cache.

Starts the suite's origin server on loopback, Sluicegate in front of it with a cache on
every path, runs the suite's command-line client through the proxy and counts the results
as cache-tests.fyi does. The suite is not part of this repository:

    git clone https://github.com/http-tests/cache-tests
    (cd cache-tests && npm install --omit=dev)
    make cache-tests CACHE_TESTS_DIR=$PWD/cache-tests

Writes bench-results/cache-tests.json (the raw results) and prints the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOW_TO_GET_IT = (
    "set CACHE_TESTS_DIR to a checkout of the suite:\n"
    "  git clone https://github.com/http-tests/cache-tests\n"
    "  (cd cache-tests && npm install --omit=dev)\n"
    "  make cache-tests CACHE_TESTS_DIR=$PWD/cache-tests"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"cache-tests: {what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    sys.exit(f"cache-tests: {what} did not answer at {url}")


def config_text(origin_port: int, proxy_port: int, admin_port: int) -> str:
    return f"""
listen: [{{address: "127.0.0.1:{proxy_port}"}}]
admin: {{address: "127.0.0.1:{admin_port}"}}
logging: {{level: warning, access_log: false}}
cache: {{store: memory, max_size: 64MiB, max_object_size: 8MiB, lock_timeout: 5s}}
upstreams:
  origin:
    servers: [{{url: "http://127.0.0.1:{origin_port}"}}]
    retry: {{tries: 1}}
    circuit_breaker: {{failure_threshold: 100000}}
routes:
  - name: everything
    match: {{path_prefix: /}}
    upstream: origin
    cache: {{heuristic: true}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=os.environ.get("CACHE_TESTS_DIR", ""))
    parser.add_argument("--out", default=str(REPO / "bench-results" / "cache-tests.json"))
    args = parser.parse_args()
    suite = Path(args.suite) if args.suite else None
    if suite is None or not (suite / "test-engine" / "cli.mjs").is_file():
        print(f"cache-tests: {HOW_TO_GET_IT}", file=sys.stderr)
        return 2
    if not (suite / "node_modules").is_dir():
        subprocess.run(["npm", "install", "--omit=dev"], cwd=suite, check=True)
    origin_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="cache-tests-") as work:
        work_dir = Path(work)
        try:
            origin = subprocess.Popen(
                [
                    "node",
                    "--import",
                    str(REPO / "scripts" / "cache-tests-loopback.mjs"),
                    "test-engine/server/server.mjs",
                ],
                cwd=suite,
                env={
                    **os.environ,
                    "npm_config_protocol": "http",
                    "npm_config_port": str(origin_port),
                    "npm_config_pidfile": str(work_dir / "origin.pid"),
                },
                stdout=open(work_dir / "origin.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
            processes.append(origin)
            config = work_dir / "sluicegate.yaml"
            config.write_text(config_text(origin_port, proxy_port, admin_port))
            proxy = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(config)],
                cwd=REPO,
                stdout=open(work_dir / "sluicegate.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
            processes.append(proxy)
            wait_http(f"http://127.0.0.1:{origin_port}/", origin, "the origin server")
            wait_http(f"http://127.0.0.1:{admin_port}/healthz", proxy, "sluicegate")
            run = subprocess.run(
                ["npm", "run", "--silent", "cli", f"--base=http://127.0.0.1:{proxy_port}"],
                cwd=suite,
                capture_output=True,
                check=False,
            )
            if run.returncode != 0:
                print(run.stderr.decode(errors="replace"), file=sys.stderr)
                return 1
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(run.stdout)
        finally:
            for proc in reversed(processes):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
    count = subprocess.run(
        ["node", str(REPO / "scripts" / "cache-tests-count.mjs"), str(suite), str(out)],
        capture_output=True,
        check=True,
    )
    summary = json.loads(count.stdout)
    failed = summary.pop("failed")
    print(json.dumps(summary))
    if failed:
        print("failed: " + " ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
