"""The live status page in a real browser: headless Chromium against the real daemon.

Two ways in, both bounded by timeouts on every subprocess and request:

- chromedriver, spoken to with the W3C WebDriver JSON protocol over plain HTTP (urllib, no
  selenium): the page stays open while a breaker opens, and the test watches the DOM the
  page's own polling redraws — the "live" in live page.
- ``chromium --headless --dump-dom`` / ``--screenshot``: a fresh load after the page's
  script ran (``--virtual-time-budget``), parsed with the standard library.

Chromium comes from the Debian packages ``chromium`` and ``chromium-driver``. Without them
these tests skip, except under CI (env ``CI`` set), where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support.daemon import free_port, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--window-size=1280,900",
]
# The page polls /status once a second; an opening breaker must show within this.
SHOWS_WITHIN = 5.0


def _require(path: str, package: str) -> str:
    if not os.access(path, os.X_OK):
        message = f"install {package} (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing under CI: {message}")
        pytest.skip(message)
    return path


@pytest.fixture
def chromium() -> str:
    return _require(CHROMIUM, "chromium")


@pytest.fixture
def chromedriver(chromium) -> str:
    return _require(CHROMEDRIVER, "chromium-driver")


def page_config(live: int, dead: int, **extra) -> dict:
    config = {
        "upstreams": {
            "web": {
                "policy": "round_robin",
                "servers": [
                    {"url": f"http://127.0.0.1:{live}", "weight": 2},
                    {"url": f"http://127.0.0.1:{free_port()}", "backup": True},
                ],
                "retry": {"tries": 1},
            },
            "flaky": {
                "servers": [{"url": f"http://127.0.0.1:{dead}"}],
                "retry": {"tries": 1},
                "circuit_breaker": {"failure_threshold": 1, "open_duration": "60s"},
            },
        },
        "routes": [
            {"name": "flaky", "match": {"path_prefix": "/flaky"}, "upstream": "flaky"},
            {"name": "web", "match": {"path_prefix": "/"}, "upstream": "web"},
        ],
    }
    config.update(extra)
    return config


# -- WebDriver over urllib ---------------------------------------------------------------------


class WebDriver:
    """Just enough of the W3C WebDriver protocol: session, navigate, script, screenshot."""

    def __init__(self, binary: str, chromium: str, profile: Path, log: Path) -> None:
        self.port = free_port()
        self._log = open(log, "wb")  # noqa: SIM115 - closed in quit()
        self.proc = subprocess.Popen(
            [binary, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.session: str | None = None
        try:
            wait_for(self._ready, timeout=15, message="chromedriver to answer")
            caps = {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [*BROWSER_ARGS, f"--user-data-dir={profile}"],
                },
                "timeouts": {"pageLoad": 15000, "script": 10000},
            }
            reply = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}}, 60)
            self.session = reply["sessionId"]
        except BaseException:
            self.quit()
            raise

    def _ready(self) -> bool:
        try:
            return bool(self._call("GET", "/status", None, 2).get("ready"))
        except (OSError, ValueError):
            return False

    def _call(self, method: str, path: str, payload: dict | None, timeout: float = 20) -> dict:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                body = json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise AssertionError(f"webdriver {method} {path}: {error.code} {detail}") from None
        return body.get("value", body) if isinstance(body, dict) else body

    def _session_call(self, method: str, path: str, payload: dict | None = None) -> object:
        return self._call(method, f"/session/{self.session}{path}", payload)

    def get(self, url: str) -> None:
        self._session_call("POST", "/url", {"url": url})

    def execute(self, script: str, *args: object) -> object:
        return self._session_call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self) -> bytes:
        return base64.b64decode(self._session_call("GET", "/screenshot"))

    def quit(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):
                self._call("DELETE", f"/session/{self.session}", None, 10)
            self.session = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def browser(chromedriver, chromium, tmp_path):
    driver = WebDriver(chromedriver, chromium, tmp_path / "profile", tmp_path / "driver.log")
    yield driver
    driver.quit()


# The rows as the page drew them: the hooks documented at the top of status.html.
ROWS_SCRIPT = """
return Array.from(document.querySelectorAll("tr.server")).map((row) => ({
  upstream: row.dataset.upstream,
  index: Number(row.dataset.index),
  health: row.dataset.health,
  breaker: row.dataset.breaker,
  draining: row.dataset.draining,
  url: row.querySelector(".url").firstChild.textContent,
  breakerText: row.querySelector(".col-breaker").textContent.trim(),
  healthText: row.querySelector(".col-health").textContent.trim(),
  requests: row.querySelector(".requests").textContent,
  failures: row.querySelector(".failures").textContent,
  backup: row.querySelector(".tag.backup") !== null,
}));
"""
PAGE_SCRIPT = """
const conn = document.getElementById("conn");
return {
  conn: conn.dataset.state,
  version: document.getElementById("version").textContent,
  upstreams: Array.from(document.querySelectorAll("section.upstream")).map(
    (s) => s.dataset.upstream),
  charts: Array.from(document.querySelectorAll("svg.rate-chart")).map(
    (c) => [c.dataset.upstream, Number(c.dataset.samples)]),
  summaries: Array.from(document.querySelectorAll(".summary")).map((s) => s.textContent),
};
"""


def _row(rows: list[dict], upstream: str, index: int) -> dict | None:
    for row in rows:
        if row["upstream"] == upstream and row["index"] == index:
            return row
    return None


def test_live_page_lists_servers_and_shows_a_breaker_opening(
    browser, start_sluicegate, spawn_backend, tmp_path
):
    _, live = spawn_backend("live")
    dead = free_port()
    daemon = start_sluicegate(page_config(live, dead))
    for _ in range(4):
        assert daemon.get("/")[0] == 200

    browser.get(daemon.admin_url("/"))
    rows = wait_for(
        lambda: (rows := browser.execute(ROWS_SCRIPT)) and len(rows) == 3 and rows,
        timeout=10,
        message="the page to list the servers",
    )
    web, backup, flaky = _row(rows, "web", 0), _row(rows, "web", 1), _row(rows, "flaky", 0)
    assert web["url"] == f"http://127.0.0.1:{live}" and web["requests"] == "4"
    assert backup["backup"] is True and not web["backup"]
    assert flaky["url"] == f"http://127.0.0.1:{dead}"
    for row in rows:
        assert row["breaker"] == "closed" and row["breakerText"] == "closed"
        assert row["health"] == "unknown" and row["healthText"] == "unknown"
        assert row["draining"] == "false"
    page = browser.execute(PAGE_SCRIPT)
    assert page["conn"] == "live" and page["version"] == daemon.status()["version"]
    assert page["upstreams"] == ["web", "flaky"]
    assert {name for name, _ in page["charts"]} == {"web", "flaky"}

    # The breaker opens while the page is open; the page's own polling must show it.
    assert daemon.get("/flaky")[0] == 502
    opened_at = time.monotonic()
    assert daemon.status()["upstreams"]["flaky"]["servers"][0]["breaker"] == "open"
    row = wait_for(
        lambda: (
            (r := _row(browser.execute(ROWS_SCRIPT), "flaky", 0)) and r["breaker"] == "open" and r
        ),
        timeout=SHOWS_WITHIN,
        interval=0.1,
        message=f"the page to show the breaker open within {SHOWS_WITHIN}s",
    )
    assert time.monotonic() - opened_at < SHOWS_WITHIN
    assert row["breakerText"] == "open" and row["failures"] == "1"
    rows = browser.execute(ROWS_SCRIPT)
    assert _row(rows, "web", 0)["breaker"] == "closed"  # only that server
    page = browser.execute(PAGE_SCRIPT)
    assert "0 of 1 server taking traffic" in page["summaries"]
    assert all(samples >= 2 for _, samples in page["charts"])  # the chart keeps sampling

    png = browser.screenshot()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    (tmp_path / "live-page.png").write_bytes(png)


def test_live_page_shows_drain_and_a_lost_connection(browser, start_sluicegate, spawn_backend):
    _, live = spawn_backend("live")
    daemon = start_sluicegate(page_config(live, free_port()))
    browser.get(daemon.admin_url("/"))
    wait_for(lambda: len(browser.execute(ROWS_SCRIPT)) == 3, timeout=10, message="the rows")

    assert daemon.admin("POST", "/upstreams/web/servers/0/drain")[0] == 200
    wait_for(
        lambda: _row(browser.execute(ROWS_SCRIPT), "web", 0)["draining"] == "true",
        timeout=SHOWS_WITHIN,
        interval=0.1,
        message="the page to show the server draining",
    )
    daemon.stop()
    wait_for(
        lambda: browser.execute(PAGE_SCRIPT)["conn"] == "down",
        timeout=SHOWS_WITHIN,
        interval=0.1,
        message="the page to say it lost the admin API",
    )
    assert len(browser.execute(ROWS_SCRIPT)) == 3  # the last known state stays on screen


# -- plain chromium: dump the DOM, take a screenshot ---------------------------------------------


class _ServerRows(HTMLParser):
    """``tr.server`` rows of a dumped DOM: their data-* attributes and cell texts by class."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self._row: dict | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "tr" and "server" in classes:
            self._row = {k: v for k, v in attributes.items() if k.startswith("data-")}
            self._row["cells"] = {}
        elif tag == "td" and self._row is not None:
            self._cell = classes[0] if classes else ""
            self._row["cells"][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._cell is not None:
            self._row["cells"][self._cell] += data


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    return subprocess.run(
        [
            chromium,
            *BROWSER_ARGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=3000",
            *args,
        ],
        capture_output=True,
        timeout=60,
    )


def dump_rows(chromium: str, tmp_path: Path, url: str) -> list[dict]:
    result = run_chromium(chromium, tmp_path, "--dump-dom", url)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    parser = _ServerRows()
    parser.feed(result.stdout.decode())
    return parser.rows


def test_dumped_dom_shows_every_server_and_an_open_breaker(
    chromium, start_sluicegate, spawn_backend, tmp_path
):
    _, live = spawn_backend("live")
    dead = free_port()
    daemon = start_sluicegate(page_config(live, dead))
    assert daemon.get("/")[0] == 200

    rows = dump_rows(chromium, tmp_path, daemon.admin_url("/"))
    assert [(r["data-upstream"], r["data-index"]) for r in rows] == [
        ("web", "0"),
        ("web", "1"),
        ("flaky", "0"),
    ]
    assert rows[0]["cells"]["url"] == f"http://127.0.0.1:{live}"
    assert rows[1]["cells"]["url"].endswith("backup")  # the backup tag
    assert all(r["data-breaker"] == "closed" for r in rows)

    assert daemon.get("/flaky")[0] == 502
    deadline = time.monotonic() + 20
    while True:  # each load is bounded; a slow machine gets a few of them
        rows = dump_rows(chromium, tmp_path, daemon.admin_url("/"))
        flaky = rows[2]
        if flaky["data-breaker"] == "open" or time.monotonic() > deadline:
            break
    assert flaky["data-breaker"] == "open"
    assert flaky["cells"]["col-breaker"].strip() == "open"
    assert flaky["cells"]["failures"] == "1"
    assert rows[0]["data-breaker"] == "closed"


def test_screenshot_of_the_page(chromium, start_sluicegate, spawn_backend, tmp_path):
    _, live = spawn_backend("live")
    daemon = start_sluicegate(page_config(live, free_port()))
    for _ in range(10):
        assert daemon.get("/delay/2")[0] == 200
    assert daemon.get("/flaky")[0] == 502
    shot = tmp_path / "page.png"
    result = run_chromium(chromium, tmp_path, f"--screenshot={shot}", daemon.admin_url("/"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 900)
    # A drawn page, not a blank one: a rendered table compresses far worse than a flat fill.
    assert len(png) > 20_000
    if os.environ.get("SLUICEGATE_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SLUICEGATE_KEEP_SCREENSHOT"])


# -- the parts added for operators: banner, routes, drain buttons, a chart that agrees ----------

BANNER_SCRIPT = """
const banner = document.getElementById("no-eligible-banner");
return {
  shown: !banner.hidden && banner.getBoundingClientRect().height > 0,
  upstreams: banner.dataset.upstreams,
  text: banner.textContent,
  eligible: Object.fromEntries(Array.from(document.querySelectorAll("section.upstream")).map(
    (s) => [s.dataset.upstream, s.dataset.eligible])),
  checks: Array.from(document.querySelectorAll("tr.server")).map((row) => ({
    upstream: row.dataset.upstream,
    result: row.querySelector(".last-check").dataset.result,
    text: row.querySelector(".last-check").textContent,
  })),
};
"""


def test_banner_names_every_upstream_without_an_eligible_server(
    browser, start_sluicegate, spawn_backend
):
    _, live = spawn_backend("live")
    dead = free_port()
    config = page_config(live, dead)
    config["upstreams"]["checked"] = {
        "servers": [{"url": f"http://127.0.0.1:{free_port()}"}],
        "health_check": {"path": "/health", "interval": "100ms", "unhealthy_threshold": 1},
    }
    config["routes"].insert(0, {"name": "checked", "match": {"path_prefix": "/checked"},
                                "upstream": "checked"})  # fmt: skip
    daemon = start_sluicegate(config)
    # The health-checked server goes down by itself: the first verdict is a failed check.
    wait_for(
        lambda: daemon.status()["upstreams"]["checked"]["servers"][0]["health"] == "down",
        timeout=5,
        message="the checked server to be down",
    )
    browser.get(daemon.admin_url("/"))
    page = wait_for(
        lambda: (p := browser.execute(BANNER_SCRIPT))["shown"] and p,
        timeout=SHOWS_WITHIN,
        message="the banner for the upstream whose server is down",
    )
    assert page["upstreams"] == "checked" and "checked" in page["text"]
    assert page["eligible"] == {"web": "true", "flaky": "true", "checked": "false"}
    check = next(c for c in page["checks"] if c["upstream"] == "checked")
    assert check["result"] == "fail" and "connect refused" in check["text"]
    assert next(c for c in page["checks"] if c["upstream"] == "web")["result"] == "none"

    # An open breaker and two drained servers strand two more upstreams.
    assert daemon.get("/flaky")[0] == 502
    for index in (0, 1):
        assert daemon.admin("POST", f"/upstreams/web/servers/{index}/drain")[0] == 200
    page = wait_for(
        lambda: (p := browser.execute(BANNER_SCRIPT))["upstreams"] == "web flaky checked" and p,
        timeout=SHOWS_WITHIN,
        interval=0.1,
        message="the banner to name all three upstreams",
    )
    assert page["shown"] and set(page["eligible"].values()) == {"false"}

    # One server back is enough for its upstream to leave the banner.
    assert daemon.admin("POST", "/upstreams/web/servers/1/undrain")[0] == 200
    wait_for(
        lambda: browser.execute(BANNER_SCRIPT)["upstreams"] == "flaky checked",
        timeout=SHOWS_WITHIN,
        interval=0.1,
        message="web to leave the banner",
    )


NO_VALUE = "\N{EN DASH}"  # what the page shows for a missing value
ROUTES_SCRIPT = """
return Array.from(document.querySelectorAll("tr.route")).map((row) => {
  const text = (selector) => {
    const node = row.querySelector(selector);
    return node ? node.textContent : null;
  };
  return {
    name: row.dataset.route, upstream: row.dataset.upstream, cached: row.dataset.cached,
    requests: text(".route-requests"), limited: text(".route-limited"),
    limit: text(".limit"), rate: text(".limit-rate"), burst: text(".limit-burst"),
    key: text(".limit-key"), mode: text(".limit-mode"),
    cache: text(".cache"), hits: text(".cache-hits"), bytes: text(".cache-bytes"),
  };
});
"""


def test_routes_table_shows_each_route_with_its_limit_and_cache(
    browser, start_sluicegate, spawn_backend
):
    _, live = spawn_backend("live")
    config = page_config(live, free_port(), cache={"max_size": "1MiB"})
    shadow_limit = {"rate": "2/s", "burst": 3, "key": "client_ip", "mode": "shadow"}
    config["routes"] = [
        {"name": "limited", "match": {"path_prefix": "/limited"}, "upstream": "web",
         "strip_prefix": True, "rate_limit": shadow_limit},
        {"name": "cached", "match": {"path_prefix": "/cached"}, "upstream": "web",
         "strip_prefix": True, "cache": {}},
        {"name": "web", "match": {"path_prefix": "/"}, "upstream": "web",
         "rate_limit": {"rate": "30/m", "key": "header:X-User"}},
    ]  # fmt: skip
    daemon = start_sluicegate(config)
    for _ in range(5):  # burst 3: the last two are over the limit, served anyway (shadow)
        assert daemon.get("/limited")[0] == 200
    assert daemon.get("/cached")[0] == 200

    browser.get(daemon.admin_url("/"))
    routes = wait_for(
        lambda: (r := browser.execute(ROUTES_SCRIPT)) and len(r) == 3 and r,
        timeout=10,
        message="the routes table",
    )
    limited, cached, web = routes
    assert [r["name"] for r in routes] == ["limited", "cached", "web"]  # config order
    assert {r["upstream"] for r in routes} == {"web"}
    assert (limited["requests"], limited["limited"]) == ("5", "2")
    assert (limited["rate"], limited["burst"], limited["key"], limited["mode"]) == (
        "2/s", "3", "client_ip", "shadow",
    )  # fmt: skip
    assert limited["cached"] == "false" and limited["cache"] == NO_VALUE
    assert cached["limit"] == NO_VALUE and cached["requests"] == "1"
    assert cached["cached"] == "true" and (cached["hits"], cached["bytes"]) == ("0", "0 B")
    assert (web["rate"], web["burst"], web["key"], web["mode"]) == (
        "30/m", "1", "header:X-User", "enforce",
    )  # fmt: skip


TOKEN_BOX_SCRIPT = """
const box = document.getElementById("token-box");
return {asking: !box.hidden, message: document.getElementById("token-message").textContent};
"""
CLICK_SCRIPT = """
const row = document.querySelector(
  `tr.server[data-upstream="${arguments[0]}"][data-index="${arguments[1]}"]`);
const button = row.querySelector("button.drain-toggle");
const action = button.dataset.action;
button.click();
return action;
"""
ANSWER_SCRIPT = """
document.getElementById("token-input").value = arguments[0];
document.getElementById("token-submit").click();
"""


def test_drain_button_asks_for_the_token_once_and_drains(browser, start_sluicegate, spawn_backend):
    _, live = spawn_backend("live")
    config = page_config(live, free_port(), admin={"token_env": "PAGE_TEST_TOKEN"})
    daemon = start_sluicegate(config, env={"PAGE_TEST_TOKEN": "page-s3cret"})
    browser.get(daemon.admin_url("/"))
    wait_for(lambda: len(browser.execute(ROWS_SCRIPT)) == 3, timeout=10, message="the rows")

    assert browser.execute(CLICK_SCRIPT, "web", 0) == "drain"
    asked = wait_for(
        lambda: (box := browser.execute(TOKEN_BOX_SCRIPT))["asking"] and box,
        timeout=SHOWS_WITHIN,
        message="the page to ask for the token after the 401",
    )
    assert asked["message"] == "Admin token:"
    browser.execute(ANSWER_SCRIPT, "wrong")  # refused: asked again, nothing changes
    wait_for(
        lambda: browser.execute(TOKEN_BOX_SCRIPT)["message"].startswith("Token refused"),
        timeout=SHOWS_WITHIN,
        message="the page to ask again after a refused token",
    )
    assert browser.execute(TOKEN_BOX_SCRIPT)["asking"]
    assert daemon.status()["upstreams"]["web"]["servers"][0]["draining"] is False

    browser.execute(ANSWER_SCRIPT, "page-s3cret")
    wait_for(
        lambda: daemon.status()["upstreams"]["web"]["servers"][0]["draining"],
        timeout=SHOWS_WITHIN,
        message="the POST with the token to drain the server",
    )
    row = wait_for(
        lambda: (r := _row(browser.execute(ROWS_SCRIPT), "web", 0))["draining"] == "true" and r,
        timeout=SHOWS_WITHIN,
        interval=0.1,
        message="the page to show the server draining",
    )
    assert row["draining"] == "true" and not browser.execute(TOKEN_BOX_SCRIPT)["asking"]
    stored = browser.execute("return sessionStorage.getItem('sluicegate-admin-token');")
    assert stored == "page-s3cret"

    # Asked once: the kept token undrains without a question.
    assert browser.execute(CLICK_SCRIPT, "web", 0) == "undrain"
    wait_for(
        lambda: not daemon.status()["upstreams"]["web"]["servers"][0]["draining"],
        timeout=SHOWS_WITHIN,
        message="the undrain",
    )
    assert not browser.execute(TOKEN_BOX_SCRIPT)["asking"]
    assert _row(browser.execute(ROWS_SCRIPT), "web", 1)["draining"] == "false"


RATE_SCRIPT = """
const section = document.querySelector(`section.upstream[data-upstream="${arguments[0]}"]`);
return {
  chart: section.querySelector(".upstream-rate").textContent,
  rows: Array.from(section.querySelectorAll("tr.server .request-rate")).map((td) => td.textContent),
};
"""


def test_rate_chart_reads_the_sum_of_the_rows(browser, start_sluicegate, spawn_backend):
    """The chart used to plot the change in `requests` between two polls, the table a
    rolling average: once traffic paused, the chart read 0.0 req/s beside rows summing
    to more. Both now come from the same per-server rates."""
    _, a = spawn_backend("a")
    _, b = spawn_backend("b")
    config = page_config(a, free_port())
    config["upstreams"]["web"]["servers"] = [
        {"url": f"http://127.0.0.1:{a}"},
        {"url": f"http://127.0.0.1:{b}"},
    ]
    daemon = start_sluicegate(config)
    browser.get(daemon.admin_url("/"))
    wait_for(lambda: len(browser.execute(ROWS_SCRIPT)) == 3, timeout=10, message="the rows")
    for _ in range(12):
        assert daemon.get("/")[0] == 200
    # Traffic has stopped; the rows still show the last 10 s. Once a poll has seen it,
    # sample over a few more polls.
    wait_for(
        lambda: float(browser.execute(RATE_SCRIPT, "web")["chart"].split()[0]) > 0,
        timeout=SHOWS_WITHIN,
        interval=0.1,
        message="the chart to show the traffic",
    )
    readings = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        reading = browser.execute(RATE_SCRIPT, "web")
        chart = float(reading["chart"].split()[0])
        rows = [float(text) for text in reading["rows"]]
        readings.append((chart, rows))
        time.sleep(0.25)
    for chart, rows in readings:
        # One decimal each: the rounded rows may sum to the rounded total +- 0.05 per row.
        assert abs(chart - sum(rows)) <= 0.05 * (len(rows) + 1), (chart, rows)
    assert all(chart > 0 for chart, _ in readings), readings
