"""The request lifecycle's transition table: every change it does not list raises, and the
paths requests take (a plain GET, retries, the idle-close race, a tunnel, answers a filter
gives) are walks along it. The walks go through ``Exchange._enter``, the one method that
changes a phase."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proxy.dataplane.client import Request
from proxy.observability.metrics import in_flight_requests
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.phases import TRANSITIONS, IllegalTransition, Phase

P = Phase


@pytest.fixture
def ex():
    request = Request(SimpleNamespace())  # type: ignore[arg-type]
    before = in_flight_requests.value
    exchange = Exchange(SimpleNamespace(), request, SimpleNamespace(clock=lambda: 0.0))  # type: ignore[arg-type]
    yield exchange
    in_flight_requests.value = before  # never closed: it served nothing


def walk(ex: Exchange, *phases: Phase) -> None:
    assert ex.phase is P.ROUTED
    for phase in phases:
        ex._enter(phase)
        assert ex.phase is phase


def test_every_phase_has_a_row_and_every_row_names_phases():
    assert set(TRANSITIONS) == set(Phase)
    for allowed in TRANSITIONS.values():
        assert allowed <= set(Phase)


def test_done_is_the_end_and_reachable_from_every_other_phase():
    assert TRANSITIONS[P.DONE] == frozenset()
    for phase in Phase:
        if phase is not P.DONE:
            assert P.DONE in TRANSITIONS[phase], phase


@pytest.mark.parametrize(
    ("current", "wanted"),
    [
        (current, wanted)
        for current in Phase
        for wanted in Phase
        if wanted not in TRANSITIONS[current]
    ],
    ids=lambda phase: phase.value,
)
def test_every_transition_the_table_does_not_list_raises(ex, current, wanted):
    ex.phase = current
    with pytest.raises(IllegalTransition) as raised:
        ex._enter(wanted)
    assert (raised.value.current, raised.value.wanted) == (current, wanted)
    assert ex.phase is current  # refused: nothing changed


def test_nothing_follows_done(ex):
    walk(ex, P.DONE)
    for phase in Phase:
        with pytest.raises(IllegalTransition):
            ex._enter(phase)


def test_a_plain_get_on_a_pooled_connection(ex):
    walk(ex, P.SELECT, P.AWAIT_HEAD, P.DONE)  # came whole with its head: one write


def test_a_streamed_answer_is_relayed(ex):
    walk(ex, P.SELECT, P.AWAIT_HEAD, P.RELAY, P.DONE)


def test_a_plain_get_on_a_new_connection(ex):
    walk(ex, P.SELECT, P.CONNECT, P.AWAIT_HEAD, P.RELAY, P.DONE)


def test_a_retry_after_a_connect_failure(ex):
    walk(ex, P.SELECT, P.CONNECT, P.SELECT, P.CONNECT, P.AWAIT_HEAD, P.RELAY, P.DONE)


def test_a_connect_failure_with_no_retry_left_is_answered(ex):
    walk(ex, P.SELECT, P.CONNECT, P.DONE)


def test_a_held_failed_status_then_a_retry(ex):
    walk(ex, P.BODY, P.SELECT, P.AWAIT_HEAD, P.HOLD_FAILED, P.SELECT, P.AWAIT_HEAD, P.RELAY, P.DONE)


def test_a_held_failed_status_that_is_the_answer(ex):
    walk(ex, P.SELECT, P.AWAIT_HEAD, P.HOLD_FAILED, P.SELECT, P.DONE)


def test_the_idle_close_race_goes_on_another_connection(ex):
    walk(ex, P.SELECT, P.AWAIT_HEAD, P.CONNECT, P.AWAIT_HEAD, P.RELAY, P.DONE)


def test_a_tunnel(ex):
    walk(ex, P.SELECT, P.AWAIT_HEAD, P.TUNNEL, P.DONE)


def test_a_cache_hit_is_answered_by_a_filter(ex):
    walk(ex, P.REQUEST_FILTERS, P.DONE)


def test_a_429_is_answered_by_a_filter(ex):
    walk(ex, P.REQUEST_FILTERS, P.DONE)


def test_a_cache_miss_goes_on_from_the_filters(ex):
    walk(ex, P.REQUEST_FILTERS, P.SELECT, P.AWAIT_HEAD, P.RELAY, P.DONE)


def test_no_route_is_answered_at_once(ex):
    walk(ex, P.DONE)


@pytest.mark.parametrize(
    "skipped",
    [
        (P.ROUTED, P.AWAIT_HEAD),  # a try needs a server first
        (P.SELECT, P.RELAY),  # ... and a head
        (P.BODY, P.REQUEST_FILTERS),  # filters run before the body is held
        (P.RELAY, P.HOLD_FAILED),  # a relayed response is the answer
        (P.TUNNEL, P.SELECT),  # a switched connection is never retried
        (P.HOLD_FAILED, P.RELAY),  # a held failure is sent whole, if at all
    ],
    ids=lambda pair: f"{pair[0].value}->{pair[1].value}",
)
def test_shortcuts_nobody_drew_raise(ex, skipped):
    current, wanted = skipped
    ex.phase = current
    with pytest.raises(IllegalTransition, match=f"{current.value} -> {wanted.value}"):
        ex._enter(wanted)
