"""Per-server circuit breaker: an explicit state machine, no I/O, clock injected.

States and the only legal transitions (anything else raises `IllegalTransition`):

    CLOSED ──trip──▶ OPEN ──open_duration elapsed──▶ HALF_OPEN ──trial success──▶ CLOSED
                      ▲                                  │
                      └──────────trial failure───────────┘

- CLOSED: every request may go. It trips after `failure_threshold` consecutive failures
  (a success resets the count) or, in ratio mode (`failure_rate` set), when the last
  `window` seconds saw at least `min_requests` outcomes and failures/total >= failure_rate.
  Ratio mode keeps bounded state: the window is cut into `WINDOW_BUCKETS` counters.
- OPEN: no request may go. After `open_duration` it becomes HALF_OPEN, evaluated lazily
  whenever `state`, `allows()` or `acquire()` look at it (no timers).
- HALF_OPEN: at most `half_open_requests` trial requests in flight at once. One trial
  success closes the breaker; one trial failure reopens it for a fresh `open_duration`.

Call protocol for the data plane: `allows()` is a pure query used for eligibility;
`acquire()` when the server was actually chosen (takes a trial slot when half-open);
then exactly one of `record_success()`, `record_failure()` or `release()` (no verdict,
e.g. the client went away). `on_transition(old, new, reason)` sees every transition.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from typing import Any

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def gauge_value(self) -> int:
        """`sluicegate_circuit_breaker_state`: 0 closed, 1 half_open, 2 open."""
        return _GAUGE_VALUES[self]


_GAUGE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_CLOSED = BreakerState.CLOSED

# The transition table is data, so the rules can be read (and tested) in one place.
_LEGAL_TRANSITIONS: dict[BreakerState, frozenset[BreakerState]] = {
    BreakerState.CLOSED: frozenset({BreakerState.OPEN}),
    BreakerState.OPEN: frozenset({BreakerState.HALF_OPEN}),
    BreakerState.HALF_OPEN: frozenset({BreakerState.CLOSED, BreakerState.OPEN}),
}

#: Ratio mode cuts its window into this many counters (1 s each for the default 10 s).
WINDOW_BUCKETS = 10

TransitionCallback = Callable[[BreakerState, BreakerState, str], None]


class IllegalTransition(RuntimeError):
    """A transition the state machine does not allow; a bug in the caller, never traffic."""

    def __init__(self, from_state: BreakerState, to_state: BreakerState) -> None:
        super().__init__(f"illegal breaker transition {from_state.value} -> {to_state.value}")
        self.from_state = from_state
        self.to_state = to_state


class _OutcomeWindow:
    """Outcomes of the last `window` seconds in `WINDOW_BUCKETS` ring counters."""

    __slots__ = ("_epochs", "_failures", "_totals", "_width")

    def __init__(self, window: float) -> None:
        self._width = window / WINDOW_BUCKETS
        self._epochs = [-1] * WINDOW_BUCKETS  # which bucket number each slot holds now
        self._totals = [0] * WINDOW_BUCKETS
        self._failures = [0] * WINDOW_BUCKETS

    def add(self, now: float, failed: bool) -> None:
        epoch = math.floor(now / self._width)
        slot = epoch % WINDOW_BUCKETS
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._totals[slot] = 0
            self._failures[slot] = 0
        self._totals[slot] += 1
        if failed:
            self._failures[slot] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(total, failures) over the buckets still inside the window."""
        oldest = math.floor(now / self._width) - WINDOW_BUCKETS
        total = failures = 0
        for slot, epoch in enumerate(self._epochs):
            if epoch > oldest:
                total += self._totals[slot]
                failures += self._failures[slot]
        return total, failures

    def clear(self) -> None:
        self._epochs = [-1] * WINDOW_BUCKETS


@cython.cclass
class CircuitBreaker:
    """One server's breaker. Defaults match the documented config defaults.

    Compiled (proxy/compiled.py), an extension type: the settings and counters are C
    fields, so the calls every attempt makes (`allows`, `acquire`, `record_*`) run no
    interpreted bytecode.
    """

    failure_threshold = cython.declare(cython.int, visibility="public")
    open_duration = cython.declare(cython.double, visibility="public")
    half_open_requests = cython.declare(cython.int, visibility="public")
    failure_rate = cython.declare(object, visibility="public")  # float | None
    min_requests = cython.declare(cython.int, visibility="public")
    window = cython.declare(cython.double, visibility="public")
    on_transition = cython.declare(object, visibility="public")
    _clock = cython.declare(object)
    _state = cython.declare(object)
    _consecutive_failures = cython.declare(cython.int)
    _opened_at = cython.declare(cython.double)
    _trials_in_flight = cython.declare(cython.int)
    _outcomes = cython.declare(object)

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        open_duration: float = 30.0,
        half_open_requests: int = 1,
        failure_rate: float | None = None,
        min_requests: int = 20,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        if failure_threshold < 1 or half_open_requests < 1 or min_requests < 1:
            raise ValueError("failure_threshold, half_open_requests, min_requests must be >= 1")
        if failure_rate is not None and not 0.0 < failure_rate <= 1.0:
            raise ValueError("failure_rate must be in (0, 1]")
        if open_duration < 0 or window <= 0:
            raise ValueError("open_duration must be >= 0 and window > 0")
        self.failure_threshold = failure_threshold
        self.open_duration = open_duration
        self.half_open_requests = half_open_requests
        self.failure_rate = failure_rate
        self.min_requests = min_requests
        self.window = window
        self.on_transition = on_transition
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._trials_in_flight = 0
        self._outcomes = _OutcomeWindow(window) if failure_rate is not None else None

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> CircuitBreaker:
        """Build from a `BreakerConfig`-like object; `kwargs` add clock / on_transition."""
        return cls(
            failure_threshold=cfg.failure_threshold,
            open_duration=cfg.open_duration,
            half_open_requests=cfg.half_open_requests,
            failure_rate=cfg.failure_rate,
            min_requests=cfg.min_requests,
            window=cfg.window,
            **kwargs,
        )

    def reconfigure(self, cfg: Any) -> None:
        """Apply reloaded `BreakerConfig`-like settings, keeping the current state.

        A server that stays across a reload keeps its breaker: an open breaker stays open
        (its open_duration now counts with the new length). Ratio-mode counters are kept
        only if the window is unchanged; otherwise they would be judged on the wrong span.
        """
        fresh = CircuitBreaker.from_config(cfg)  # validates like the constructor
        self.failure_threshold = fresh.failure_threshold
        self.open_duration = fresh.open_duration
        self.half_open_requests = fresh.half_open_requests
        self.min_requests = fresh.min_requests
        if fresh.failure_rate is None:
            self._outcomes = None
        elif self._outcomes is None or fresh.window != self.window:
            self._outcomes = _OutcomeWindow(fresh.window)
        self.failure_rate = fresh.failure_rate
        self.window = fresh.window

    # -- queries ----------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._open_elapsed():
            self._transition(BreakerState.HALF_OPEN, "open_duration elapsed")
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def trials_in_flight(self) -> int:
        return self._trials_in_flight

    def allows(self) -> bool:
        """May a new request be sent to this server now? Changes nothing but lazy expiry."""
        if self._state is _CLOSED:  # every request asks: the common answer first
            return True
        state = self.state  # OPEN may have expired into HALF_OPEN; never into CLOSED
        if state is BreakerState.HALF_OPEN:
            return self._trials_in_flight < self.half_open_requests
        return False

    # -- the call protocol ------------------------------------------------------------

    def acquire(self) -> bool:
        """The server was chosen: take a trial slot if half-open. False = do not send."""
        if self._state is _CLOSED:
            return True
        state = self.state
        if state is BreakerState.HALF_OPEN and self._trials_in_flight < self.half_open_requests:
            self._trials_in_flight += 1
            return True
        return False

    def release(self) -> None:
        """The request ended with no verdict on the server: give its trial slot back."""
        if self._state is BreakerState.HALF_OPEN and self._trials_in_flight > 0:
            self._trials_in_flight -= 1

    def record_success(self) -> None:
        state = self._state if self._state is _CLOSED else self.state
        if state is BreakerState.CLOSED:
            self._consecutive_failures = 0
            if self._outcomes is not None:
                self._outcomes.add(self._clock(), failed=False)
        elif state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.CLOSED, "trial request succeeded")
        # OPEN: a late answer to a request sent before it opened proves nothing new.

    def record_failure(self) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            self._consecutive_failures += 1
            if self._outcomes is None:
                if self._consecutive_failures >= self.failure_threshold:
                    self._transition(
                        BreakerState.OPEN, f"{self._consecutive_failures} consecutive failures"
                    )
                return
            now = self._clock()
            self._outcomes.add(now, failed=True)
            total, failures = self._outcomes.counts(now)
            if total >= self.min_requests and failures >= self.failure_rate * total:
                self._transition(
                    BreakerState.OPEN,
                    f"failure rate {failures}/{total} >= {self.failure_rate:g} "
                    f"over {self.window:g}s",
                )
        elif state is BreakerState.HALF_OPEN:
            self._consecutive_failures += 1
            self._transition(BreakerState.OPEN, "trial request failed")
        # OPEN: already open; a late failure must not extend open_duration.

    # -- the one place state changes --------------------------------------------------

    @cython.ccall
    def _transition(self, to: BreakerState, reason: str) -> None:
        old = self._state
        if to not in _LEGAL_TRANSITIONS[old]:
            raise IllegalTransition(old, to)
        self._state = to
        self._trials_in_flight = 0
        if to is BreakerState.OPEN:
            self._opened_at = self._clock()
        elif to is BreakerState.CLOSED:
            self._consecutive_failures = 0
            if self._outcomes is not None:
                self._outcomes.clear()  # judge the recovered server on fresh evidence only
        if self.on_transition is not None:
            self.on_transition(old, to, reason)

    @cython.cfunc
    def _open_elapsed(self) -> cython.bint:
        return self._clock() - self._opened_at >= self.open_duration

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self._state.value} failures={self._consecutive_failures}>"
