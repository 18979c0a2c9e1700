"""In-memory transports: two ``FakeTransport`` ends make a connection between two protocols.

What one end's protocol writes reaches the other end's protocol on a later loop iteration
(``call_soon``), at most ``READ_SIZE`` bytes a ``data_received`` as with a socket, and only
while that protocol reads: a protocol that paused reading leaves the bytes in the writer's
buffer, and when that buffer passes the writer's high-water mark its protocol hears
``pause_writing`` (``resume_writing`` once it drains to the low-water mark). So
backpressure is the one asyncio gives, end to end.

``close`` delivers what is buffered, then the peer hears EOF (``eof_received``; it closes
its end unless that returns true) and this end's protocol hears ``connection_lost``.
``abort`` drops the buffer and the peer hears a reset: ``connection_lost`` with a
``ConnectionResetError``.
"""

from __future__ import annotations

import asyncio
from typing import Any

DEFAULT_HIGH_WATER = 64 * 1024
READ_SIZE = 64 * 1024  # bytes handed over per data_received, as one socket read would


class FakeTransport(asyncio.Transport):
    def __init__(self, *, peername: tuple[str, int], sockname: tuple[str, int]) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self.protocol: Any = None
        self.peer: FakeTransport | None = None
        self._extra = {"peername": peername, "sockname": sockname}
        self.written = bytearray()  # everything this end's protocol wrote, for asserting
        self._buffer = bytearray()  # written, not yet taken by the peer's protocol
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4
        self.writing_paused = False  # our protocol was told pause_writing
        self.times_paused = 0
        self.reading = True  # our protocol takes what the peer writes
        self.closing = False
        self.eof_sent = False
        self.lost = False  # our protocol heard connection_lost
        self._eof_heard = False  # our protocol heard eof_received
        self._flush_scheduled = False

    # -- wiring ----------------------------------------------------------------------------

    @staticmethod
    def pair(
        a_address: tuple[str, int], b_address: tuple[str, int]
    ) -> tuple[FakeTransport, FakeTransport]:
        """Two connected ends: ``a`` is at ``a_address``, talking to ``b_address``."""
        a = FakeTransport(peername=b_address, sockname=a_address)
        b = FakeTransport(peername=a_address, sockname=b_address)
        a.peer, b.peer = b, a
        return a, b

    def connect(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.connection_made(self)

    # -- asyncio.Transport -------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        self._high = high
        self._low = high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def is_closing(self) -> bool:
        return self.closing

    def is_reading(self) -> bool:
        return self.reading

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.eof_sent:
            return  # as asyncio's socket transport: writes after close are dropped
        if not data:
            return
        self.written += data
        self._buffer += data
        self._schedule_flush()
        if not self.writing_paused and len(self._buffer) > self._high:
            self.writing_paused = True
            self.times_paused += 1
            self.protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.closing or self.eof_sent:
            return
        self.eof_sent = True
        self._schedule_flush()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            peer = self.peer
            if peer is not None:
                peer._schedule_flush()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self._schedule_flush()

    def abort(self) -> None:
        """A reset: nothing buffered is delivered; both protocols hear the connection lost."""
        if self.lost:
            return
        self.closing = True
        self._buffer.clear()
        self._loop.call_soon(self._lose, None)
        peer = self.peer
        if peer is not None and not peer.lost:
            peer.closing = True
            peer._buffer.clear()
            self._loop.call_soon(peer._lose, ConnectionResetError("connection reset by peer"))

    # -- delivery ------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        peer = self.peer
        if peer is None:
            return
        if peer.lost:
            # Writing to a socket the other side has closed: a reset (EPIPE), as TCP does.
            if not self.lost and (self._buffer or self.closing):
                error = ConnectionResetError("connection reset by peer") if self._buffer else None
                self._buffer.clear()
                self._loop.call_soon(self._lose, error)
            return
        if self._buffer:
            if not peer.reading:
                return  # stays buffered: the peer's resume_reading flushes again
            data = bytes(self._buffer[:READ_SIZE])
            del self._buffer[:READ_SIZE]
            peer.protocol.data_received(data)
            if self.writing_paused and len(self._buffer) <= self._low and not self.closing:
                self.writing_paused = False
                self.protocol.resume_writing()
            if self._buffer:  # the next read's worth
                self._schedule_flush()
                return
        # All written. EOF is read like data: a peer that does not read hears it when it
        # resumes (its resume_reading flushes this end again, even after we are gone).
        if (
            (self.closing or self.eof_sent)
            and peer.reading
            and not peer.closing
            and not peer._eof_heard
        ):
            peer._eof_heard = True
            keep_open = peer.protocol.eof_received()
            if not keep_open:
                peer.close()
        if self.closing and not self.lost:
            self._loop.call_soon(self._lose, None)

    def _lose(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.closing = True
        self.protocol.connection_lost(exc)
