"""The admin application over real HTTP on 127.0.0.1, against a small in-test control."""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.control.admin import build_admin_app
from proxy.observability import metrics

TOKEN = "s3cret-token"


class FakeControl:
    """Holds real state the endpoints read and change, like the daemon's control."""

    def __init__(self) -> None:
        self.upstreams = {
            "api": {
                "policy": "least_conn",
                "servers": [
                    self._server("http://10.0.0.1:8080", weight=3),
                    self._server("http://10.0.0.2:8080", weight=1, backup=True),
                ],
            },
            "static": {"policy": "round_robin", "servers": [self._server("http://10.0.1.1:80")]},
        }
        self.shutting_down = False
        self.next_reload: tuple[bool, str] = (True, "config reloaded: 2 upstreams")
        self.reloads = 0

    @staticmethod
    def _server(url: str, weight: int = 1, backup: bool = False) -> dict:
        return {
            "url": url,
            "weight": weight,
            "backup": backup,
            "health": "up",
            "breaker": "closed",
            "in_flight": 0,
            "requests": 10,
            "failures": 1,
            "draining": False,
            "zone": "a",
            "address": url.removeprefix("http://"),
            "outcomes": {
                "1xx": 0,
                "2xx": 9,
                "3xx": 0,
                "4xx": 0,
                "5xx": 1,
                "errors": 0,
                "timeouts": 0,
            },
            "last_check": {"result": "pass", "at": "2024-05-01T12:00:01.000Z", "reason": None},
            "request_rate": 0.5,
            "error_rate": 0.1,
            "p50_ms": 3.2,
            "p99_ms": 40.0,
        }

    def status(self) -> dict:
        return {
            "version": "0.1.0",
            "uptime_seconds": 12.5,
            "config_file": "config/sluicegate.yaml",
            "config_loaded_at": "2024-05-01T12:00:00.000Z",
            "zone": "a",
            "routes": [
                {
                    "name": "api",
                    "upstream": "api",
                    "requests": 10,
                    "rate_limited": 2,
                    "limit": {"rate": 100.0, "burst": 200, "key": "client_ip", "mode": "enforce"},
                    "cache": {"hits": 3, "misses": 7, "stale": 0, "objects": 5, "bytes": 2048},
                },
            ],
            "upstreams": self.upstreams,
        }

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = ["shutting down"] if self.shutting_down else []
        for name, upstream in self.upstreams.items():
            eligible = [s for s in upstream["servers"] if not s["draining"]]
            if not eligible:
                reasons.append(f"upstream {name} has no eligible server")
        return not reasons, reasons

    async def reload(self) -> tuple[bool, str]:
        self.reloads += 1
        return self.next_reload

    def set_draining(self, upstream: str, index: int, draining: bool) -> dict | None:
        servers = self.upstreams.get(upstream, {}).get("servers", [])
        if not 0 <= index < len(servers):
            return None
        servers[index]["draining"] = draining
        return servers[index]


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


async def serve(control, token):
    server = TestServer(build_admin_app(control, token=token), host="127.0.0.1", port=0)
    client = TestClient(server)
    await client.start_server()
    return client


@pytest.fixture
async def client(control):
    client = await serve(control, token=None)
    yield client
    await client.close()


@pytest.fixture
async def secured(control):
    client = await serve(control, token=TOKEN)
    yield client
    await client.close()


async def test_listens_on_loopback(client):
    assert client.server.host == "127.0.0.1"
    assert client.server.port


async def test_healthz(client):
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_readyz_ready(client):
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"ready": True, "reasons": []}


async def test_readyz_shutting_down_is_503_with_reasons(client, control):
    control.shutting_down = True
    response = await client.get("/readyz")
    assert response.status == 503
    assert await response.json() == {"ready": False, "reasons": ["shutting down"]}


async def test_readyz_names_upstreams_without_eligible_servers(client, control):
    await client.post("/upstreams/static/servers/0/drain")
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["reasons"] == ["upstream static has no eligible server"]


async def test_status_is_the_control_status(client, control):
    response = await client.get("/status")
    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert body == control.status()
    assert set(body) >= {
        "version", "uptime_seconds", "config_file", "config_loaded_at", "zone", "routes",
    }  # fmt: skip
    assert set(body["routes"][0]) == {
        "name", "upstream", "requests", "rate_limited", "limit", "cache",
    }  # fmt: skip
    server = body["upstreams"]["api"]["servers"][0]
    assert set(server) >= {
        "url", "weight", "backup", "health", "breaker",
        "in_flight", "requests", "failures", "draining", "zone", "address",
    }  # fmt: skip


async def test_metrics_default_render_parses(client):
    metrics.RouteMetrics("admin-test-route").observe("GET", 200, 0.004)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    assert "sluicegate_requests" in families
    assert "sluicegate_open_connections" in families


async def test_metrics_uses_control_render_when_given(control):
    control.render_metrics = lambda: (b"custom_metric 1\n", "text/plain; version=0.0.4")
    client = await serve(control, token=None)
    try:
        response = await client.get("/metrics")
        assert await response.text() == "custom_metric 1\n"
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4"
    finally:
        await client.close()


async def test_status_page_is_self_contained_html(client):
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", page)  # protocol-relative
    assert "<script src" not in page and "<link" not in page
    assert 'fetch("status"' in page
    # Drain/undrain from the page: relative POSTs (the page works under any prefix) that
    # carry the token kept for the tab.
    assert '"upstreams/" + encodeURIComponent(upstream)' in page
    assert '"Bearer " + token' in page and "sessionStorage" in page


async def test_reload_success(client, control):
    response = await client.post("/reload")
    assert response.status == 200
    assert await response.json() == {
        "status": "reloaded",
        "message": "config reloaded: 2 upstreams",
    }
    assert control.reloads == 1


async def test_reload_failure_is_400_with_the_message(client, control):
    control.next_reload = (False, "upstreams.api.servers[1].weight: must be >= 1 (got 0)")
    response = await client.post("/reload")
    assert response.status == 400
    assert await response.json() == {
        "error": "upstreams.api.servers[1].weight: must be >= 1 (got 0)"
    }


async def test_drain_and_undrain_return_the_server_status(client, control):
    response = await client.post("/upstreams/api/servers/1/drain")
    assert response.status == 200
    body = await response.json()
    assert body["url"] == "http://10.0.0.2:8080"
    assert body["draining"] is True
    assert control.upstreams["api"]["servers"][1]["draining"] is True

    response = await client.post("/upstreams/api/servers/1/undrain")
    assert response.status == 200
    assert (await response.json())["draining"] is False


@pytest.mark.parametrize(
    "path",
    [
        "/upstreams/nope/servers/0/drain",
        "/upstreams/api/servers/2/drain",
        "/upstreams/api/servers/-1/undrain",
        "/upstreams/api/servers/one/drain",
        "/upstreams/api/servers/1.0/drain",
    ],
)
async def test_drain_unknown_upstream_or_index_is_404_json(client, path):
    response = await client.post(path)
    assert response.status == 404
    assert "error" in await response.json()


async def test_unknown_path_is_404_json(client):
    response = await client.get("/nope")
    assert response.status == 404
    assert await response.json() == {"error": "not found"}


async def test_wrong_method_is_405_json(client):
    response = await client.get("/reload")
    assert response.status == 405
    assert await response.json() == {"error": "method not allowed"}
    assert "POST" in response.headers["Allow"]


async def test_control_failure_is_500_json(client, control):
    def broken():
        raise RuntimeError("boom")

    control.status = broken
    response = await client.get("/status")
    assert response.status == 500
    assert await response.json() == {"error": "internal error"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
@pytest.mark.parametrize("path", ["/reload", "/upstreams/api/servers/0/drain"])
async def test_posts_without_the_token_are_401(secured, control, headers, path):
    response = await secured.post(path, headers=headers)
    assert response.status == 401
    assert await response.json() == {"error": "unauthorized"}
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert control.reloads == 0
    assert control.upstreams["api"]["servers"][0]["draining"] is False


async def test_posts_with_the_token_are_accepted(secured, control):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await secured.post("/reload", headers=auth)).status == 200
    response = await secured.post("/upstreams/api/servers/0/drain", headers=auth)
    assert response.status == 200
    assert (await response.json())["draining"] is True
    lower_scheme = {"Authorization": f"bearer {TOKEN}"}
    assert (
        await secured.post("/upstreams/api/servers/0/undrain", headers=lower_scheme)
    ).status == 200


async def test_token_is_checked_before_the_route_exists(secured):
    # An unauthenticated caller learns nothing about which upstreams exist.
    response = await secured.post("/upstreams/nope/servers/0/drain")
    assert response.status == 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/status", "/"])
async def test_gets_stay_open_when_a_token_is_set(secured, path):
    assert (await secured.get(path)).status == 200


class AsyncControl(FakeControl):
    """A supervisor's control: it has to ask its workers, so every answer is awaited."""

    async def status(self) -> dict:
        return FakeControl.status(self)

    async def readiness(self) -> tuple[bool, list[str]]:
        return FakeControl.readiness(self)

    def set_draining(self, upstream: str, index: int, draining: bool):
        async def ask_workers():
            return FakeControl.set_draining(self, upstream, index, draining)

        return ask_workers()

    async def render_metrics(self) -> tuple[bytes, str]:
        return b"merged 1\n", "text/plain; version=0.0.4"


async def test_control_answers_may_be_awaitable():
    control = AsyncControl()
    client = await serve(control, token=None)
    try:
        assert (await (await client.get("/status")).json())["version"] == "0.1.0"
        control.shutting_down = True
        assert (await client.get("/readyz")).status == 503
        assert (await client.post("/upstreams/api/servers/0/drain")).status == 200
        assert (await client.post("/upstreams/api/servers/9/drain")).status == 404
        assert await (await client.get("/metrics")).text() == "merged 1\n"
    finally:
        await client.close()
