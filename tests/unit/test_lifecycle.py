"""The shutdown phases (``proxy.control.lifecycle``): forward only, and what each promises."""

from __future__ import annotations

import pytest

from proxy.control.lifecycle import IllegalTransition, Lifecycle, Phase


def test_phases_run_forward_one_at_a_time():
    life = Lifecycle()
    promises = []
    for phase in (Phase.DRAINING, Phase.STOPPING, Phase.STOPPED):
        promises.append((life.ready, life.answers_close, life.closes_idle))
        life.advance(phase)
    promises.append((life.ready, life.answers_close, life.closes_idle))
    assert promises == [
        (True, False, False),  # serving
        (False, True, False),  # draining: not ready, answers close, idle ones stay open
        (False, True, True),  # stopping
        (False, True, True),  # stopped
    ]


@pytest.mark.parametrize(
    ("done", "to"),
    [
        ((), Phase.STOPPING),  # never skips the drain (drain_time 0 makes it last no time)
        ((Phase.DRAINING,), Phase.SERVING),
        ((Phase.DRAINING,), Phase.DRAINING),
        ((Phase.DRAINING, Phase.STOPPING, Phase.STOPPED), Phase.SERVING),
    ],
)
def test_an_illegal_transition_raises_and_names_both_phases(done, to):
    life = Lifecycle()
    for phase in done:
        life.advance(phase)
    before = life.phase
    with pytest.raises(IllegalTransition, match=f"from {before.value} to {to.value}"):
        life.advance(to)
    assert life.phase is before
