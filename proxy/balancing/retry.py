# cython: annotation_typing=False
"""Failure kinds, the pure retry decision, and the per-upstream retry budget.

A failed attempt is named by a word, as in nginx's `proxy_next_upstream`: `error`,
`timeout`, `invalid_header`, or `http_NNN` for a status. `retry.on` and `failure_on` in
the config are sets of these words (`retry.on` also takes `non_idempotent` and
`idempotency_key`, which widen the set of methods that may be retried).

`RetryPolicy.should_retry` answers one question per failed attempt: may the request go to
another server? It returns None for yes, or the first rule that says no, checked in this
order: not_listed, response_started, non_idempotent, body_not_buffered, tries_exhausted,
deadline. The budget is asked last, by the caller, because it is the only stateful rule:
`RetryBudget.try_acquire_retry()` (reason "budget_exhausted" when it says no).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any


class FailureKind(enum.StrEnum):
    """Failures that are not an HTTP status; statuses are words from `status_word`."""

    ERROR = "error"  # connect refused/reset, closed before a full response head
    TIMEOUT = "timeout"  # connect or read timeout
    INVALID_HEADER = "invalid_header"  # malformed response head


def status_word(status: int) -> str:
    """The failure word for an upstream status: 502 -> "http_502"."""
    return f"http_{status}"


#: Upstream statuses that config may name as failures (`failure_on`, `retry.on`).
FAILURE_STATUSES = (500, 502, 503, 504, 403, 404, 429)

#: Every failure word, in the order config error messages list them: the one table that
#: config validates against, the pipeline compares with, and metrics use as labels.
FAILURE_WORDS: tuple[str, ...] = (
    *(kind.value for kind in FailureKind),
    *(status_word(status) for status in FAILURE_STATUSES),
)


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

#: `retry.on` words that are not failures but permissions.
NON_IDEMPOTENT = "non_idempotent"
IDEMPOTENCY_KEY = "idempotency_key"
RETRY_CONDITIONS: tuple[str, ...] = (*FAILURE_WORDS, NON_IDEMPOTENT, IDEMPOTENCY_KEY)


class NoRetry(enum.StrEnum):
    """Why a failed attempt is not retried (a str: log it or use it as a label)."""

    NOT_LISTED = "not_listed"
    RESPONSE_STARTED = "response_started"
    NON_IDEMPOTENT = "non_idempotent"
    BODY_NOT_BUFFERED = "body_not_buffered"
    TRIES_EXHAUSTED = "tries_exhausted"
    DEADLINE = "deadline"
    BUDGET_EXHAUSTED = "budget_exhausted"


class RetryPolicy:
    """One upstream's retry rules (config `upstreams.*.retry`); immutable and stateless.

    tries: attempts in total, the first included (1 = never retry).
    timeout: seconds for all attempts together, from `started_at`; None = no deadline.
    on: failure words that may be retried, plus `non_idempotent` / `idempotency_key`.
    max_body_bytes: request bodies up to this size are buffered so they can be replayed.
    budget: fraction for this upstream's `RetryBudget` (see `new_budget`).
    """

    def __init__(
        self,
        *,
        tries: int = 3,
        timeout: float | None = 10.0,
        on: frozenset[str] = frozenset({"error", "timeout", "http_502", "http_503", "http_504"}),
        max_body_bytes: int = 1024 * 1024,
        budget: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tries < 1:
            raise ValueError("tries must be >= 1")
        self.tries = tries
        self.timeout = timeout
        self.on = frozenset(str(word) for word in on)
        self.max_body_bytes = max_body_bytes
        self.budget = budget
        self._clock = clock

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> RetryPolicy:
        """Build from a `RetryConfig`-like object; `kwargs` may add `clock`."""
        return cls(
            tries=cfg.tries,
            timeout=cfg.timeout,
            on=cfg.on,
            max_body_bytes=cfg.max_body_bytes,
            budget=cfg.budget,
            **kwargs,
        )

    def new_budget(self) -> RetryBudget:
        return RetryBudget(self.budget)

    def may_retry_method(self, method: str, has_idempotency_key: bool) -> bool:
        """Idempotent methods always; others only when `retry.on` allows them."""
        if method.upper() in IDEMPOTENT_METHODS or NON_IDEMPOTENT in self.on:
            return True
        return has_idempotency_key and IDEMPOTENCY_KEY in self.on

    def remaining(self, started_at: float) -> float:
        """Seconds left of the whole retry time budget (inf without one)."""
        if self.timeout is None:
            return float("inf")
        return max(0.0, started_at + self.timeout - self._clock())

    def should_retry(
        self,
        word: str,
        *,
        attempts_done: int,
        started_at: float,
        method: str,
        has_idempotency_key: bool,
        body_replayable: bool,
        response_started: bool,
    ) -> NoRetry | None:
        """None if the failed attempt may be retried on another server, else why not."""
        if str(word) not in self.on:
            return NoRetry.NOT_LISTED
        if response_started:  # bytes already reached the client: cannot start over
            return NoRetry.RESPONSE_STARTED
        if not self.may_retry_method(method, has_idempotency_key):
            return NoRetry.NON_IDEMPOTENT
        if not body_replayable:
            return NoRetry.BODY_NOT_BUFFERED
        if attempts_done >= self.tries:
            return NoRetry.TRIES_EXHAUSTED
        if self.remaining(started_at) <= 0.0:
            return NoRetry.DEADLINE
        return None


class RetryBudget:
    """Caps concurrent retries of one upstream, like Envoy's `retry_budget`.

    A retry may start while retries_in_flight < max(min_concurrent, fraction *
    requests_in_flight), so a failing upstream sees at most that extra load from retries
    instead of `tries`-fold amplification. Counters never go below zero.
    """

    __slots__ = ("fraction", "min_concurrent", "requests_in_flight", "retries_in_flight")

    def __init__(self, fraction: float = 0.2, min_concurrent: int = 3) -> None:
        if fraction < 0 or min_concurrent < 0:
            raise ValueError("fraction and min_concurrent must be >= 0")
        self.fraction = fraction
        self.min_concurrent = min_concurrent
        self.requests_in_flight = 0
        self.retries_in_flight = 0

    def request_started(self) -> None:
        self.requests_in_flight += 1

    def request_finished(self) -> None:
        if self.requests_in_flight > 0:
            self.requests_in_flight -= 1

    def limit(self) -> float:
        return max(self.min_concurrent, self.fraction * self.requests_in_flight)

    def try_acquire_retry(self) -> bool:
        if self.retries_in_flight < self.limit():
            self.retries_in_flight += 1
            return True
        return False

    def release_retry(self) -> None:
        if self.retries_in_flight > 0:
            self.retries_in_flight -= 1
