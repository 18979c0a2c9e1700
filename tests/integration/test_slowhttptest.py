"""``slowhttptest`` (Debian package) against the real daemon, while a normal client is served.

Slowloris (``-H``): 200 connections each trickling header lines; ``client_header_timeout``
bounds the whole head, so the proxy answers 408 and closes them all. Slow body (``-B``):
200 uploads each sending a few bytes a second, within ``client_body_timeout`` between reads,
so they stay open (as with nginx). In both, a normal client keeps getting quick 200s.

Without the binary the tests skip (``install slowhttptest``); with ``CI`` set they fail, since
CI installs it through ``scripts/ensure-tools.sh test``.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.daemon import http_request

ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")


def slowhttptest_binary() -> str:
    path = shutil.which("slowhttptest") or (
        "/usr/bin/slowhttptest" if os.path.exists("/usr/bin/slowhttptest") else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("slowhttptest is missing: scripts/ensure-tools.sh test installs it")
        pytest.skip("install slowhttptest (Debian package slowhttptest)")
    return path


@pytest.fixture
def proxy(start_sluicegate, spawn_backend):
    _, port = spawn_backend("slow")
    return start_sluicegate(
        {
            "limits": {"client_header_timeout": "2s", "client_body_timeout": "2s"},
            "logging": {"access_log": False},
            "upstreams": {"app": {"servers": [{"url": f"http://127.0.0.1:{port}"}]}},
            "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"}],
        }
    )


class Prober:
    """A normal client in a thread: one GET every 50 ms, recording status and latency."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.results: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = http_request(self.port, "GET", "/", timeout=5)[0]
            except OSError:
                status = 0
            self.results.append((status, time.monotonic() - started))
            self._stop.wait(0.05)


def run_attack(binary: str, mode: str, url: str, out: Path, *extra: str) -> list[dict[str, int]]:
    """Run slowhttptest; return its per-second statistics (``-g -o``: the CSV report)."""
    command = [binary, mode, "-c", "200", "-r", "100", "-l", "8", "-i", "1", "-p", "3"]
    command += ["-g", "-o", str(out), "-u", url, *extra]
    done = subprocess.run(command, capture_output=True, timeout=60, check=False)
    report = out.with_suffix(".csv")
    assert report.exists(), ANSI.sub(b"", done.stdout + done.stderr).decode(errors="replace")
    with report.open() as rows:
        return [{key: int(value) for key, value in row.items()} for row in csv.DictReader(rows)]


def assert_served_quickly(prober: Prober) -> None:
    statuses = [status for status, _ in prober.results]
    latencies = sorted(seconds for _, seconds in prober.results)
    assert len(statuses) >= 40, f"the normal client barely ran: {len(statuses)} requests"
    assert set(statuses) == {200}, statuses
    p95 = latencies[int(len(latencies) * 0.95)]
    assert p95 < 0.5, f"normal requests slowed down under attack: p95 {p95:.3f}s"
    assert latencies[-1] < 2.0, f"a normal request stalled: {latencies[-1]:.3f}s"


@pytest.mark.slow
def test_slowloris_is_cut_by_header_timeout_and_others_are_served(proxy, tmp_path):
    binary = slowhttptest_binary()
    with Prober(proxy.port) as prober:
        seconds = run_attack(binary, "-H", proxy.url("/"), tmp_path / "slowloris")
    assert max(row["Connected"] for row in seconds) > 50, seconds
    # client_header_timeout (2 s) closed the trickling connections long before the 8 s end.
    assert seconds[-1]["Closed"] >= 150, seconds
    assert len(seconds) < 8, "every slow connection was closed, so the attack stopped early"
    assert_served_quickly(prober)
    rejected = [line for line in proxy.log_lines() if "408" in line.get("message", "")]
    assert len(rejected) >= 150, "the slow heads should have been answered 408"


@pytest.mark.slow
def test_slow_body_connections_do_not_slow_others(proxy, tmp_path):
    binary = slowhttptest_binary()
    with Prober(proxy.port) as prober:
        seconds = run_attack(binary, "-B", proxy.url("/echo"), tmp_path / "slowbody", "-s", "8192")
    assert max(row["Connected"] for row in seconds) > 50, seconds
    assert_served_quickly(prober)
