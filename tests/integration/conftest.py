"""Fixtures shared by the integration modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_hostile_input import RawUpstream
from tests.support.daemon import start_daemon


@pytest.fixture
def raw_upstream():
    """A scripted raw upstream (``RawUpstream``): exact response bytes, per request."""
    upstream = RawUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def proxy_to_raw(tmp_path: Path, raw_upstream: RawUpstream):
    """The daemon in front of ``raw_upstream``: one try, a 2 s read timeout, and a breaker
    that opens only after 1,000 failures in a row (misbehaviour is what is tested)."""
    config = {
        "upstreams": {
            "raw": {
                "servers": [{"url": f"http://127.0.0.1:{raw_upstream.port}"}],
                "retry": {"tries": 1},
                "timeouts": {"read": "2s"},
                "circuit_breaker": {"failure_threshold": 1000},
            }
        },
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "raw"}],
    }
    daemon = start_daemon(tmp_path, config)
    yield daemon
    daemon.stop()
