"""What a request filter made of a request (see ``proxy.pipeline.filters``)."""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    CONTINUE = "continue"  # on to the next filter, then upstream
    ANSWERED = "answered"  # the filter answered the client: the request is over
    SUSPENDED = "suspended"  # waiting on the future given to ``ex.suspend``
