"""The config file as the daemon reads it, and ``sluicegate run --watch``: reload when its
content changes.

Every load of the file (at start, on SIGHUP, on ``POST /reload``, on a change seen here) goes
through ``ConfigFile.load``, and what a look compares with is the content last loaded or
looked at. So a SIGHUP sent after an edit applies the edit once: the watch then finds the
content it was given, not a change.

With ``--watch`` the file is looked at about once a second. A ``stat`` (which follows
symlinks) is cheap and answers most looks: while device, inode, size, mtime and ctime of
the file it leads to stay the same, the content is taken as unchanged. When they move, the
content is read and hashed, and only a different hash is a change: a ``touch`` or a
rewrite with the same bytes reloads nothing.

What counts as a change covers how files really get replaced: an edit in place (same
inode, new size or mtime), a rename over the file (new inode), and a Kubernetes ConfigMap
update, where the mounted ``FILE`` is a symlink ``FILE -> ..data/FILE`` and kubelet swaps
``..data -> ..2026_12_02_...`` atomically: the symlink itself never changes, the file
``stat`` reaches does. A write within the filesystem's timestamp granularity of the last
look may leave size and times as they were ("racily clean", as git calls it), so a file
modified less than ``RACY_SECONDS`` before a look is hashed again at the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.config import Config, ConfigError, load_config, read_config_file

log = logging.getLogger("sluicegate")

WATCH_SECONDS = 1.0
RACY_SECONDS = 2.0


class ConfigFile:
    """``path``, loaded through ``load``; ``changed`` says whether its content differs from
    what was last loaded or looked at. The first look (at construction) sets the baseline.

    ``source``: the file actually read, when it is not ``path`` (a worker reads the copy its
    supervisor validated); ``path`` is still the name in errors and ``Config.source``.
    """

    def __init__(
        self,
        path: str,
        *,
        source: str | None = None,
        clock: Callable[[], float] = time.time,  # wall clock: compared with st_mtime
        stat: Callable[[str], os.stat_result] = os.stat,
        read: Callable[[str], bytes] = read_config_file,
    ) -> None:
        self.path = path
        self._source = path if source is None else source
        self._clock = clock
        self._stat = stat
        self._read = read
        self._signature: tuple[int, ...] | None = None
        self._digest: bytes | None = None
        self._racy = True
        self.loaded = b""  # the bytes of the last load
        self.changed()

    def load(self) -> Config:
        """The file's config; raises ConfigError. Its content, valid or not, is the new
        baseline: the watch does not try it again."""
        content = self._read(self._source)
        self._digest = hashlib.sha256(content).digest()
        self.loaded = content
        return load_config(self.path, content)

    def changed(self) -> bool:
        try:
            st = self._stat(self._source)
        except OSError:
            # Missing for a moment (an editor's delete-and-write) or for good: nothing to
            # apply either way; look again next time.
            return False
        # ctime too: no one sets it back (utime does not), and an inode number is reused.
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if signature == self._signature and not self._racy:
            return False
        try:
            digest = hashlib.sha256(self._read(self._source)).digest()
        except ConfigError:  # unreadable: as if missing
            return False
        self._signature = signature
        self._racy = self._clock() - st.st_mtime < RACY_SECONDS
        changed = self._digest is not None and digest != self._digest
        self._digest = digest
        return changed


async def reload_on_change(
    config_file: ConfigFile,
    reload: Callable[[], Awaitable[Any]],
    *,
    interval: float = WATCH_SECONDS,
) -> None:
    """Run ``reload()`` (what SIGHUP runs, loading through ``config_file``) each time the
    file's content changes. An invalid file is reload's business (logged, counted, nothing
    changes); a later fix is another change, so it applies."""
    while True:
        await asyncio.sleep(interval)
        if config_file.changed():
            log.info(
                "config file %s changed: reloading", config_file.path, extra={"event": "reload"}
            )
            await reload()
