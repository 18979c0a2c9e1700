"""The request pipeline in process: a virtual-clock loop, fake clients and upstreams.

Every test here runs on a ``PipelineLoop`` (see virtualtime.py and upstreams.py), so
timeouts cost no real time and no socket is opened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.pipeline.harness import PipelineProxy
from tests.pipeline.upstreams import PipelineLoop


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    return {"virtual_clock": PipelineLoop}


def base_config(**upstream: Any) -> dict[str, Any]:
    """One listener, one route ``/`` to upstream ``app`` of two servers, unless told."""
    app = {
        "servers": [{"url": "http://10.9.0.1:80"}, {"url": "http://10.9.0.2:80"}],
        "retry": {"budget": 1.0},
        **upstream,
    }
    return {
        "listen": [{"address": "127.0.0.1:8080"}],
        "upstreams": {"app": app},
        "routes": [{"name": "main", "match": {"path_prefix": "/"}, "upstream": "app"}],
    }


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[[dict[str, Any]], PipelineProxy]]:
    made: list[PipelineProxy] = []

    def make(config: dict[str, Any]) -> PipelineProxy:
        proxy = PipelineProxy(config)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.stop()
