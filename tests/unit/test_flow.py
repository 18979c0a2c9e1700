"""Reading paused for named reasons: the transport reads again only when none is left.

Each connection keeps its own set of reasons (an extension type each, with no shared
base): the same checks run on both."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.dataplane.client import ClientConnection
from proxy.dataplane.flow import PauseReason
from proxy.dataplane.upstream import ResponseHead, UpstreamConnection
from tests.unit.test_connect_then import pool
from tests.unit.test_http1_slicing import Listener


class _Transport:
    """Counts the calls a real transport would get (pausing twice is an asyncio error)."""

    def __init__(self) -> None:
        self.pauses = 0
        self.resumes = 0

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _client() -> ClientConnection:
    return ClientConnection(Listener())


def _upstream() -> UpstreamConnection:
    return UpstreamConnection(pool(1))


@pytest.mark.parametrize("make", [_client, _upstream], ids=["client", "upstream"])
async def test_reading_resumes_only_when_every_reason_is_lifted(make):
    conn = make()
    transport = _Transport()
    conn.connection_made(transport)
    conn.pause_reading(PauseReason.BODY)
    conn.pause_reading(PauseReason.UPSTREAM)
    assert (transport.pauses, conn.reading_paused()) == (1, True)
    conn.resume_reading(PauseReason.UPSTREAM)
    assert (transport.resumes, conn.reading_paused()) == (0, True)
    conn.resume_reading(PauseReason.HELD)  # never held: changes nothing
    assert transport.resumes == 0
    conn.resume_reading(PauseReason.BODY)
    assert (transport.resumes, conn.reading_paused()) == (1, False)
    await asyncio.sleep(0)  # anything the resume scheduled runs, and finds nothing to do


def test_every_pause_reason_has_its_own_word():
    words = [reason.value for reason in PauseReason]
    assert len(words) == len(set(words)) == 8


def test_a_response_head_reframes_and_replaces_its_own_headers():
    head = ResponseHead()
    head.content_length = 10
    head.replace_headers([(b"Content-Type", b"text/plain"), (b"Vary", b"Accept-Encoding")])
    head.reframe(None)
    assert head.lowered == [b"content-type", b"vary"]
    assert head.content_length is None
