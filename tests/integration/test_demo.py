"""`sluicegate demo` (what `make run` starts), as a user runs it: the fixed demo ports."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

from tests.support.daemon import REPO
from tests.support.demo import (
    ADMIN,
    PROXY,
    busy_demo_ports,
    get,
    wait_for_demo_ports_free,
    wait_until_demo_serves,
)


def test_demo_serves_three_backends_in_turn_and_stops_on_ctrl_c():
    wait_for_demo_ports_free()
    demo = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_demo_serves(demo)
        names = [get(f"{PROXY}/")[1]["X-Backend"] for _ in range(3)]
        assert sorted(names) == ["backend-8081", "backend-8082", "backend-8083"]
        statuses = [get(f"{PROXY}/limited/")[0] for _ in range(12)]
        assert statuses[:10] == [200] * 10 and 429 in statuses[10:]
        assert get(f"{ADMIN}/")[0] == 200
        _cached_route_hits_and_purges()
    finally:
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=20)
    assert demo.returncode == 0, output
    assert f"{PROXY}/" in output and f"{ADMIN}/" in output
    assert "Traceback" not in output
    assert not busy_demo_ports(), "something of the demo is left"


def _cached_route_hits_and_purges() -> None:
    """The demo's cached route, as the README shows it: a miss that is stored, a hit with
    the same page, and after a purge by tag a miss again."""
    url = f"{PROXY}/cacheable/60"
    status, first, page = get(url)
    assert status == 200
    assert first["Cache-Status"] == "sluicegate; fwd=uri-miss; stored"
    status, second, again = get(url)
    assert status == 200
    assert second["Cache-Status"] == "sluicegate; hit"
    assert again == page and "Age" in second
    purge = urllib.request.Request(
        f"{ADMIN}/cache/purge", data=json.dumps({"tag": "cacheable-60"}).encode(), method="POST"
    )
    with urllib.request.urlopen(purge, timeout=5) as reply:
        assert json.loads(reply.read()) == {"purged": 1}
    assert get(url)[1]["Cache-Status"] == "sluicegate; fwd=uri-miss; stored"
