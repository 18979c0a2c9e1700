"""`make bench`: Sluicegate against a featureless forwarder and nginx doing the same job.

Starts one fast origin (a raw-asyncio HTTP/1.1 server in this file, so the origin is not
the bottleneck), then Sluicegate (`python -m proxy run -c <generated yaml>`), the
featureless asyncio forwarder (loadtests/forwarder.py: what any Python proxy has to do and
nothing more) and nginx (generated nginx.conf, upstream keepalive) side by side, each
pinned to CPU 0, and drives them in turn with `wrk -t1 -c50` pinned to CPU 1. The
forwarder is the reference that drifts with the machine as Sluicegate does: the ratio to
it is what the features cost; the ratio to nginx is reported too. Scenarios:

- ``small``: GET of a 6-byte body, keep-alive
- ``64k``: GET of a 64 KiB body
- ``post16k``: POST of a 16 KiB body (wrk lua script)
- ``ratelimit``: a route limited through Redis with a huge rate (nothing is rejected),
  compared against Sluicegate's same request without the limit (nginx has no equivalent)
- ``cache-hit``: a small GET answered from the memory cache (the origin sends
  ``Cache-Control: public, max-age=3600`` for ``/cached/...``), compared against the same
  Sluicegate's proxied small GET of the same round and against nginx's ``proxy_cache``
- ``gzip-64k``: 64 KiB of JSON compressed with gzip at level ``GZIP_LEVEL`` (nginx's
  default ``gzip_comp_level``) by both proxies, wrk sending ``Accept-Encoding: gzip``;
  CPU per response side by side (the forwarder takes no part in these two)
- ``workers2``: the small GET with 2 workers each (no pinning; nginx worker_processes 2)

Each run records requests/s, p50 and p99 latency (wrk --latency) and the proxy's CPU
seconds per request (utime+stime of the proxy and all its descendants, /proc, before and
after). Every scenario runs ``--rounds`` times per proxy, the proxies taking turns, and
each ratio is the median of the per-round ratios of adjacent runs: on a shared machine
the drift between two runs minutes apart is larger than the differences being measured.
Prints one table with the ratios sluicegate / forwarder and sluicegate / nginx and their
range over the rounds, and
writes every run to bench-results/bench.json.
Everything started here is stopped at the end, whatever happens.

    python loadtests/bench.py [--duration 10] [--rounds 3] [--connections 50]
    python loadtests/bench.py --origin PORT     # only the origin server (used internally)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench-results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The gzip-64k scenario compresses at nginx's default gzip_comp_level, in both proxies.
GZIP_LEVEL = 1
SMALL_BODY = b"hello\n"
BIG_BODY = b"x" * (64 * 1024)


# --- the origin: a minimal keep-alive HTTP/1.1 server ----------------------------------


def _json_body(size: int) -> bytes:
    """``size`` bytes of JSON that compress like an API's answer: records of varied
    numbers and words (seeded, so every run compresses the same bytes)."""
    rng = random.Random(64)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    records = []
    text = b"[]"
    while len(text) < size - 200:
        records.append(
            {
                "id": len(records),
                "name": f"{rng.choice(words)}-{rng.randrange(10**6)}",
                "price": round(rng.uniform(0, 1000), 2),
                "stock": rng.randrange(500),
                "tags": rng.sample(words, 3),
            }
        )
        text = json.dumps(records, separators=(",", ":")).encode()
    padding = size - len(text) - len(',{"pad":""}')
    records.append({"pad": "x" * padding})
    text = json.dumps(records, separators=(",", ":")).encode()
    assert len(text) == size, len(text)
    return text


def _response(body: bytes, content_type: str = "text/plain", extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


SMALL_RESPONSE = _response(SMALL_BODY)
BIG_RESPONSE = _response(BIG_BODY)
# /cached/...: what a cache may keep for an hour (the cache-hit scenario).
CACHED_RESPONSE = _response(SMALL_BODY, extra="Cache-Control: public, max-age=3600\r\n")
# /json64k: 64 KiB of JSON for the compression scenario.
JSON_RESPONSE = _response(_json_body(64 * 1024), content_type="application/json")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


def _answer(target: bytes) -> bytes:
    if target.endswith(b"/64k"):
        return BIG_RESPONSE
    if target.startswith(b"/cached/"):
        return CACHED_RESPONSE
    if target.startswith(b"/json64k"):
        return JSON_RESPONSE
    return SMALL_RESPONSE


class OriginProtocol(asyncio.Protocol):
    """Answers ``/64k`` with 64 KiB, ``/cached/...`` with 6 bytes and
    ``Cache-Control: public, max-age=3600``, ``/json64k`` with 64 KiB of JSON, and anything
    else with 6 bytes; discards request bodies.

    Request bodies may come with Content-Length or chunked (a proxy may re-frame).
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = bytearray()
        self.body_left = 0  # Content-Length bytes still to discard
        self.chunked = False  # inside a chunked body
        self.pending = b""
        self.close_after = False

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.body_left:
                take = min(self.body_left, len(buf))
                del buf[:take]
                self.body_left -= take
                if self.body_left:
                    return
                if not self.chunked:
                    self._respond()
                continue
            if self.chunked:
                if not self._chunked_step():
                    return
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[: end + 2])
            del buf[: end + 4]
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            self.pending = _answer(target)
            self.close_after = bool(_CLOSE.search(head))
            if _CHUNKED.search(head):
                self.chunked = True
                continue
            match = _CONTENT_LENGTH.search(head)
            if match and int(match.group(1)) > 0:
                self.body_left = int(match.group(1))
                continue
            self._respond()

    def _chunked_step(self) -> bool:
        """Consume one chunk-size line (+ data) or the final trailers; False = need more."""
        buf = self.buf
        line_end = buf.find(b"\r\n")
        if line_end < 0:
            return False
        size = int(bytes(buf[:line_end]).split(b";", 1)[0] or b"0", 16)
        if size == 0:
            # The last chunk: an empty line, or trailer lines and then an empty line.
            if len(buf) < line_end + 4:
                return False
            if buf[line_end + 2 : line_end + 4] == b"\r\n":
                end = line_end + 4
            else:
                found = buf.find(b"\r\n\r\n", line_end + 2)
                if found < 0:
                    return False
                end = found + 4
            del buf[:end]
            self.chunked = False
            self._respond()
            return True
        del buf[: line_end + 2]
        self.body_left = size + 2  # the data and its CRLF
        return True

    def _respond(self) -> None:
        self.transport.write(self.pending)
        if self.close_after:
            self.transport.close()


def run_origin(port: int) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(OriginProtocol, "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(serve())


# --- process helpers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{what}: {url} not 200 within {timeout:.0f}s ({last})")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def spawn(cmd: list[str], log: Path, cpu: int | None = None) -> subprocess.Popen:
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and every live descendant (+ reaped children), in seconds."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        # fields[0] is state (field 3); ppid is field 4, utime..cstime are fields 14..17.
        ppid = int(fields[1])
        ticks = sum(int(x) for x in fields[11:15])
        stats[int(entry)] = (ppid, ticks)
    total = 0
    todo = [pid]
    seen = set()
    while todo:
        current = todo.pop()
        if current in seen or current not in stats:
            continue
        seen.add(current)
        total += stats[current][1]
        todo.extend(p for p, (ppid, _) in stats.items() if ppid == current)
    return total / CLK_TCK


# --- wrk -----------------------------------------------------------------------------

POST_LUA = """
wrk.method = "POST"
wrk.body = string.rep("p", 16384)
wrk.headers["Content-Type"] = "application/octet-stream"
"""

ONE_WORKER_SCENARIOS = ["small", "64k", "post16k", "cache-hit", "gzip-64k"]
SCENARIOS = [*ONE_WORKER_SCENARIOS, "ratelimit", "workers2"]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not match:
        raise ValueError(value)
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Run:
    target: str
    url: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    cpu_s_per_req: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)


def run_wrk(
    url: str,
    duration: float,
    connections: int,
    script: Path | None,
    wrk_cpu: int | None,
    headers: tuple[str, ...] = (),
) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    for header in headers:
        cmd += ["-H", header]
    cmd.append(url)
    if wrk_cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(wrk_cpu), *cmd]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 30, check=False
    ).stdout
    result = {"requests": 0, "rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "non_2xx": 0, "errors": 0}
    if match := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["rps"] = float(match.group(1))
    if match := re.search(r"(\d+) requests in", out):
        result["requests"] = int(match.group(1))
    if match := re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE):
        result["p50_ms"] = _ms(match.group(1))
    if match := re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE):
        result["p99_ms"] = _ms(match.group(1))
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        result["non_2xx"] = int(match.group(1))
    if match := re.search(r"Socket errors: (.*)", out):
        result["errors"] = sum(int(n) for n in re.findall(r"\d+", match.group(1)))
    if result["requests"] == 0:
        result["raw"] = out[-2000:]
    return result


def measure(
    target: str,
    url: str,
    pid: int,
    *,
    duration: float,
    connections: int,
    script: Path | None = None,
    wrk_cpu: int | None = 1,
    headers: tuple[str, ...] = (),
) -> Run:
    before = cpu_seconds(pid)
    result = run_wrk(url, duration, connections, script, wrk_cpu, headers)
    used = cpu_seconds(pid) - before
    run = Run(target=target, url=url)
    run.rps, run.p50_ms, run.p99_ms = result["rps"], result["p50_ms"], result["p99_ms"]
    run.requests, run.non_2xx, run.socket_errors = (
        result["requests"],
        result["non_2xx"],
        result["errors"],
    )
    if run.requests:
        run.cpu_s_per_req = used / run.requests
    else:
        run.error = "no requests completed: " + result.get("raw", "")[-300:]
    return run


# --- the two proxies ------------------------------------------------------------------


def sluicegate_config(
    port: int, admin_port: int, origin_port: int, redis_port: int | None, workers: int
) -> str:
    redis = (
        f"redis: {{url: 'redis://127.0.0.1:{redis_port}/0', timeout: 50ms}}\n" if redis_port else ""
    )
    limited = (
        "  - name: limited\n"
        "    match: {path_prefix: /limited/}\n"
        "    upstream: origin\n"
        "    strip_prefix: true\n"
        "    rate_limit: {rate: 100000000/s, burst: 100000000, key: client_ip}\n"
        if redis_port
        else ""
    )
    return (
        f"listen:\n  - address: 127.0.0.1:{port}\n"
        f"admin: {{address: 127.0.0.1:{admin_port}}}\n"
        f"workers: {workers}\n"
        # Access log on, as in production: nginx below logs too (buffered, like ours).
        "logging: {level: warning, access_log: true, format: json}\n"
        f"{redis}"
        "cache: {store: memory}\n"
        "upstreams:\n"
        "  origin:\n"
        "    policy: round_robin\n"
        f"    servers: [{{url: 'http://127.0.0.1:{origin_port}'}}]\n"
        "    keepalive: 128\n"
        "routes:\n"
        f"{limited}"
        "  - name: cached\n"
        "    match: {path_prefix: /cached/}\n"
        "    upstream: origin\n"
        "    cache: {}\n"
        "  - name: gzip\n"
        "    match: {path_prefix: /json64k}\n"
        "    upstream: origin\n"
        f"    compress: {{algorithms: [gzip], level: {GZIP_LEVEL}}}\n"
        "  - name: default\n"
        "    match: {path_prefix: /}\n"
        "    upstream: origin\n"
    )


def nginx_config(workdir: Path, port: int, origin_port: int, workers: int) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes {workers};
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {workdir}/access.log combined buffer=64k flush=1s;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    client_max_body_size 10m;
    client_body_buffer_size 64k;
    proxy_buffers 16 16k;
    keepalive_requests 100000;
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 128;
        keepalive_requests 100000;
    }}
    proxy_cache_path {workdir}/cache keys_zone=bench:10m;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        location / {{
            proxy_pass http://origin;
        }}
        location /cached/ {{
            proxy_pass http://origin;
            proxy_cache bench;
            add_header Cache-Status $upstream_cache_status;  # as Sluicegate says it
        }}
        location /json64k {{
            proxy_pass http://origin;
            gzip on;
            gzip_types application/json;
            gzip_comp_level {GZIP_LEVEL};
        }}
    }}
}}
"""


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.cpus = os.cpu_count() or 1
        self.pin = self.cpus >= 2 and shutil.which("taskset") is not None
        self.origin_port = free_port()
        self.redis_port: int | None = None
        self.post_lua = workdir / "post16k.lua"
        self.post_lua.write_text(POST_LUA)
        self.runs: dict[str, dict[str, list[Run]]] = {}

    def _start(self, cmd: list[str], name: str, cpu: int | None, port: int) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        proc = spawn(cmd, log, cpu if self.pin else None)
        self.procs.append(proc)
        try:
            wait_port(port, proc, name)
        except RuntimeError as exc:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{exc}: {' | '.join(tail)}") from None
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()

    def start_origin(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--origin", str(self.origin_port)]
        self._start(cmd, "origin", 1, self.origin_port)

    def start_redis(self) -> None:
        if not shutil.which("redis-server"):
            print("redis-server not found: skipping the ratelimit scenario", file=sys.stderr)
            return
        self.redis_port = free_port()
        cmd = [
            "redis-server",
            "--port",
            str(self.redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        self._start(cmd, "redis", 1, self.redis_port)

    def start_sluicegate(self, workers: int) -> tuple[subprocess.Popen, int]:
        port, admin = free_port(), free_port()
        config = self.workdir / f"sluicegate-w{workers}.yaml"
        config.write_text(
            sluicegate_config(port, admin, self.origin_port, self.redis_port, workers)
        )
        cmd = [sys.executable, "-m", "proxy", "run", "-c", str(config)]
        proc = self._start(cmd, f"sluicegate-w{workers}", 0 if workers == 1 else None, port)
        wait_http(f"http://127.0.0.1:{admin}/healthz", proc, "sluicegate admin")
        return proc, port

    def start_forwarder(self, workers: int) -> tuple[subprocess.Popen, int]:
        port = free_port()
        cmd = [
            sys.executable,
            str(REPO_ROOT / "loadtests" / "forwarder.py"),
            "--listen",
            f"127.0.0.1:{port}",
            "--origin",
            f"127.0.0.1:{self.origin_port}",
            "--workers",
            str(workers),
        ]
        proc = self._start(cmd, f"forwarder-w{workers}", 0 if workers == 1 else None, port)
        return proc, port

    def start_nginx(self, workers: int) -> tuple[subprocess.Popen, int]:
        port = free_port()
        conf_dir = self.workdir / f"nginx-w{workers}"
        conf_dir.mkdir()
        conf = conf_dir / "nginx.conf"
        conf.write_text(nginx_config(conf_dir, port, self.origin_port, workers))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        cmd = [nginx, "-p", str(conf_dir), "-c", str(conf), "-e", str(conf_dir / "error.log")]
        proc = self._start(cmd, f"nginx-w{workers}", 0 if workers == 1 else None, port)
        return proc, port

    def _measure(self, scenario: str, target: str, pid: int, url: str, **kw) -> None:
        duration = self.args.duration
        wrk_cpu = 1 if self.pin and kw.pop("pinned", True) else None
        run = measure(
            target,
            url,
            pid,
            duration=duration,
            connections=self.args.connections,
            wrk_cpu=wrk_cpu,
            **kw,
        )
        self.runs.setdefault(scenario, {}).setdefault(target, []).append(run)
        print(
            f"  {scenario:<10} {target:<22} {run.rps:>10.0f} req/s  p50 {run.p50_ms:7.2f} ms"
            f"  p99 {run.p99_ms:7.2f} ms  non-2xx {run.non_2xx}"
            + (f"  ERROR {run.error}" if run.error else ""),
            flush=True,
        )

    def warm(self, url: str) -> None:
        run_wrk(url, 1, self.args.connections, None, 1 if self.pin else None)

    def compare(self, targets: list[str], workers: int) -> None:
        """Start every proxy with ``workers`` workers side by side, then measure each
        scenario in rounds, the proxies taking turns (the order flips every round).

        Shared machines drift by tens of percent over minutes; runs seconds apart see the
        same machine, so each round's ratio pairs adjacent runs and the report takes the
        median over rounds. The idle proxy costs nothing meanwhile.
        """
        scenarios = [
            scenario
            for scenario in (["workers2"] if workers == 2 else ONE_WORKER_SCENARIOS)
            if scenario in self.args.scenarios
        ]
        if not scenarios:
            return
        started: dict[str, tuple[subprocess.Popen, int]] = {}
        try:
            starters = {
                "sluicegate": self.start_sluicegate,
                "forwarder": self.start_forwarder,
                "nginx": self.start_nginx,
            }
            for target in targets:
                start = starters[target]
                try:
                    started[target] = start(workers)
                except RuntimeError as exc:
                    print(f"  {target} (workers {workers}) did not start: {exc}", file=sys.stderr)
                    for scenario in scenarios:
                        run = Run(target=target, url="", error=f"did not start: {exc}")
                        self.runs.setdefault(scenario, {}).setdefault(target, []).append(run)
            for _, port in started.values():
                self.warm(f"http://127.0.0.1:{port}/small")
            order = list(started)
            for round_number in range(1, self.args.rounds + 1):
                print(f" round {round_number}/{self.args.rounds}, workers {workers}", flush=True)
                for scenario in scenarios:
                    for target in order:
                        self._measure_scenario(scenario, target, *started[target])
                order.reverse()
        finally:
            for proc, _ in started.values():
                self.procs.remove(proc)
                stop_process(proc)

    def _measure_scenario(
        self, scenario: str, target: str, proc: subprocess.Popen, port: int
    ) -> None:
        base = f"http://127.0.0.1:{port}"
        if scenario == "workers2":
            self._measure(scenario, target, proc.pid, base + "/small", pinned=False)
        elif scenario == "small":
            self._measure(scenario, target, proc.pid, base + "/small")
            if target == "sluicegate" and self.redis_port and "ratelimit" in self.args.scenarios:
                # Its reference is the run just before: the same route without the limit.
                self._measure("ratelimit", "sluicegate+redis", proc.pid, base + "/limited/small")
        elif scenario == "64k":
            self._measure(scenario, target, proc.pid, base + "/64k")
        elif scenario in ("cache-hit", "gzip-64k"):
            if target == "forwarder":
                return  # it neither caches nor compresses
            if scenario == "cache-hit":
                self._measure(scenario, target, proc.pid, base + "/cached/small")
            else:
                headers = ("Accept-Encoding: gzip",)
                self._measure(scenario, target, proc.pid, base + "/json64k", headers=headers)
        else:
            self._measure(scenario, target, proc.pid, base + "/post", script=self.post_lua)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if a and b else None


def round_ratios(subjects: list[Run], references: list[Run], attribute: str) -> list[float]:
    """One ratio per round, subject over reference, for the rounds where both measured."""
    ratios = []
    for subject, reference in zip(subjects, references, strict=False):
        if subject.error or reference.error:
            continue
        value = ratio(getattr(subject, attribute), getattr(reference, attribute))
        if value is not None:
            ratios.append(value)
    return ratios


def median_run(runs: list[Run]) -> dict | None:
    """Each figure's median over the runs that completed (one Run-shaped dict)."""
    good = [run for run in runs if not run.error]
    if not good:
        return asdict(runs[-1]) if runs else None
    summary = asdict(good[0])
    for name in ("rps", "p50_ms", "p99_ms", "cpu_s_per_req", "requests", "non_2xx"):
        summary[name] = statistics.median(getattr(run, name) for run in good)
    summary["rounds"] = len(good)
    return summary


def _comparisons(runs: dict[str, dict[str, list[Run]]]):
    """(scenario, subjects, reference name, references): Sluicegate against the forwarder
    and against nginx in each scenario; the Redis-limited route against the same route
    unlimited; a cache hit against the same proxy's proxied small GET, and against nginx's
    proxy_cache; gzip against nginx's gzip."""
    scenarios = ("small", "64k", "post16k", "ratelimit", "cache-hit", "gzip-64k", "workers2")
    for scenario in scenarios:
        if scenario == "ratelimit":
            subjects = runs.get("ratelimit", {}).get("sluicegate+redis", [])
            if subjects:  # not without redis-server, or with --only nginx
                references = runs.get("small", {}).get("sluicegate", [])
                yield scenario, subjects, "sluicegate (no limit)", references
            continue
        subjects = runs.get(scenario, {}).get("sluicegate", [])
        if scenario == "cache-hit" and subjects:
            references = runs.get("small", {}).get("sluicegate", [])
            yield scenario, subjects, "sluicegate (proxied)", references
        # The forwarder neither caches nor compresses: nginx is the only other reference.
        names = ("nginx",) if scenario in ("cache-hit", "gzip-64k") else ("forwarder", "nginx")
        for reference_name in names:
            references = runs.get(scenario, {}).get(reference_name, [])
            if subjects or references:
                yield scenario, subjects, reference_name, references


def scenario_rows(runs: dict[str, dict[str, list[Run]]]) -> list[dict]:
    rows = []
    for scenario, subjects, reference_name, references in _comparisons(runs):
        per_round = {
            "rps": round_ratios(subjects, references, "rps"),
            "p50": round_ratios(subjects, references, "p50_ms"),
            "p99": round_ratios(subjects, references, "p99_ms"),
            "cpu_per_req": round_ratios(subjects, references, "cpu_s_per_req"),
        }
        rows.append(
            {
                "scenario": scenario,
                "reference": reference_name,
                "sluicegate": median_run(subjects),
                reference_name: median_run(references),
                "ratio": {k: statistics.median(v) if v else None for k, v in per_round.items()},
                "ratio_per_round": per_round,
                "runs": {
                    "sluicegate": [asdict(run) for run in subjects],
                    reference_name: [asdict(run) for run in references],
                },
            }
        )
    return rows


# The performance targets: (scenario, reference, ratio, bound, "min" or "max"). Against
# the featureless forwarder, which drifts with the machine as Sluicegate does.
TARGETS = (
    ("small", "forwarder", "rps", 0.8, "min"),
    ("small", "forwarder", "p99", 1.5, "max"),
    ("64k", "forwarder", "rps", 0.9, "min"),
    ("64k", "forwarder", "p99", 1.5, "max"),
    ("ratelimit", "sluicegate (no limit)", "rps", 0.8, "min"),
)


def target_verdicts(rows: list[dict]) -> list[dict]:
    """Each target against the median ratio measured: met, not met, or not measured."""
    ratios = {(row["scenario"], row["reference"]): row["ratio"] for row in rows}
    verdicts = []
    for scenario, reference, name, bound, kind in TARGETS:
        value = ratios.get((scenario, reference), {}).get(name)
        met = None if value is None else (value >= bound if kind == "min" else value <= bound)
        verdicts.append(
            {
                "scenario": scenario,
                "reference": reference,
                "ratio": name,
                "bound": bound,
                "kind": kind,
                "value": value,
                "met": met,
            }
        )
    return verdicts


def report(bench: Bench, args: argparse.Namespace) -> dict:
    rows = scenario_rows(bench.runs)
    verdicts = target_verdicts(rows)

    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value else "-"

    def spread(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}" if values else "-"

    header = (
        f"{'scenario':<10} {'vs':<22} {'sg req/s':>9} {'ref req/s':>9} {'rps x':>6}"
        f" {'range':>9} {'sg p50':>7} {'ref p50':>7} {'sg p99':>7} {'ref p99':>7}"
        f" {'p99 x':>6} {'sg us/req':>9} {'ref us/req':>10} {'cpu x':>6}"
    )
    print()
    print(
        f"sluicegate vs each reference, median of {args.rounds} rounds (x = sluicegate / reference,"
        " paired within each round; latency in ms, CPU in us/request)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row["sluicegate"] or {}
        r = row[row["reference"]] or {}
        print(
            f"{row['scenario']:<10} {row['reference']:<22}"
            f" {fmt(s.get('rps'), '.0f'):>9} {fmt(r.get('rps'), '.0f'):>9}"
            f" {fmt(row['ratio']['rps'], '.2f'):>6} {spread(row['ratio_per_round']['rps']):>9}"
            f" {fmt(s.get('p50_ms'), '.2f'):>7} {fmt(r.get('p50_ms'), '.2f'):>7}"
            f" {fmt(s.get('p99_ms'), '.2f'):>7} {fmt(r.get('p99_ms'), '.2f'):>7}"
            f" {fmt(row['ratio']['p99'], '.2f'):>6}"
            f" {fmt((s.get('cpu_s_per_req') or 0) * 1e6, '.1f'):>9}"
            f" {fmt((r.get('cpu_s_per_req') or 0) * 1e6, '.1f'):>10}"
            f" {fmt(row['ratio']['cpu_per_req'], '.2f'):>6}"
        )
    print("\ntargets (ratio sluicegate / reference, median over the rounds):")
    for verdict in verdicts:
        sign = ">=" if verdict["kind"] == "min" else "<="
        value = verdict["value"]
        outcome = {True: "met", False: "NOT met", None: "not measured"}[verdict["met"]]
        print(
            f"  {verdict['scenario']:<10} vs {verdict['reference']:<22} {verdict['ratio']:<5}"
            f" {sign} {verdict['bound']:<5}"
            f" {'-' if value is None else f'{value:.2f}':>5}  {outcome}"
        )
    nginx_version = subprocess.run(
        [shutil.which("nginx") or "/usr/sbin/nginx", "-v"],
        capture_output=True,
        text=True,
        check=False,
    ).stderr.strip()
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "connections": args.connections,
            "wrk_threads": 1,
            "pinned": bench.pin,
            "proxy_cpu": 0 if bench.pin else None,
            "wrk_cpu": 1 if bench.pin else None,
            "access_logs": "on for both (sluicegate json to a file, nginx combined buffered)",
        },
        "environment": {
            "cpus": bench.cpus,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "nginx": nginx_version,
        },
        "results": rows,
        "targets": verdicts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per proxy and scenario, taking turns"
    )
    parser.add_argument("--origin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", choices=["sluicegate", "forwarder", "nginx"], help="benchmark one proxy only"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {','.join(SCENARIOS)} (cache-hit and ratelimit bring small,"
        " their reference)",
    )
    args = parser.parse_args(argv)
    chosen = set(args.scenarios.split(","))
    unknown = chosen - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if chosen & {"cache-hit", "ratelimit"}:
        chosen.add("small")
    args.scenarios = chosen
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    if args.origin:
        run_origin(args.origin)
        return 0
    for tool in ("wrk",):
        if not shutil.which(tool):
            print(f"bench: {tool} not found (scripts/ensure-tools.sh bench)", file=sys.stderr)
            return 1
    targets = [args.only] if args.only else ["sluicegate", "forwarder", "nginx"]
    if "nginx" in targets and not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("bench: nginx not found (scripts/ensure-tools.sh bench)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="sluicegate-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers may run as another user
        bench = Bench(args, workdir)
        try:
            bench.start_origin()
            if "sluicegate" in targets and "ratelimit" in args.scenarios:
                bench.start_redis()
            print(
                f"origin 127.0.0.1:{bench.origin_port}; wrk -t1 -c{args.connections}"
                f" -d{args.duration:g}s; pinned: {bench.pin}",
                flush=True,
            )
            for workers in (1, 2):
                bench.compare(targets, workers)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.stop_all()
        results = report(bench, args)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "bench.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
