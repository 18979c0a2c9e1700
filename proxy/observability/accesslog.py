"""The access log: one line per request, written off the event loop.

Theory of operation
-------------------
``AccessLog.log(record)`` runs on the request path: it formats the line (cheaply, see
``format_json``), appends it to a list and returns. On an event loop the list is handed
to the writer thread as one item every ``HANDOFF_SECONDS`` (waking a thread per record
would cost a context switch per request); off a loop each line is handed over at once.
Formatting stays on the caller's thread on purpose: a writer thread formatting a large
batch holds the GIL for milliseconds and shows up in the proxy's p99. The daemon thread
only joins the lines and writes the batch with one ``write`` and one ``flush``: under
load many lines share one system call, and a slow stdout (a full pipe, a stalled log
shipper) delays the thread, never the event loop. If the writer falls
``max_pending`` records behind, new records are dropped and counted in ``dropped``
rather than letting memory grow without bound.

Formatting reads only the SPEC fields (and the optional ``attempts`` list); missing ones
are written as null so every JSON line has the same keys in the same order.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import threading
import time
from typing import Any, TextIO

from proxy.observability.accessline import format_time
from proxy.observability.accessline import json_value as _json_value

# SPEC "Access log", in output order.
FIELDS = (
    "time",
    "request_id",
    "client_ip",
    "method",
    "host",
    "path",
    "route",
    "upstream",
    "server",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_duration_ms",
    "tries",
    "rate_limited",
    "error",
    "cache",  # what the response cache did (hit, miss, ...), or ""
)
OPTIONAL_FIELDS = ("attempts",)
FORMATS = ("json", "text")

_MAX_BATCH = 4096
HANDOFF_SECONDS = 0.05
_STOP = object()


def _time_field(record: dict[str, Any]) -> str | None:
    value = record.get("time")
    if isinstance(value, int | float):
        return format_time(value)
    return value


_JSON_KEYS = tuple(f',"{name}":' for name in FIELDS[1:])


def format_json(record: dict[str, Any]) -> str:
    """One JSON object with exactly the SPEC fields (plus ``attempts`` when present).

    Built field by field with the C string encoder: this runs once per request, and
    ``json.dumps`` of a dict costs about twice as much.
    """
    get = record.get
    parts = ['{"time":', _json_value(_time_field(record))]
    for key, name in zip(_JSON_KEYS, FIELDS[1:], strict=True):
        parts.append(key)
        parts.append(_json_value(get(name)))
    for name in OPTIONAL_FIELDS:
        value = get(name)
        if value is not None:
            parts.append(f',"{name}":')
            parts.append(_json_value(value))
    parts.append("}")
    return "".join(parts)


def format_text(record: dict[str, Any]) -> str:
    """One readable line, nginx-like:

    ``<time> <client> "<METHOD> <host><path>" <status> <bytes_in>/<bytes_out>B <ms>ms
    route=.. upstream=.. server=.. tries=.. upstream_ms=.. id=.. [rate_limited] [error=".."]``
    """
    get = record.get
    parts = [
        _time_field(record) or "-",
        get("client_ip") or "-",
        f'"{get("method") or "-"} {(get("host") or "") + (get("path") or "") or "-"}"',
        str(get("status") if get("status") is not None else "-"),
        f"{get('bytes_in') or 0}/{get('bytes_out') or 0}B",
        f"{_number(get('duration_ms'))}ms",
        f"route={get('route') or '-'}",
        f"upstream={get('upstream') or '-'}",
        f"server={get('server') or '-'}",
        f"tries={get('tries') or 0}",
        f"upstream_ms={_number(get('upstream_duration_ms'))}",
        f"id={get('request_id') or '-'}",
    ]
    if get("rate_limited"):
        parts.append("rate_limited")
    if get("error"):
        parts.append(f"error={json.dumps(str(get('error')))}")
    if get("cache"):
        parts.append(f"cache={get('cache')}")
    return " ".join(parts)


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


_FORMATTERS = {"json": format_json, "text": format_text}


class AccessLog:
    """Request lines written in batches by a background thread.

    ``stream``: where lines go (default ``sys.stdout`` at construction time).
    ``fmt``: ``"json"`` (default) or ``"text"``.
    ``enabled``: when False, ``log()`` does nothing and no thread starts.
    ``max_pending``: records queued at most before new ones are dropped.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        fmt: str = "json",
        enabled: bool = True,
        *,
        max_pending: int = 100_000,
    ) -> None:
        if fmt not in _FORMATTERS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)} (got {fmt!r})")
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.dropped = 0
        self.fmt = fmt
        self._format = _FORMATTERS[fmt]
        self._max_pending = max_pending
        self._pending: list[str] = []
        # Records logged but not yet written: an estimate shared with the writer thread.
        self._backlog = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = not enabled
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(
                target=self._drain_forever, name="sluicegate-access-log", daemon=True
            )
            self._thread.start()

    def log(self, record: dict[str, Any]) -> None:
        """Queue one request record; stamps ``time`` now if the record has none."""
        if self._closed:
            return
        if "time" not in record:
            record["time"] = time.time()
        try:
            line = self._format(record)
        except Exception:  # one odd record must not cost the others
            self.dropped += 1
            return
        self.log_line(line)

    def log_line(self, line: str) -> None:
        """Queue one line formatted by the caller (the request path's fast form)."""
        if self._closed:
            return
        if self._backlog >= self._max_pending:
            self.dropped += 1
            return
        self._backlog += 1
        pending = self._pending
        pending.append(line)
        if len(pending) == 1:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._hand_off()
            else:
                loop.call_later(HANDOFF_SECONDS, self._hand_off)
        elif len(pending) >= _MAX_BATCH:
            self._hand_off()

    def _hand_off(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything logged so far is written; False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            return True
        self._hand_off()
        written = threading.Event()
        self._queue.put(written)
        return written.wait(timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Write what is queued, then stop the thread. Later ``log()`` calls are ignored."""
        if self._closed or self._thread is None:
            self._closed = True
            return
        self._closed = True
        self._hand_off()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _drain_forever(self) -> None:
        while True:
            batch = [self._queue.get()]  # blocks until there is work
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._write_batch(batch):
                return

    def _write_batch(self, batch: list[Any]) -> bool:
        """Write one batch; returns True when it contained the stop marker."""
        lines: list[str] = []
        waiters: list[threading.Event] = []
        stop = False
        for item in batch:
            if item is _STOP:
                stop = True
            elif isinstance(item, threading.Event):
                waiters.append(item)
            else:  # a batch of formatted lines
                lines.extend(item)
                self._backlog -= len(item)
        if lines:
            self._write(lines)
        for waiter in waiters:
            waiter.set()
        return stop

    def _write(self, lines: list[str]) -> None:
        lines.append("")  # trailing newline after the last line
        try:
            self.stream.write("\n".join(lines))
            self.stream.flush()
        except (OSError, ValueError):
            # A closed or broken stdout must not kill the logger thread (and with it
            # every later line once the reader is back); the lines are lost and counted.
            self.dropped += len(lines) - 1
