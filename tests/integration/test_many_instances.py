"""Three ``sluicegate run`` instances behind a real HAProxy, sharing one real Redis.

The instances listen on 127.0.0.2, 127.0.0.3 and 127.0.0.4 (all of 127.0.0.0/8 is
loopback), each with its admin API on the same address. HAProxy balances TCP connections
over them and checks each one's ``/readyz`` every 200 ms (``fall 1 rise 1``), as an L4
balancer in front of a fleet would. What must hold:

- a rate limit (``key: route``) is one limit for the fleet, not one per instance;
- a rolling restart (SIGTERM, wait for the exit, start again, wait until HAProxy sends
  to it again, next) under steady keep-alive and new-connection load loses no request;
- SIGKILL of one instance loses only the requests it had in flight.

HAProxy is the Debian package (``haproxy -f cfg -db``). Without it the tests skip, except
under CI (env ``CI`` set), where a missing tool is a failure.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, start_daemon, wait_for

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
INSTANCE_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
BURST = 30


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture
def haproxy_binary() -> str:
    if not os.access(HAPROXY, os.X_OK):
        message = "install haproxy (Debian package haproxy)"
        if os.environ.get("CI"):
            pytest.fail(f"haproxy missing under CI: {message}")
        pytest.skip(message)
    return HAPROXY


def _instance_config(host: str, backend_port: int, redis_url: str) -> dict:
    return {
        "listen": [{"address": f"{host}:{_free_port(host)}"}],
        "admin": {"address": f"{host}:{_free_port(host)}"},
        "workers": 1,
        # HAProxy checks every 200 ms: it notices well within the drain, even on a busy
        # machine, and stops sending before the listener closes.
        "drain_time": "1500ms",
        "shutdown_timeout": "10s",
        # A generous Redis timeout: on a busy test machine a 50 ms one would fall back to
        # the local buckets now and then, and the shared limit must be exact here.
        "redis": {"url": redis_url, "timeout": "2s", "instances": len(INSTANCE_HOSTS)},
        "upstreams": {
            "app": {
                "servers": [{"url": f"http://127.0.0.1:{backend_port}"}],
                "retry": {"tries": 1},
                "timeouts": {"read": "10s"},
            }
        },
        "routes": [
            {
                "name": "limited",
                "match": {"path_prefix": "/limited/"},
                "upstream": "app",
                "strip_prefix": True,
                "rate_limit": {"rate": "1/h", "burst": BURST, "key": "route"},
            },
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
        "logging": {"access_log": False},
    }


def _haproxy_config(port: int, stats_socket: Path, instances: list[Daemon]) -> str:
    servers = "\n".join(
        f"    server sg{i} {d.host}:{d.port} check port {d.admin_port} inter 200ms fall 1 rise 1"
        for i, d in enumerate(instances)
    )
    return f"""
global
    maxconn 2000
    stats socket {stats_socket} level admin

defaults
    mode tcp
    timeout connect 1s
    timeout client 15s
    timeout server 15s
    timeout check 1s
    # A connection refused by a stopped instance is tried again on another one.
    retries 3
    option redispatch 1

frontend fleet
    bind 127.0.0.1:{port}
    default_backend sluicegates

backend sluicegates
    balance roundrobin
    option httpchk GET /readyz
{servers}
"""


class HAProxy:
    def __init__(self, binary: str, workdir: Path, instances: list[Daemon]) -> None:
        self.port = _free_port("127.0.0.1")
        self.stats_socket = workdir / "haproxy.sock"
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(_haproxy_config(self.port, self.stats_socket, instances))
        self.log_path = workdir / "haproxy.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "-f", str(self.config_path), "-db"], stdout=log, stderr=log
            )

    def server_states(self) -> dict[str, str]:
        """``show stat`` over the stats socket: server name -> UP / DOWN / ..."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(self.stats_socket))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        name, status = header.index("svname"), header.index("status")
        states = {}
        for line in lines[1:]:
            fields = line.split(",")
            if len(fields) > status and fields[name].startswith("sg"):
                states[fields[name]] = fields[status].split(" ")[0]
        return states

    def wait_state(self, server: str, state: str, timeout: float = 10.0) -> None:
        wait_for(
            lambda: self.server_states().get(server) == state,
            timeout=timeout,
            message=f"haproxy sees {server} {state}",
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Fleet:
    tmp_path: Path
    instances: list[Daemon]
    haproxy: HAProxy
    names: list[str] = field(default_factory=list)

    def restart(self, index: int) -> Daemon:
        old = self.instances[index]
        daemon = start_daemon(self.tmp_path, old.config, name=self.names[index])
        self.instances[index] = daemon
        return daemon

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.haproxy.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@pytest.fixture
def fleet(tmp_path, haproxy_binary, redis_server, spawn_backend):
    _, backend = spawn_backend("app")
    names = [f"sluicegate-{host}" for host in INSTANCE_HOSTS]
    instances = [
        start_daemon(tmp_path, _instance_config(host, backend, redis_server.url), name=name)
        for host, name in zip(INSTANCE_HOSTS, names, strict=True)
    ]
    haproxy = HAProxy(haproxy_binary, tmp_path, instances)
    fleet = Fleet(tmp_path, instances, haproxy, names)
    try:
        for i in range(len(instances)):
            haproxy.wait_state(f"sg{i}", "UP")
        yield fleet
    finally:
        haproxy.stop()
        for daemon in fleet.instances:
            daemon.stop(signal.SIGKILL)


def _requests_on(daemon: Daemon, route: str) -> float:
    total = 0.0
    for line in daemon.metrics().splitlines():
        if line.startswith("sluicegate_requests_total{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _in_flight(daemon: Daemon) -> float:
    for line in daemon.metrics().splitlines():
        if line.startswith("sluicegate_in_flight_requests "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no sluicegate_in_flight_requests")


def test_a_rate_limit_is_exact_across_the_fleet(fleet):
    requests = 120
    statuses = [fleet.get("/limited/")[0] for _ in range(requests)]
    admitted = statuses.count(200)
    print(f"rate limit across 3 instances: {admitted} admitted of {requests} (burst {BURST})")
    assert admitted == BURST, statuses
    assert statuses.count(429) == requests - BURST
    # Every instance took its share of the requests: the limit was shared, not local.
    per_instance = [_requests_on(d, "limited") for d in fleet.instances]
    assert all(n >= requests / 6 for n in per_instance), per_instance


class Load:
    """Steady traffic through HAProxy: some clients keep their connection alive (and open
    a new one when told ``Connection: close``), others open one per request. Every request
    that does not end in a 2xx answer counts as lost: nothing is retried."""

    def __init__(self, port: int, *, keepalive: int, fresh: int, path: str = "/") -> None:
        self.port = port
        self.path = path
        self.ok = 0
        self.failures: list[tuple[float, str]] = []  # (sent at, what happened)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(True,)) for _ in range(keepalive)
        ] + [threading.Thread(target=self._client, args=(False,)) for _ in range(fresh)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self, keepalive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            sent = time.monotonic()
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                response.read()
                outcome = None if 200 <= response.status < 300 else f"status {response.status}"
            except (OSError, http.client.HTTPException) as error:
                outcome = f"{type(error).__name__}: {error}"
                conn.close()
                conn = None
            with self._lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append((sent, outcome))
            if not keepalive and conn is not None:
                conn.close()
                conn = None
            time.sleep(0.005)  # bounded: a steady stream, not a stress test
        if conn is not None:
            conn.close()


def test_a_rolling_restart_loses_no_request(fleet):
    haproxy = fleet.haproxy
    with Load(haproxy.port, keepalive=4, fresh=2) as load:
        time.sleep(0.5)
        for index in range(len(fleet.instances)):
            daemon = fleet.instances[index]
            daemon.signal(signal.SIGTERM)
            haproxy.wait_state(f"sg{index}", "DOWN", timeout=1.5)  # /readyz said 503
            assert daemon.wait_exit(20) == 0
            restarted = fleet.restart(index)
            wait_for(lambda d=restarted: d.admin("GET", "/readyz")[0] == 200, message="ready")
            haproxy.wait_state(f"sg{index}", "UP")
            time.sleep(0.3)  # it takes traffic again before the next one goes
        time.sleep(0.5)
    total = load.ok + len(load.failures)
    print(f"rolling restart of 3 instances: {len(load.failures)} lost of {total} requests")
    assert load.failures == [], load.failures[:5]
    assert load.ok > 300


def test_sigkill_loses_only_what_the_instance_had_in_flight(fleet):
    haproxy = fleet.haproxy
    slow_results: list[str] = []
    lock = threading.Lock()

    def slow() -> None:
        try:
            status, _ = fleet.get("/delay/3000", timeout=15)
            outcome = "ok" if status == 200 else f"status {status}"
        except (OSError, http.client.HTTPException) as error:
            outcome = type(error).__name__
        with lock:
            slow_results.append(outcome)

    # Nine slow requests, one connection each: HAProxy deals them round robin.
    slow_threads = [threading.Thread(target=slow) for _ in range(9)]
    for thread in slow_threads:
        thread.start()
    wait_for(
        lambda: sum(_in_flight(d) for d in fleet.instances) == 9,
        timeout=5,
        message="9 slow requests in flight",
    )
    victim = fleet.instances[1]
    on_victim = int(_in_flight(victim))
    assert on_victim >= 1
    with Load(haproxy.port, keepalive=0, fresh=3) as load:
        time.sleep(0.3)
        victim.signal(signal.SIGKILL)
        victim.wait_exit(5)
        dead_at = time.monotonic()
        haproxy.wait_state("sg1", "DOWN")
        time.sleep(1.0)
    for thread in slow_threads:
        thread.join(15)
    lost_slow = len([r for r in slow_results if r != "ok"])
    print(
        f"SIGKILL: {lost_slow} slow requests lost, {on_victim} were in flight on the victim; "
        f"fresh-connection load: {len(load.failures)} lost of {load.ok + len(load.failures)}"
    )
    assert lost_slow == on_victim, slow_results
    assert len(slow_results) == 9
    # Requests sent once the victim is dead all succeed (HAProxy redispatches a refused
    # connect). One already on its way may fail: accepted by the kernel into the
    # victim's backlog, it was in flight there. Each client has one request at a time.
    assert all(sent < dead_at for sent, _ in load.failures), load.failures
    assert len(load.failures) <= 3
    assert load.ok > 50
