"""``sluicegate run --watch`` on the real daemon: every way a config file gets replaced is
applied within about two seconds, as SIGHUP would apply it, and counted the same way."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from tests.support.daemon import start_daemon, wait_for

APPLIES_WITHIN = 3.0  # one look a second, then the reload itself


def _config(backend_port: int, *prefixes: str, **extra) -> dict:
    config = {
        "upstreams": {"app": {"servers": [{"url": f"http://127.0.0.1:{backend_port}"}]}},
        "routes": [
            {"name": p.strip("/"), "match": {"path_prefix": p}, "upstream": "app"} for p in prefixes
        ],
        "logging": {"access_log": False},
    }
    config.update(extra)
    return config


def _reloads(daemon, result: str) -> float:
    for line in daemon.metrics().splitlines():
        if line.startswith(f'sluicegate_config_reloads_total{{result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no sluicegate_config_reloads_total series")


def _with_route(daemon, prefix: str) -> dict:
    config = dict(daemon.config)
    new = {"name": prefix.strip("/"), "match": {"path_prefix": prefix}, "upstream": "app"}
    config["routes"] = [*config["routes"], new]
    return config


def _text(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def _routed(daemon, path: str) -> bool:
    """A route matched (the backend answers 404 for these paths, the proxy's own 404 says
    "no route matched")."""
    return b"no route matched" not in daemon.get(path)[2]


def _applied(daemon, path: str) -> float:
    """Seconds until ``path`` is routed (bounded by APPLIES_WITHIN)."""
    started = time.monotonic()
    wait_for(lambda: _routed(daemon, path), timeout=APPLIES_WITHIN, message=f"{path} routed")
    return time.monotonic() - started


def test_edit_in_place_and_rename_over_are_applied_and_counted(start_sluicegate, spawn_backend):
    _, backend = spawn_backend("b")
    daemon = start_sluicegate(_config(backend, "/a/"), args=("--watch",))
    assert not _routed(daemon, "/b/")

    with open(daemon.config_path, "r+") as file:  # in place: same inode
        file.write(_text(_with_route(daemon, "/b/")))
        file.truncate()
    _applied(daemon, "/b/")
    assert _reloads(daemon, "success") == 1

    fresh = daemon.config_path.with_name("fresh.yaml")
    config = _with_route(daemon, "/c/")
    fresh.write_text(_text(config))
    os.replace(fresh, daemon.config_path)  # an editor's or a deploy tool's rename
    _applied(daemon, "/c/")
    assert _reloads(daemon, "success") == 2
    assert _reloads(daemon, "failure") == 0


def test_an_invalid_file_changes_nothing_once_counted_and_a_fix_applies(
    start_sluicegate, spawn_backend
):
    _, backend = spawn_backend("b")
    daemon = start_sluicegate(_config(backend, "/a/"), args=("--watch",))
    daemon.config_path.write_text(_text(daemon.config).replace("upstream: app", "upstream: nope"))
    wait_for(lambda: _reloads(daemon, "failure") == 1, timeout=APPLIES_WITHIN, message="failure")
    assert _routed(daemon, "/a/")  # the running config serves on
    assert "reload failed" in daemon.logs()
    time.sleep(2.2)  # the same bad content is not tried again every second
    assert _reloads(daemon, "failure") == 1

    daemon.config_path.write_text(_text(_with_route(daemon, "/b/")))
    _applied(daemon, "/b/")
    assert (_reloads(daemon, "success"), _reloads(daemon, "failure")) == (1, 1)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_after_an_edit_reloads_once_with_the_watch_on(
    start_sluicegate, spawn_backend, workers
):
    """The edit and the signal are one change: the watch's next look finds the content
    the signal's reload loaded, and does not reload it again."""
    _, backend = spawn_backend("b")
    daemon = start_sluicegate(_config(backend, "/a/", workers=workers), args=("--watch",))
    wait_for(lambda: daemon.admin("GET", "/readyz")[0] == 200, message="ready")
    daemon.write_config(_with_route(daemon, "/b/"))
    daemon.reload()  # SIGHUP
    _applied(daemon, "/b/")
    time.sleep(2.2)  # two looks of the watch
    assert (_reloads(daemon, "success"), _reloads(daemon, "failure")) == (1, 0)

    daemon.config_path.write_text(_text(daemon.config).replace("upstream: app", "upstream: no"))
    daemon.reload()  # SIGHUP
    wait_for(lambda: _reloads(daemon, "failure") == 1, timeout=APPLIES_WITHIN, message="failure")
    time.sleep(2.2)
    assert (_reloads(daemon, "success"), _reloads(daemon, "failure")) == (1, 1)


def _kubelet_publish(mount: Path, version: str, text: str) -> None:
    """What kubelet's atomic writer does for a ConfigMap volume: write a new timestamped
    directory, point ``..data_tmp`` at it, rename that over ``..data``, drop the old one."""
    data = mount / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    (mount / version).mkdir()
    (mount / version / "sluicegate.yaml").write_text(text)
    os.symlink(version, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", data)
    if old is not None:
        (mount / old / "sluicegate.yaml").unlink()
        (mount / old).rmdir()
    if not (mount / "sluicegate.yaml").is_symlink():
        os.symlink("..data/sluicegate.yaml", mount / "sluicegate.yaml")


def test_a_configmap_update_is_applied(tmp_path, spawn_backend):
    _, backend = spawn_backend("b")
    mount = tmp_path / "etc-sluicegate"
    mount.mkdir()
    _kubelet_publish(mount, "..2026_12_02_06_00_00.000000001", "placeholder: true\n")
    # start_daemon writes the config through the symlink, into the published version.
    daemon = start_daemon(mount, _config(backend, "/a/"), args=("--watch",))
    try:
        _kubelet_publish(
            mount, "..2026_12_02_06_05_00.000000002", _text(_with_route(daemon, "/b/"))
        )
        seconds = _applied(daemon, "/b/")
        assert _reloads(daemon, "success") == 1
        print(f"ConfigMap swap applied in {seconds:.2f}s")
    finally:
        daemon.stop()


def test_workers_the_supervisor_watches_and_every_worker_applies(start_sluicegate, spawn_backend):
    _, backend = spawn_backend("b")
    daemon = start_sluicegate(_config(backend, "/a/", workers=2), args=("--watch",))
    wait_for(lambda: daemon.admin("GET", "/readyz")[0] == 200, message="workers ready")
    daemon.write_config(_with_route(daemon, "/b/"))
    _applied(daemon, "/b/")
    # Each request a new connection: the kernel spreads them over both workers.
    assert all(_routed(daemon, "/b/") for _ in range(8))
    assert _reloads(daemon, "success") == 1
