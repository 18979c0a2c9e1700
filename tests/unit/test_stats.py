"""RollingStats: rates and quantiles over a sliding window, driven by a fake clock."""

import pytest

from proxy.observability.stats import RollingStats
from tests.support.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_idle_server_reports_zero_rates_and_no_latency(clock):
    stats = RollingStats(clock=clock)
    assert stats.snapshot() == {
        "request_rate": 0.0,
        "error_rate": 0.0,
        "p50_ms": None,
        "p99_ms": None,
    }


def test_request_rate_over_a_full_window(clock):
    stats = RollingStats(window=10, clock=clock)
    clock.advance(20 - 0.125)  # older than the window: the full window counts as span
    for _ in range(40):  # 4 requests a second, each in the middle of its quarter
        clock.advance(0.25)
        stats.record(0.01, failed=False)
    clock.advance(0.125)  # a whole second
    assert stats.snapshot()["request_rate"] == pytest.approx(4.0)


def test_steady_traffic_reads_steady_whatever_part_of_the_second(clock):
    """Dividing by the nominal window would under-read a partly filled current second
    (a 10 % sawtooth with a 10 s rate window): the span is the time actually covered."""
    stats = RollingStats(clock=clock)
    clock.advance(100)
    readings = []
    for _ in range(300):  # 30 s at 10 requests per second
        clock.advance(0.1)
        stats.record(0.01, failed=False)
        readings.append(stats.snapshot()["request_rate"])
    assert min(readings[-100:]) == pytest.approx(10.0, rel=0.02)
    assert max(readings[-100:]) == pytest.approx(10.0, rel=0.02)


def test_request_rate_covers_the_rate_window_not_the_whole_window(clock):
    stats = RollingStats(window=60, rate_window=10, clock=clock)
    clock.advance(100)
    for _ in range(30):
        stats.record(0.01, failed=True)
    clock.advance(15)  # the burst is older than the rate window, younger than the window
    snapshot = stats.snapshot()
    assert snapshot["request_rate"] == 0.0
    assert snapshot["error_rate"] == 1.0 and snapshot["p50_ms"] is not None


def test_young_server_rate_uses_its_age_not_the_whole_window(clock):
    stats = RollingStats(window=60, clock=clock)
    for _ in range(20):
        stats.record(0.01, failed=False)
    clock.advance(2)
    assert stats.snapshot()["request_rate"] == pytest.approx(10.0)


def test_rate_never_divides_by_less_than_one_second(clock):
    stats = RollingStats(clock=clock)
    stats.record(0.01, failed=False)
    assert stats.snapshot()["request_rate"] == pytest.approx(1.0)


def test_error_rate_is_the_failed_share(clock):
    stats = RollingStats(clock=clock)
    for index in range(8):
        stats.record(0.01, failed=index < 2)
    assert stats.snapshot()["error_rate"] == pytest.approx(0.25)


def test_old_seconds_fall_out_of_the_window(clock):
    stats = RollingStats(window=5, clock=clock)
    for _ in range(10):
        stats.record(0.5, failed=True)
    clock.advance(5)
    stats.record(0.01, failed=False)
    snapshot = stats.snapshot()
    assert snapshot["error_rate"] == 0.0
    assert snapshot["p99_ms"] < 20


def test_everything_expires_after_the_window_without_new_records(clock):
    stats = RollingStats(window=3, clock=clock)
    stats.record(0.2, failed=True)
    clock.advance(3)
    assert stats.snapshot()["p50_ms"] is None


def test_ring_slot_reuse_resets_the_bucket(clock):
    stats = RollingStats(window=2, clock=clock)
    stats.record(1.0, failed=True)
    clock.advance(2)  # same ring slot, a new second
    stats.record(0.001, failed=False)
    snapshot = stats.snapshot()
    assert snapshot["error_rate"] == 0.0
    assert snapshot["p99_ms"] == pytest.approx(1.0, rel=0.25)


def test_quantiles_are_within_a_histogram_step(clock):
    stats = RollingStats(clock=clock)
    # 1..100 ms, one each: p50 ~ 50 ms, p99 ~ 99 ms.
    for ms in range(1, 101):
        stats.record(ms / 1000, failed=False)
    snapshot = stats.snapshot()
    assert snapshot["p50_ms"] == pytest.approx(50, rel=0.15)
    assert snapshot["p99_ms"] == pytest.approx(99, rel=0.15)


def test_p99_sees_a_slow_tail(clock):
    stats = RollingStats(clock=clock)
    for _ in range(98):
        stats.record(0.002, failed=False)
    for _ in range(2):
        stats.record(2.0, failed=False)
    snapshot = stats.snapshot()
    assert snapshot["p50_ms"] == pytest.approx(2, rel=0.15)
    assert snapshot["p99_ms"] == pytest.approx(2000, rel=0.15)


def test_latencies_beyond_the_histogram_are_clamped_not_lost(clock):
    stats = RollingStats(clock=clock)
    stats.record(10_000.0, failed=True)
    stats.record(0.0, failed=False)
    snapshot = stats.snapshot()
    assert snapshot["p99_ms"] > 50_000
    assert snapshot["p50_ms"] <= 0.1


def test_window_shorter_than_a_second_is_rejected():
    with pytest.raises(ValueError, match="at least 1 second"):
        RollingStats(window=0.5)
    with pytest.raises(ValueError, match="rate_window must be at least 1 second"):
        RollingStats(rate_window=0.5)
