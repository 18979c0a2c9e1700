"""Health hysteresis, flap damping and ServerHealth, with a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proxy.balancing.health import FlapDamper, HealthStatus, Hysteresis, ServerHealth
from tests.support.clock import FakeClock

UP, DOWN, UNKNOWN = HealthStatus.UP, HealthStatus.DOWN, HealthStatus.UNKNOWN


# -- hysteresis ----------------------------------------------------------------------


def test_hysteresis_starts_unknown_and_needs_healthy_threshold_passes():
    h = Hysteresis(healthy_threshold=2, unhealthy_threshold=3)
    assert h.status is UNKNOWN
    assert h.observe(True) is False
    assert h.status is UNKNOWN
    assert h.observe(True) is True
    assert h.status is UP
    assert h.observe(True) is False  # already up: no flip


def test_hysteresis_unknown_to_down_after_unhealthy_threshold_fails():
    h = Hysteresis(healthy_threshold=2, unhealthy_threshold=3)
    assert [h.observe(False) for _ in range(3)] == [False, False, True]
    assert h.status is DOWN


def test_hysteresis_a_single_blip_does_not_flip():
    h = Hysteresis(healthy_threshold=2, unhealthy_threshold=3)
    h.observe(True)
    h.observe(True)
    for _ in range(5):  # fail, fail, pass resets the run
        assert not h.observe(False)
        assert not h.observe(False)
        assert not h.observe(True)
    assert h.status is UP
    assert h.consecutive_passes == 1 and h.consecutive_fails == 0


def test_hysteresis_down_then_recovers():
    h = Hysteresis(healthy_threshold=2, unhealthy_threshold=1)
    assert h.observe(False) and h.status is DOWN
    assert not h.observe(True)
    assert h.observe(True) and h.status is UP


def test_hysteresis_rejects_zero_thresholds():
    with pytest.raises(ValueError):
        Hysteresis(0, 1)


# -- flap damping --------------------------------------------------------------------


def test_damper_holds_down_after_more_than_max_flips_in_window():
    clock = FakeClock(100.0)
    damper = FlapDamper(max_flips=3, window=60.0, hold_down=30.0, clock=clock)
    for _ in range(3):
        assert not damper.record_flip()
        clock.advance(10)
    assert not damper.held_down
    assert damper.record_flip()  # the 4th flip within 60 s
    assert damper.held_down
    clock.advance(29.9)
    assert damper.held_down
    clock.advance(0.1)
    assert not damper.held_down


def test_damper_flips_spread_over_time_do_not_hold():
    clock = FakeClock(100.0)
    damper = FlapDamper(max_flips=3, window=60.0, hold_down=30.0, clock=clock)
    for _ in range(20):
        assert not damper.record_flip()
        clock.advance(21)  # never more than 3 flips within any 60 s
    assert not damper.held_down


def flap(damper: FlapDamper, clock: FakeClock, times: int) -> None:
    for _ in range(times):
        damper.record_flip()
        clock.advance(1)


def test_damper_hold_down_doubles_on_repeat_and_resets_after_calm():
    clock = FakeClock(100.0)
    damper = FlapDamper(max_flips=2, window=10.0, hold_down=5.0, clock=clock)
    flap(damper, clock, 3)  # held for 5 s from the 3rd flip
    assert damper.held_down
    clock.advance(4)
    assert not damper.held_down
    assert damper.current_hold_down == 10.0
    flap(damper, clock, 3)  # repeat offender: 10 s
    clock.advance(8)
    assert damper.held_down
    clock.advance(1)
    assert not damper.held_down
    assert damper.current_hold_down == 20.0
    clock.advance(20)  # calm for 2 x window after the hold ended: forgiven
    assert damper.current_hold_down == 5.0
    flap(damper, clock, 3)
    clock.advance(3)
    assert damper.held_down
    clock.advance(1)
    assert not damper.held_down


def test_damper_ignores_flips_while_held():
    clock = FakeClock(100.0)
    damper = FlapDamper(max_flips=2, window=10.0, hold_down=5.0, clock=clock)
    flap(damper, clock, 3)
    assert damper.held_down
    assert not damper.record_flip()
    clock.advance(4)
    assert not damper.held_down
    flap(damper, clock, 2)  # history was cleared at the hold: two flips are fine
    assert not damper.held_down


# -- server health -------------------------------------------------------------------


def test_server_health_unknown_is_eligible_down_is_not():
    health = ServerHealth(healthy_threshold=1, unhealthy_threshold=2)
    assert health.status is UNKNOWN and health.eligible
    assert not health.observe(False)
    assert health.observe(False)
    assert health.status is DOWN and not health.eligible
    assert health.observe(True)
    assert health.status is UP and health.eligible


def test_server_health_keeps_the_last_check_for_status():
    health = ServerHealth(healthy_threshold=1, unhealthy_threshold=1)
    assert health.last_check_status() is None  # never checked
    health.observe(False, reason="connect refused", at=1_700_000_000.25)
    assert health.last_check_status() == {
        "result": "fail",
        "at": "2023-11-14T22:13:20.250Z",
        "reason": "connect refused",
    }
    health.observe(True, reason="status 200", at=1_700_000_002.999)
    # The reason of a passing check says nothing an operator needs: only failures carry one.
    assert health.last_check_status() == {
        "result": "pass",
        "at": "2023-11-14T22:13:22.999Z",
        "reason": None,
    }


def test_server_health_held_down_whatever_checks_say():
    clock = FakeClock(100.0)
    damping = SimpleNamespace(max_flips=2, window=60.0, hold_down=30.0)
    health = ServerHealth(1, 1, flap_damping=damping, clock=clock)
    assert health.observe(True)  # unknown -> up: first verdict, not a flip
    assert health.observe(False)  # flip 1
    assert health.observe(True)  # flip 2
    assert health.observe(False)  # flip 3 > max_flips: down, and held down from now
    assert health.held_down and health.status is DOWN
    assert not health.observe(True)  # the check passes, but the server stays held down
    assert health.status is DOWN and not health.eligible
    assert health.hysteresis.status is UP
    clock.advance(30)
    assert health.status is UP
    assert health.observe(True)  # the next check reports the end of the hold-down
    assert not health.observe(True)


def test_server_health_from_config():
    cfg = SimpleNamespace(
        path="/health",
        healthy_threshold=3,
        unhealthy_threshold=1,
        flap_damping=SimpleNamespace(max_flips=4, window=60.0, hold_down=30.0),
    )
    health = ServerHealth.from_config(cfg, clock=FakeClock(100.0))
    assert health.hysteresis.healthy_threshold == 3
    assert health.damper is not None and health.damper.max_flips == 4
    assert health.observe(False) and health.status is DOWN
    without = ServerHealth.from_config(SimpleNamespace(healthy_threshold=1, unhealthy_threshold=1))
    assert without.damper is None and not without.held_down
