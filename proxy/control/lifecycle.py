"""The phases of one process's life after start, and what each promises its clients.

Theory of operation. A balancer in front of us (HAProxy, a Kubernetes Service) learns that
we are going away only from our readiness check, some time after SIGTERM; until it does,
it keeps opening connections to us. Closing a kept-alive connection that is idle races a
request the client may already have sent on it: the request is lost unless the client
retries. So a shutdown runs in phases:

``SERVING``   ready; connections are kept alive.
``DRAINING``  for ``drain_time`` after SIGTERM: ``/readyz`` answers 503 but listeners still
              accept. Every answer carries ``Connection: close`` and ends its connection;
              a connection idle since before the drain stays open (its next answer closes
              it), because nothing tells us a request is not already on the wire.
``STOPPING``  listeners closed; idle connections closed (the race is accepted now: the
              balancer has had ``drain_time`` to move clients away); in-flight requests
              finish, up to ``shutdown_timeout``.
``STOPPED``   everything closed; the process exits 0.

With ``drain_time: 0`` DRAINING lasts no time at all: the shutdown of a bare process.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


_NEXT = {
    Phase.SERVING: Phase.DRAINING,
    Phase.DRAINING: Phase.STOPPING,
    Phase.STOPPING: Phase.STOPPED,
}


class IllegalTransition(RuntimeError):
    pass


class Lifecycle:
    """The current phase; it only moves forward, one phase at a time."""

    __slots__ = ("phase",)

    def __init__(self) -> None:
        self.phase = Phase.SERVING

    def advance(self, to: Phase) -> None:
        if _NEXT.get(self.phase) is not to:
            raise IllegalTransition(f"lifecycle: cannot go from {self.phase.value} to {to.value}")
        self.phase = to

    @property
    def ready(self) -> bool:
        """Should a balancer send us new work?"""
        return self.phase is Phase.SERVING

    @property
    def answers_close(self) -> bool:
        """Does every answer carry ``Connection: close`` and end its connection?"""
        return self.phase is not Phase.SERVING

    @property
    def closes_idle(self) -> bool:
        """Is an idle connection closed, even one whose last answer kept it alive?"""
        return self.phase in (Phase.STOPPING, Phase.STOPPED)
