"""AccessLog: SPEC fields, formats, batching thread, pipes, close semantics."""

import io
import json
import os
import random
import threading
import time

import pytest

from proxy.observability.accesslog import FIELDS, AccessLog, format_text, format_time

SPEC_FIELDS = [
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
    "cache",
]


def a_record(**overrides):
    record = {
        "time": 1714564800.123,
        "request_id": "req-1",
        "client_ip": "203.0.113.7",
        "method": "GET",
        "host": "api.example.com",
        "path": "/v1/items?id=3",
        "route": "api",
        "upstream": "api",
        "server": "10.0.0.1:8080",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 512,
        "duration_ms": 12.5,
        "upstream_duration_ms": 11.25,
        "tries": 1,
        "rate_limited": False,
        "error": None,
        "cache": "",
    }
    record.update(overrides)
    return record


def written_lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_field_list_is_the_spec_list():
    assert list(FIELDS) == SPEC_FIELDS


def test_time_is_rfc3339_utc_with_milliseconds():
    assert format_time(1714564800.123) == "2024-05-01T12:00:00.123Z"
    assert format_time(0) == "1970-01-01T00:00:00.000Z"
    assert format_time(59.9996) == "1970-01-01T00:01:00.000Z"


def test_format_time_rounds_the_milliseconds_half_to_even_as_python_does():
    """Compiled, the millisecond count is C's rint (half to even in the default rounding
    mode): the same whole milliseconds as Python's round, halves included."""
    rng = random.Random(7)
    epochs = [0.0005, 0.0015, 0.0025, 1.0005, 1714564800.0005, 1714564800.1235]
    epochs += [rng.uniform(0, 2e9) for _ in range(2000)]
    for epoch in epochs:
        count = round(epoch * 1000)
        whole, millis = divmod(count, 1000)
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"
        assert format_time(epoch) == expected, epoch


def test_json_line_has_exactly_the_spec_fields_in_order():
    stream = io.StringIO()
    log = AccessLog(stream)
    log.log(a_record(extra_internal_state="dropped"))
    log.close()
    [line] = written_lines(stream)
    parsed = json.loads(line)
    assert list(parsed) == SPEC_FIELDS
    assert parsed["time"] == "2024-05-01T12:00:00.123Z"
    assert parsed["status"] == 200
    assert parsed["rate_limited"] is False
    assert parsed["error"] is None


def test_missing_fields_are_null_and_time_is_stamped():
    stream = io.StringIO()
    log = AccessLog(stream)
    log.log({"status": 404, "error": "no route"})
    log.close()
    parsed = json.loads(written_lines(stream)[0])
    assert list(parsed) == SPEC_FIELDS
    assert parsed["route"] is None
    assert parsed["time"].endswith("Z") and len(parsed["time"]) == len("2024-05-01T12:00:00.123Z")


def test_attempts_are_included_only_when_present():
    stream = io.StringIO()
    log = AccessLog(stream)
    attempts = [{"server": "10.0.0.1:8080", "outcome": "error"}, {"server": "b:1", "status": 200}]
    log.log(a_record(attempts=attempts, tries=2))
    log.log(a_record())
    log.close()
    first, second = (json.loads(line) for line in written_lines(stream))
    assert first["attempts"] == attempts
    assert "attempts" not in second


def test_unserialisable_values_do_not_lose_the_line():
    stream = io.StringIO()
    log = AccessLog(stream)
    log.log(a_record(error=TimeoutError("read timed out")))
    log.close()
    assert json.loads(written_lines(stream)[0])["error"] == "read timed out"


def test_text_format_is_one_readable_line():
    line = format_text(a_record(rate_limited=True, error="upstream timeout", status=504))
    assert line.startswith(
        '2024-05-01T12:00:00.123Z 203.0.113.7 "GET api.example.com/v1/items?id=3" 504 '
    )
    assert "12.50ms" in line
    assert "route=api" in line and "server=10.0.0.1:8080" in line and "id=req-1" in line
    assert line.endswith('rate_limited error="upstream timeout"')
    assert "\n" not in line


def test_text_format_copes_with_a_sparse_record():
    assert format_text({"status": 400}).split()[2:5] == ['"-', '-"', "400"]


def test_text_stream_output():
    stream = io.StringIO()
    log = AccessLog(stream, fmt="text")
    log.log(a_record())
    log.close()
    [line] = written_lines(stream)
    assert " 200 0/512B " in line


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="json, text"):
        AccessLog(io.StringIO(), fmt="xml")


def test_disabled_log_writes_nothing_and_starts_no_thread():
    stream = io.StringIO()
    before = threading.active_count()
    log = AccessLog(stream, enabled=False)
    log.log(a_record())
    assert log.flush()
    log.close()
    assert stream.getvalue() == ""
    assert threading.active_count() == before


def test_many_lines_arrive_in_order_through_a_real_pipe():
    read_fd, write_fd = os.pipe()
    received: list[str] = []
    with os.fdopen(read_fd, "r") as reader, os.fdopen(write_fd, "w") as writer:
        # Read concurrently: the lines are far larger than a pipe's buffer.
        reading = threading.Thread(target=lambda: received.extend(reader.read().splitlines()))
        reading.start()
        log = AccessLog(writer)
        for index in range(2000):
            log.log(a_record(request_id=f"req-{index}"))
        log.close()
        writer.close()
        reading.join(10)
    assert [json.loads(line)["request_id"] for line in received] == [
        f"req-{index}" for index in range(2000)
    ]


def test_lines_queued_while_the_writer_is_busy_go_out_in_one_write():
    release = threading.Event()
    writes: list[str] = []

    class SlowStream(io.StringIO):
        def write(self, text):
            release.wait(5)  # the first write holds the thread while we queue more
            writes.append(text)
            return super().write(text)

    stream = SlowStream()
    log = AccessLog(stream)
    log.log(a_record(request_id="first"))
    assert log.flush(timeout=0.05) is False  # the thread is now inside write()
    for index in range(1000):
        log.log(a_record(request_id=str(index)))
    release.set()
    log.close()
    assert len(written_lines(stream)) == 1001
    assert len(writes) == 2


def test_flush_waits_for_earlier_lines():
    stream = io.StringIO()
    log = AccessLog(stream)
    log.log(a_record())
    assert log.flush(timeout=5)
    assert len(written_lines(stream)) == 1
    log.close()


def test_log_after_close_is_ignored_and_close_is_idempotent():
    stream = io.StringIO()
    log = AccessLog(stream)
    log.close()
    log.log(a_record())
    log.close()
    assert stream.getvalue() == ""


def test_a_broken_stream_counts_drops_and_keeps_the_thread_alive():
    class BrokenStream(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    log = AccessLog(BrokenStream())
    log.log(a_record())
    assert log.flush(timeout=5)
    assert log.dropped == 1
    log.log(a_record())
    assert log.flush(timeout=5)
    assert log.dropped == 2
    log.close()


def test_records_beyond_max_pending_are_dropped_not_queued():
    release = threading.Event()

    class StalledStream(io.StringIO):
        def write(self, text):
            release.wait(5)
            return super().write(text)

    stream = StalledStream()
    log = AccessLog(stream, max_pending=10)
    log.log(a_record())  # the writer picks this up and stalls on it
    assert log.flush(timeout=0.01) is False
    for _ in range(50):
        log.log(a_record())
    assert log.dropped >= 30
    release.set()
    log.close()
    assert len(written_lines(stream)) <= 12
