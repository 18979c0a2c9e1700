"""``ConfigFile``: which file replacements count as a change (real files in tmp_path,
an injected wall clock for the "racily clean" rule), and a load as the new baseline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.config import ConfigError, read_config_file
from proxy.control.watch import RACY_SECONDS, ConfigFile

LONG_AGO = 1_000_000_000  # mtimes in the tests: far older than RACY_SECONDS from "now"


class CountingRead:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: str) -> bytes:
        self.calls += 1
        return read_config_file(path)


def _write(path: Path, text: str, mtime: int = LONG_AGO) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))


def _watch(path: Path, now: float = LONG_AGO + 3600, read=read_config_file) -> ConfigFile:
    return ConfigFile(str(path), clock=lambda: now, read=read)


def test_an_edit_in_place_is_a_change_and_only_once(tmp_path):
    config = tmp_path / "sluicegate.yaml"
    _write(config, "a: 1\n")
    watch = _watch(config)
    assert not watch.changed()
    inode = config.stat().st_ino
    _write(config, "a: 22\n", mtime=LONG_AGO + 1)
    assert config.stat().st_ino == inode
    assert watch.changed()
    assert not watch.changed()


def test_same_content_is_no_change_and_an_unmoved_stat_is_not_read(tmp_path):
    config = tmp_path / "sluicegate.yaml"
    _write(config, "a: 1\n")
    read = CountingRead()
    watch = _watch(config, read=read)
    assert read.calls == 1  # the baseline
    for _ in range(3):
        assert not watch.changed()
    assert read.calls == 1  # stat unchanged: no read
    _write(config, "a: 1\n", mtime=LONG_AGO + 5)  # touched, same bytes
    assert not watch.changed()
    assert read.calls == 2


def test_rename_over_the_file_is_a_change(tmp_path):
    config = tmp_path / "sluicegate.yaml"
    _write(config, "a: 1\n")
    watch = _watch(config)
    fresh = tmp_path / ".sluicegate.yaml.new"
    _write(fresh, "a: 2\n")  # same mtime as the old file: the new inode tells
    os.replace(fresh, config)
    assert watch.changed()


def _kubelet_version(mount: Path, name: str, text: str) -> None:
    """What kubelet's atomic writer does: a new timestamped directory, a ``..data_tmp``
    symlink to it renamed over ``..data``, then the old directory removed."""
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    version = mount / name
    version.mkdir()
    _write(version / "sluicegate.yaml", text)
    os.symlink(name, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    if old is not None:
        (mount / old / "sluicegate.yaml").unlink()
        (mount / old).rmdir()


def test_a_configmap_update_swapping_the_data_symlink_is_a_change(tmp_path):
    mount = tmp_path / "config"
    mount.mkdir()
    _kubelet_version(mount, "..2026_12_02_06_00_00.000000001", "a: 1\n")
    os.symlink("..data/sluicegate.yaml", mount / "sluicegate.yaml")
    watch = _watch(mount / "sluicegate.yaml")
    assert not watch.changed()
    link_before = os.lstat(mount / "sluicegate.yaml")

    _kubelet_version(mount, "..2026_12_02_06_01_00.000000002", "a: 2\n")
    assert os.lstat(mount / "sluicegate.yaml").st_mtime_ns == link_before.st_mtime_ns
    assert watch.changed()
    assert not watch.changed()
    # A resync that writes the same data again (new directory, same bytes) is no change.
    _kubelet_version(mount, "..2026_12_02_06_02_00.000000003", "a: 2\n")
    assert not watch.changed()


def test_a_file_missing_for_a_while_is_no_change_until_it_is_back_different(tmp_path):
    config = tmp_path / "sluicegate.yaml"
    _write(config, "a: 1\n")
    watch = _watch(config)
    config.unlink()
    assert not watch.changed()
    _write(config, "a: 1\n")
    assert not watch.changed()
    config.unlink()
    _write(config, "a: 3\n")  # quite possibly the same inode number, size and mtime
    assert watch.changed()


def test_a_write_within_the_timestamp_granularity_is_caught_while_the_file_is_recent(tmp_path):
    config = tmp_path / "sluicegate.yaml"
    _write(config, "a: 1\n")
    frozen = config.stat()
    written_at = frozen.st_mtime
    now = [written_at + 0.5]  # looked at half a second after it was written: "racily clean"
    read = CountingRead()
    # A coarse filesystem clock: the rewrite below leaves every stat field as it was.
    watch = ConfigFile(str(config), clock=lambda: now[0], stat=lambda p: frozen, read=read)
    _write(config, "a: 2\n")
    now[0] = written_at + 1.0
    assert watch.changed()
    # Once the file is older than RACY_SECONDS at a look, stat is trusted again: no reads.
    now[0] = written_at + RACY_SECONDS + 1
    assert not watch.changed()
    reads = read.calls
    assert not watch.changed()
    assert not watch.changed()
    assert read.calls == reads


VALID = (
    "upstreams: {app: {servers: [{url: http://127.0.0.1:9}]}}\nroutes: [{name: r, upstream: app}]\n"
)


def test_content_loaded_after_an_edit_is_no_change_to_a_later_look(tmp_path):
    """SIGHUP after an edit: the reload loads the new content, and the watch's next look
    finds what was loaded, not a change to reload a second time."""
    config = tmp_path / "sluicegate.yaml"
    _write(config, VALID)
    watch = _watch(config)
    watch.load()
    _write(config, VALID.replace(":9}", ":10}"), mtime=LONG_AGO + 1)
    assert watch.load().upstreams["app"].servers[0].url == "http://127.0.0.1:10"
    assert not watch.changed()
    _write(config, VALID.replace(":9}", ":11}"), mtime=LONG_AGO + 2)
    assert watch.changed()  # an edit after the load still is one


def test_an_invalid_file_once_loaded_is_not_tried_again_and_its_fix_is_a_change(tmp_path):
    config = tmp_path / "sluicegate.yaml"
    _write(config, VALID)
    watch = _watch(config)
    _write(config, "routes: [\n", mtime=LONG_AGO + 1)
    with pytest.raises(ConfigError):
        watch.load()
    assert not watch.changed()
    _write(config, VALID, mtime=LONG_AGO + 2)
    assert watch.changed()


def test_an_unreadable_file_is_no_change_and_its_load_says_why(tmp_path):
    config = tmp_path / "sluicegate.yaml"
    _write(config, VALID)
    watch = _watch(config)
    config.unlink()
    config.mkdir()  # exists, cannot be read as a file
    assert not watch.changed()
    with pytest.raises(ConfigError, match="cannot read config file: Is a directory"):
        watch.load()


def test_a_source_is_what_is_read_and_watched_and_the_path_what_is_named(tmp_path):
    """A worker reads its supervisor's copy (``source``) and names the real file."""
    named, copy = tmp_path / "sluicegate.yaml", tmp_path / "copy.yaml"
    _write(named, "not: [read\n")
    _write(copy, VALID)
    watch = ConfigFile(str(named), source=str(copy), clock=lambda: LONG_AGO + 3600)
    assert watch.load().source == str(named)
    _write(copy, "routes: [\n", mtime=LONG_AGO + 1)
    assert watch.changed()
    with pytest.raises(ConfigError) as raised:
        watch.load()
    assert raised.value.errors[0].startswith(f"{named}: ")
