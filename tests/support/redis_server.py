"""pytest plugin: throwaway Redis processes on free 127.0.0.1 ports.

- ``redis_server`` (function scoped, so every test starts from an empty Redis) yields a
  ``RedisServer`` with ``.url``, ``.port``, ``.stop()`` (kill it, for outage tests),
  ``.start()`` (start it again on the same port). No persistence, no snapshot files.
- ``redis_sentinel`` yields a ``SentinelSet``: one master, one replica and three
  ``redis-sentinel`` processes watching it as ``SentinelSet.MASTER`` with a short
  ``down-after-milliseconds``, so killing the master promotes the replica in a few
  seconds. The data nodes require ``.password`` (``requirepass``, ``masterauth``); the
  sentinels require none. ``redis_sentinel_with_password`` is the same set whose
  sentinels require ``.password`` too (as Helm charts set them up).
- ``redis_cluster`` yields a ``ClusterSet``: three masters and three replicas made into
  one cluster by ``redis-cli --cluster create``, with a short ``cluster-node-timeout``
  so a killed master's replica takes over in a few seconds; every node requires
  ``.password``.

Everything runs in a temp dir and every process is killed at teardown. When a binary
is missing the test is skipped, except under CI (env ``CI`` set), where a missing tool
must not hide the Redis tests: it fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _debug_command_flag(binary: str) -> list[str]:
    # Redis 7 refuses DEBUG (used to simulate a slow server) unless enabled; Redis 6
    # does not know the option and would refuse to start with it.
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    version = out.split("v=", 1)[1].split()[0] if "v=" in out else "0"
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    return ["--enable-debug-command", "local"] if major >= 7 else []


class RedisServer:
    """One redis-server process, restartable on the same port.

    ``args`` are more ``redis-server`` options (e.g. replication, cluster);
    ``password`` is the one the server requires, if any.
    """

    def __init__(
        self,
        binary: str,
        port: int,
        *,
        args: tuple[str, ...] = (),
        password: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.binary = binary
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.url = f"redis://127.0.0.1:{port}/0"
        self.password = password
        self.workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.extra_args = [*_debug_command_flag(binary), *args]
        if password is not None:
            self.extra_args += ["--requirepass", password, "--masterauth", password]
        if workdir is not None:
            self.extra_args += ["--dir", str(workdir)]

    @property
    def running(self) -> bool:
        """Alive and answering (not frozen)."""
        return self._process is not None and self._process.poll() is None and not self.frozen

    def start(self) -> None:
        """Start the server (again) on ``self.port`` and wait until it answers PING."""
        if self.running:
            return
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        # A throwaway server: no snapshots, no append-only file left behind.
        command += ["--save", "", "--appendonly", "no", *self.extra_args]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(
            port=self.port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()

    def freeze(self) -> None:
        """Stop the process (SIGSTOP): its port still accepts connections, nothing is
        answered, as with a host that hangs. ``stop()`` still kills it."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def stop(self) -> None:
        """Kill the server at once, as a crash would (SIGKILL), and reap it."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(timeout=START_TIMEOUT)
        self._process = None
        self.frozen = False

    def client(self) -> redis.Redis:
        """A plain synchronous client, for looking into the server from a test."""
        return redis.Redis(
            port=self.port, password=self.password, socket_timeout=5, decode_responses=True
        )


def _need(tool: str) -> str:
    binary = shutil.which(tool)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed, and CI must run the Redis tests")
        pytest.skip(f"install {tool} to run the Redis tests")
    return binary


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` (connection errors count as not yet) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SentinelSet:
    """A master, its replica and three sentinels: ``.nodes`` are the sentinels' addresses."""

    MASTER = "sg-master"
    DOWN_AFTER_MS = 500
    FAILOVER_TIMEOUT_MS = 2000

    def __init__(
        self,
        server_binary: str,
        sentinel_binary: str,
        workdir: Path,
        *,
        sentinels_need_password: bool = False,
    ) -> None:
        self.password = "pw-" + secrets.token_hex(8)
        # The sentinels' own requirepass (None: they take commands without AUTH).
        self.sentinel_password = self.password if sentinels_need_password else None
        self.workdir = workdir
        # In the temp dir: a replica writes the RDB it syncs from its master to disk.
        self.master = RedisServer(
            server_binary, _free_port(), password=self.password, workdir=workdir
        )
        self.replica = RedisServer(
            server_binary,
            _free_port(),
            password=self.password,
            workdir=workdir,
            args=("--replicaof", "127.0.0.1", str(self.master.port)),
        )
        for server in (self.master, self.replica):
            server.extra_args += ["--repl-diskless-sync-delay", "0"]
        self.servers = {self.master.port: self.master, self.replica.port: self.replica}
        self._sentinel_binary = sentinel_binary
        self.sentinel_ports = [_free_port() for _ in range(3)]
        self.nodes = [f"127.0.0.1:{port}" for port in self.sentinel_ports]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.master.start()
        self.replica.start()

        def synced() -> bool:
            with self.replica.client() as client:
                return client.info("replication")["master_link_status"] == "up"

        wait_until(synced, START_TIMEOUT, "the replica to sync")
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel auth-pass {self.MASTER} {self.password}\n"
                f"sentinel down-after-milliseconds {self.MASTER} {self.DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.MASTER} {self.FAILOVER_TIMEOUT_MS}\n"
                # Also what each sentinel says to the others.
                + (f"requirepass {self.sentinel_password}\n" if self.sentinel_password else "")
            )
            self._sentinels.append(
                subprocess.Popen(
                    [self._sentinel_binary, str(conf)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        # A failover needs the sentinels to know each other and the replica (they learn
        # it from the master's hello channel, every second or two).
        wait_until(self._sentinels_ready, 20.0, "the sentinels to see each other")

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            with self._sentinel_client(port) as client:
                state = client.sentinel_master(self.MASTER)
                if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                    return False
        return True

    def master_port(self) -> int:
        """The port of the master as the first sentinel sees it now."""
        with self._sentinel_client(self.sentinel_ports[0]) as client:
            return int(client.sentinel_get_master_addr_by_name(self.MASTER)[1])

    def _sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port, password=self.sentinel_password, socket_timeout=1, decode_responses=True
        )

    def kill_master(self, *, freeze: bool = False) -> int:
        """SIGKILL (or ``freeze``: SIGSTOP) the current master; returns its port."""
        port = self.master_port()
        self.kill(port, freeze=freeze)
        return port

    def kill(self, port: int, *, freeze: bool = False) -> None:
        if freeze:
            self.servers[port].freeze()
        else:
            self.servers[port].stop()

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> int:
        """Wait until every sentinel names a new master and it accepts writes."""

        def promoted() -> bool:
            named = set()
            for sentinel_port in self.sentinel_ports:
                with self._sentinel_client(sentinel_port) as client:
                    named.add(int(client.sentinel_get_master_addr_by_name(self.MASTER)[1]))
            if len(named) != 1 or old_port in named:
                return False
            with self.servers[named.pop()].client() as client:
                return client.info("replication")["role"] == "master"

        wait_until(promoted, timeout, "the sentinels to promote the replica")
        return self.master_port()

    def redis_config(self, **extra) -> dict:
        """The proxy's ``redis`` section for this set (password from ``password_env``)."""
        return {
            "mode": "sentinel",
            "nodes": list(self.nodes),
            "master": self.MASTER,
            "password_env": PASSWORD_ENV,
            **extra,
        }

    def stop(self) -> None:
        for process in self._sentinels:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=START_TIMEOUT)
        self._sentinels.clear()
        for server in self.servers.values():
            server.stop()


class ClusterSet:
    """Three masters and three replicas in one Redis Cluster: ``.nodes`` are all six."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, server_binary: str, cli_binary: str, workdir: Path) -> None:
        self.password = "pw-" + secrets.token_hex(8)
        self.workdir = workdir
        self._cli = cli_binary
        ports = _free_cluster_ports(6)
        self.servers = {
            port: RedisServer(
                server_binary,
                port,
                password=self.password,
                workdir=workdir,
                args=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
                    "--logfile", f"redis-{port}.log",
                    # Replicas sync at once, and fail over however old their data: a
                    # replica that never synced must not keep the cluster down.
                    "--repl-diskless-sync-delay", "0",
                    "--cluster-replica-validity-factor", "0",
                ),
            )
            for port in ports
        }  # fmt: skip
        self.nodes = [server.address for server in self.servers.values()]

    def start(self) -> None:
        for server in self.servers.values():
            server.start()
        subprocess.run(
            [self._cli, "-a", self.password, "--no-auth-warning", "--cluster", "create",
             *self.nodes, "--cluster-replicas", "1", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        wait_until(self._all_ok, 30.0, "cluster_state:ok on every node")
        wait_until(self._replicas_synced, 30.0, "every replica to sync")

    def _all_ok(self) -> bool:
        for server in self.servers.values():
            if not server.running:
                continue
            with server.client() as client:
                if "cluster_state:ok" not in _text(client.execute_command("CLUSTER INFO")):
                    return False
        return True

    def _replicas_synced(self) -> bool:
        for server in self.servers.values():
            with server.client() as client:
                replication = client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
        return True

    def masters(self) -> list[int]:
        """Ports of the nodes that serve slots now (as a live node sees it)."""
        for server in self.servers.values():
            if server.running:
                with server.client() as client:
                    return sorted(
                        int(slot[2][1]) for slot in client.execute_command("CLUSTER SLOTS")
                    )
        raise RuntimeError("no cluster node is running")

    def master_of(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot now."""
        for server in self.servers.values():
            if server.running:
                with server.client() as client:
                    slot = key_slot(key.encode())
                    for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                        if start <= slot <= end:
                            return int(master[1])
        raise RuntimeError(f"no master found for {key!r}")

    def kill(self, port: int, *, freeze: bool = False) -> None:
        """SIGKILL (or ``freeze``: SIGSTOP) the node on ``port``."""
        if freeze:
            self.servers[port].freeze()
        else:
            self.servers[port].stop()

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> None:
        """Wait until a replica serves the killed master's slots and the cluster is ok."""
        wait_until(
            lambda: old_port not in self.masters() and self._all_ok(),
            timeout,
            "a replica to take over the killed master's slots",
        )

    def redis_config(self, **extra) -> dict:
        return {
            "mode": "cluster",
            "nodes": list(self.nodes),
            "password_env": PASSWORD_ENV,
            **extra,
        }

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


# The environment variable the Sentinel and Cluster sets' ``redis_config`` reads the
# password from; tests set it (monkeypatch.setenv, or a daemon's env).
PASSWORD_ENV = "SLUICEGATE_TEST_REDIS_PASSWORD"


def _text(reply: object) -> str:
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, dict):
        return "\n".join(f"{k}:{v}" for k, v in reply.items())
    return str(reply)


def _free_cluster_ports(count: int) -> list[int]:
    """Ports free both for clients and for their cluster bus (port + 10000)."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < count:
        port = rng.randrange(20000, 30000)
        if port in ports:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        ports.append(port)
    return ports


@contextlib.contextmanager
def _running(prefix: str, make: Callable[[Path], Any]) -> Iterator[Any]:
    """A set of Redis processes in a temporary directory of its own, stopped whatever the
    test did."""
    with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
        group = make(Path(workdir))
        try:
            group.start()
            yield group
        finally:
            group.stop()


def _sentinel_set(prefix: str, *, sentinels_need_password: bool) -> Iterator[SentinelSet]:
    server = _need("redis-server")
    sentinel = _need("redis-sentinel")

    def make(workdir: Path) -> SentinelSet:
        return SentinelSet(
            server, sentinel, workdir, sentinels_need_password=sentinels_need_password
        )

    with _running(prefix, make) as sentinel_set:
        yield sentinel_set


@pytest.fixture
def redis_sentinel() -> Iterator[SentinelSet]:
    yield from _sentinel_set("sg-sentinel-", sentinels_need_password=False)


@pytest.fixture
def redis_sentinel_with_password() -> Iterator[SentinelSet]:
    yield from _sentinel_set("sg-sentinel-pw-", sentinels_need_password=True)


@pytest.fixture
def redis_cluster() -> Iterator[ClusterSet]:
    server = _need("redis-server")
    cli = _need("redis-cli")
    with _running("sg-cluster-", lambda workdir: ClusterSet(server, cli, workdir)) as cluster:
        yield cluster


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = _need("redis-server")
    server = RedisServer(binary, _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
