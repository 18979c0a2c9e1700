"""``workers: N``: a supervisor and N worker processes sharing the listen ports.

Each worker is a fresh interpreter (``python -m proxy.control.worker``), not a fork: no state or
event loop is inherited half-initialised, and prometheus-client's multiprocess mode is on
from the first import (``PROMETHEUS_MULTIPROC_DIR`` is set before anything imports it). Workers bind
the traffic ports with SO_REUSEPORT, so the kernel spreads connections over them. Each
worker serves its own admin API on a private unix socket; the supervisor serves the public
admin address and answers from all workers: ``/metrics`` is the multiprocess aggregate,
``/status`` sums counters over workers, drain/undrain and reload go to every worker.

The supervisor restarts a worker that dies, passes SIGHUP (after validating the file) and
SIGTERM/SIGINT on (each worker drains for ``drain_time``, then stops), and exits non-zero
only if workers cannot start. With ``--watch`` the supervisor watches the file and reloads
as on SIGHUP; workers do not watch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from proxy import __version__
from proxy.config import Config
from proxy.control.watch import ConfigFile, reload_on_change
from proxy.errors import ConfigError, StartupError

log = logging.getLogger("sluicegate")

STARTUP_SECONDS = 15.0
RESTART_LIMIT = 5  # rapid deaths in a row before the supervisor gives up
RAPID_DEATH_SECONDS = 3.0


class Worker:
    def __init__(
        self, index: int, path: str, snapshot: str, run_dir: str, env: dict[str, str]
    ) -> None:
        self.index = index
        self.path = path
        self.snapshot = snapshot
        self.admin_sock = os.path.join(run_dir, f"worker-{index}.sock")
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.rapid_deaths = 0

    def spawn(self) -> None:
        if os.path.exists(self.admin_sock):
            os.unlink(self.admin_sock)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.control.worker",
                "--config",
                self.path,
                "--snapshot",
                self.snapshot,
                "--admin-sock",
                self.admin_sock,
                "--index",
                str(self.index),
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        self.started_at = time.monotonic()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)


class Supervisor:
    def __init__(
        self,
        config_file: ConfigFile,
        config: Config,
        workers: int,
        run_dir: str,
        *,
        watch: bool = False,
    ) -> None:
        self.config_file = config_file  # what ``config`` was loaded through
        self.path = os.path.abspath(config_file.path)
        self.watch = watch
        self.config = config
        self.run_dir = run_dir
        self.started_monotonic = time.monotonic()
        self.loaded_at = time.time()
        self.shutting_down = False
        self._signals = 0
        env = dict(os.environ)  # carries PROMETHEUS_MULTIPROC_DIR (see supervise)
        self.metrics_dir = env["PROMETHEUS_MULTIPROC_DIR"]
        # The bytes the supervisor validated, which every worker loads (at start, on a
        # restart, on a reload) instead of reading the file again: a write landing between
        # two workers' reads cannot leave them on different configs.
        self.snapshot = os.path.join(run_dir, "config.yaml")
        self._write_snapshot()
        self.workers = [Worker(i, self.path, self.snapshot, run_dir, env) for i in range(workers)]
        self._session: Any = None
        self._stopped: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._exit_code = 0

    def _write_snapshot(self) -> None:
        """What the config file held at its last load, for the workers (atomically)."""
        staged = self.snapshot + ".new"
        with open(staged, "wb") as file:
            file.write(self.config_file.loaded)
        os.replace(staged, self.snapshot)

    # -- talking to workers --------------------------------------------------------------

    async def _ask(
        self, worker: Worker, method: str, path: str, parse: bool = True, payload: Any = None
    ) -> tuple[int, Any]:
        import aiohttp

        connector = aiohttp.UnixConnector(path=worker.admin_sock)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(
                method,
                f"http://worker{path}",
                json=payload,
                timeout=aiohttp.ClientTimeout(total=5),
            ) as reply,
        ):
            body = await reply.json(content_type=None) if parse else await reply.read()
            return reply.status, body

    async def _ask_all(
        self, method: str, path: str, parse: bool = True, payload: Any = None
    ) -> list[tuple[int, Any]]:
        replies = await asyncio.gather(
            *(self._ask(worker, method, path, parse, payload) for worker in self.workers),
            return_exceptions=True,
        )
        return [r for r in replies if not isinstance(r, BaseException)]

    # -- admin control (the same interface ProxyProcess offers to control/admin.py) ---------------

    async def status(self) -> dict[str, Any]:
        replies = [body for status, body in await self._ask_all("GET", "/status") if status == 200]
        cache = self.config.cache
        shared_cache = cache is not None and cache.store != "memory"
        return {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self.started_monotonic, 3),
            "config_file": self.path,
            "config_loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "workers": len(replies),
            **merge_worker_status(replies, shared_cache=shared_cache),
        }

    async def readiness(self) -> tuple[bool, list[str]]:
        if self.shutting_down:
            return False, ["shutting down"]
        replies = await self._ask_all("GET", "/readyz")
        reasons: list[str] = []
        if len(replies) < len(self.workers):
            reasons.append(f"{len(self.workers) - len(replies)} worker(s) not answering")
        for status, body in replies:
            if status != 200:
                reasons.extend(r for r in body.get("reasons", []) if r not in reasons)
        return not reasons, reasons

    async def reload(self) -> tuple[bool, str]:
        from proxy.observability import metrics  # multiprocess mode: see supervise()

        try:
            config = self.config_file.load()
        except ConfigError as error:
            message = "; ".join(error.errors)
            log.error("reload failed, keeping the running config: %s", message)
            metrics.config_reload(False)
            return False, message
        self._write_snapshot()
        replies = await self._ask_all("POST", "/reload")
        failures = [body.get("error", "") for status, body in replies if status != 200]
        metrics.config_reload(not failures)
        if failures:
            return False, failures[0]
        self.config = config
        self.loaded_at = time.time()
        return True, f"reloaded: {config.summary()}"

    async def set_draining(self, upstream: str, index: int, draining: bool) -> dict | None:
        action = "drain" if draining else "undrain"
        replies = await self._ask_all("POST", f"/upstreams/{upstream}/servers/{index}/{action}")
        ok = [body for status, body in replies if status == 200]
        return ok[0] if ok else None

    async def purge_cache(self, by: str, value: str) -> int | None:
        """Each worker keeps its own memory store: all of them purge, the counts add up."""
        replies = await self._ask_all("POST", "/cache/purge", payload={by: value})
        counts = [body["purged"] for status, body in replies if status == 200]
        return sum(counts) if counts else None

    async def render_metrics(self) -> tuple[bytes, str]:
        # Workers count their hot series in memory: each flushes to its files as it renders
        # its own /metrics, so the aggregate below is exact, not up to a second old.
        await self._ask_all("GET", "/metrics", parse=False)
        return await asyncio.to_thread(self._render_files)

    def _render_files(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for worker in self.workers:
            worker.spawn()
        if not await self._wait_started():
            for worker in self.workers:
                worker.signal(signal.SIGKILL)
            raise StartupError("workers could not start (their messages are above)")
        await self._start_admin()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        log.info(
            "supervisor: %d workers serving (admin %s)",
            len(self.workers),
            self.config.admin.address,
        )
        watchers = [loop.create_task(self._watch())]
        if self.watch:
            watchers.append(loop.create_task(reload_on_change(self.config_file, self.reload)))
        await self._stopped.wait()
        for watcher in watchers:
            watcher.cancel()
        await self._admin_runner.cleanup()
        return self._exit_code

    async def _wait_started(self) -> bool:
        deadline = time.monotonic() + STARTUP_SECONDS
        pending = list(self.workers)
        while pending:
            for worker in list(pending):
                if worker.proc is not None and worker.proc.poll() is not None:
                    log.error(
                        "worker %d could not start (exit %s)", worker.index, worker.proc.returncode
                    )
                    return False
                if os.path.exists(worker.admin_sock):
                    try:
                        status, _ = await self._ask(worker, "GET", "/healthz")
                    except Exception:  # not listening yet
                        continue
                    if status == 200:
                        pending.remove(worker)
            if time.monotonic() > deadline:
                log.error("workers did not start within %ss", STARTUP_SECONDS)
                return False
            await asyncio.sleep(0.05)
        return True

    async def _start_admin(self) -> None:
        from aiohttp import web

        from proxy.control.admin import build_admin_app
        from proxy.control.daemon import bind_socket

        admin = self.config.admin
        token = os.environ.get(admin.token_env) if admin.token_env else None
        runner = web.AppRunner(
            build_admin_app(self, token=token or None), access_log=None, handle_signals=False
        )
        await runner.setup()
        sock = bind_socket(admin.host, admin.port, reuse_port=False, what="admin")
        await web.SockSite(runner, sock).start()
        self._admin_runner = runner

    async def _watch(self) -> None:
        from prometheus_client import multiprocess

        while not self.shutting_down:
            for worker in self.workers:
                proc = worker.proc
                if proc is None or proc.poll() is None or self.shutting_down:
                    continue
                multiprocess.mark_process_dead(proc.pid, self.metrics_dir)
                lived = time.monotonic() - worker.started_at
                worker.rapid_deaths = worker.rapid_deaths + 1 if lived < RAPID_DEATH_SECONDS else 0
                if worker.rapid_deaths >= RESTART_LIMIT:
                    log.error("worker %d keeps dying; giving up", worker.index)
                    self._exit_code = 1
                    self._on_stop_signal()
                    return
                log.warning(
                    "worker %d (pid %d) exited with %s; restarting",
                    worker.index,
                    proc.pid,
                    proc.returncode,
                )
                worker.spawn()
            await asyncio.sleep(0.2)

    def _on_reload_signal(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_stop_signal(self) -> None:
        self._signals += 1
        self.shutting_down = True
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        if self._signals == 1:
            task = asyncio.get_running_loop().create_task(self._wait_workers())
            self._tasks.add(task)

    async def _wait_workers(self) -> None:
        deadline = time.monotonic() + self.config.drain_time + self.config.shutdown_timeout + 5
        while any(w.proc is not None and w.proc.poll() is None for w in self.workers):
            if time.monotonic() > deadline:
                for worker in self.workers:
                    worker.signal(signal.SIGKILL)
                break
            await asyncio.sleep(0.05)
        assert self._stopped is not None
        self._stopped.set()


# -- one /status from the workers' -----------------------------------------------------------

_SERVER_SUMS = ("in_flight", "requests", "failures", "request_rate")
_ROUTE_SUMS = ("requests", "rate_limited")


def merge_worker_status(replies: list[dict[str, Any]], *, shared_cache: bool) -> dict[str, Any]:
    """``zone``, ``routes`` and ``upstreams`` of one ``/status`` from every worker's.

    Counters and rates add up; a server is draining, down or not closed when any worker
    says so; an upstream has an eligible server only if every worker has one (as
    ``/readyz`` judges). Servers are matched by URL and address, not by position, because
    servers found by DNS may be listed in a different order by each worker. Cache objects
    and bytes add up for per-process stores; a shared store is the same one seen by every
    worker, so the largest count is taken.
    """
    zone = None
    routes: dict[str, dict[str, Any]] = {}
    upstreams: dict[str, dict[str, Any]] = {}
    for body in replies:
        zone = zone or body.get("zone")
        for route in body.get("routes", []):
            into = routes.get(route["name"])
            if into is None:
                routes[route["name"]] = _copy(route)
            else:
                _merge_route(into, route, shared_cache)
        for name, upstream in body.get("upstreams", {}).items():
            target = upstreams.get(name)
            if target is None:
                target = upstreams[name] = {
                    "policy": upstream["policy"],
                    "has_eligible_server": upstream.get("has_eligible_server", True),
                    "servers": [],
                }
            else:
                target["has_eligible_server"] = target["has_eligible_server"] and upstream.get(
                    "has_eligible_server", True
                )
            by_key = {_server_key(s): s for s in target["servers"]}
            for server in upstream["servers"]:
                into = by_key.get(_server_key(server))
                if into is None:
                    target["servers"].append(_copy(server))
                else:
                    _merge_server(into, server)
    return {"zone": zone, "routes": list(routes.values()), "upstreams": upstreams}


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    """A copy whose nested objects may be added to without touching the reply."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in entry.items()}


def _server_key(server: dict[str, Any]) -> tuple[Any, Any]:
    return server.get("url"), server.get("address")


def _add(into: dict[str, Any], other: dict[str, Any], fields: Any) -> None:
    for field in fields:
        if isinstance(other.get(field), (int, float)):
            into[field] = (into.get(field) or 0) + other[field]


def _merge_route(into: dict[str, Any], route: dict[str, Any], shared_cache: bool) -> None:
    _add(into, route, _ROUTE_SUMS)
    cache, theirs = into.get("cache"), route.get("cache")
    if cache is None or theirs is None:
        return
    _add(cache, theirs, ("hits", "misses", "stale"))
    for field in ("objects", "bytes"):
        if shared_cache:
            cache[field] = max(cache.get(field) or 0, theirs.get(field) or 0)
        else:
            _add(cache, theirs, (field,))


def _merge_server(into: dict[str, Any], server: dict[str, Any]) -> None:
    _merge_rates(into, server)  # before the sum: it weighs by each side's own rate
    _add(into, server, _SERVER_SUMS)
    if isinstance(into.get("outcomes"), dict) and isinstance(server.get("outcomes"), dict):
        _add(into["outcomes"], server["outcomes"], tuple(server["outcomes"]))
    into["draining"] = into["draining"] or server["draining"]
    if server["health"] == "down":
        into["health"] = "down"
    if server["breaker"] != "closed" and into["breaker"] == "closed":
        into["breaker"] = server["breaker"]
    # Each worker runs its own checks: the most recent one is the news.
    mine, theirs = into.get("last_check"), server.get("last_check")
    if theirs is not None and (mine is None or (theirs.get("at") or "") > (mine.get("at") or "")):
        into["last_check"] = dict(theirs)


def _merge_rates(into: dict[str, Any], server: dict[str, Any]) -> None:
    """Error rate weighted by each worker's request rate; latency quantiles: the worst."""
    mine, theirs = into.get("request_rate") or 0, server.get("request_rate") or 0
    if mine + theirs > 0:
        into["error_rate"] = round(
            ((into.get("error_rate") or 0) * mine + (server.get("error_rate") or 0) * theirs)
            / (mine + theirs),
            4,
        )
    for field in ("p50_ms", "p99_ms"):
        values = [v for v in (into.get(field), server.get(field)) if v is not None]
        into[field] = max(values) if values else None


def run_daemon(path: str, *, watch: bool = False) -> int:
    """``sluicegate run``: one process, or a supervisor of N workers. Raises ConfigError and
    StartupError for the CLI to report. ``watch``: reload when the file changes."""
    config_file = ConfigFile(path)
    config = config_file.load()
    workers = config.workers or os.cpu_count() or 1
    if workers > 1:
        return supervise(config_file, config, workers, watch=watch)
    from proxy.control.daemon import serve

    return serve(path, config, watch=watch, config_file=config_file)


def supervise(config_file: ConfigFile, config: Config, workers: int, *, watch: bool = False) -> int:
    run_dir = tempfile.mkdtemp(prefix="sluicegate-")
    # Before anything here imports prometheus_client: it picks its value store at import,
    # and the supervisor counts reloads into the same multiprocess store as its workers.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(run_dir, "metrics")
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    from proxy.control.daemon import install_event_loop_policy, setup_logging

    install_event_loop_policy()
    setup_logging(config)
    try:
        return asyncio.run(Supervisor(config_file, config, workers, run_dir, watch=watch).run())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
