"""Reading paused for named reasons: the transport reads again only when none is left."""

from __future__ import annotations

from proxy.dataplane.flow import PauseReason, ProxyConnection
from proxy.dataplane.upstream import ResponseHead


class _Transport:
    """Counts the calls a real transport would get (pausing twice is an asyncio error)."""

    def __init__(self) -> None:
        self.pauses = 0
        self.resumes = 0

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1


class _Connection(ProxyConnection):
    def __init__(self) -> None:
        self.transport = _Transport()  # type: ignore[assignment]
        self.closed = False
        self._reading_paused_for: set[PauseReason] = set()


def test_reading_resumes_only_when_every_reason_is_lifted():
    conn = _Connection()
    conn.pause_reading(PauseReason.BODY)
    conn.pause_reading(PauseReason.UPSTREAM)
    assert (conn.transport.pauses, conn.reading_paused()) == (1, True)
    conn.resume_reading(PauseReason.UPSTREAM)
    assert (conn.transport.resumes, conn.reading_paused()) == (0, True)
    conn.resume_reading(PauseReason.HELD)  # never held: changes nothing
    assert conn.transport.resumes == 0
    conn.set_reading_paused(PauseReason.BODY, False)
    assert (conn.transport.resumes, conn.reading_paused()) == (1, False)


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
