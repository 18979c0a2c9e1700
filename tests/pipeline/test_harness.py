"""The harness itself: virtual time that jumps, and transports that push back."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.dataplane.timers import sweeper_for
from tests.pipeline.transports import FakeTransport
from tests.pipeline.virtualtime import StuckTest, VirtualClockLoop


async def test_ten_minutes_of_timers_fires_in_order_at_their_instants_without_waiting():
    loop = asyncio.get_running_loop()
    sweeper_for(loop)  # the data plane's 50 ms tick runs all along, as in every test here
    start = loop.time()
    fired: list[tuple[str, float]] = []
    for name, delay in (("late", 600.0), ("early", 0.25), ("middle", 90.0)):
        loop.call_later(delay, lambda name=name: fired.append((name, loop.time() - start)))
    real_start = time.monotonic()

    await asyncio.sleep(600.5)

    assert fired == [("early", 0.25), ("middle", 90.0), ("late", 600.0)]
    assert loop.time() - start == 600.5
    assert time.monotonic() - real_start < 2.0  # 12,000 sweeper ticks included


async def test_timeout_expires_on_virtual_time():
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(30):
            await loop.create_future()
    assert loop.time() - start == 30.0


def test_a_loop_with_nothing_to_wait_for_says_so():
    loop = VirtualClockLoop()
    loop.real_idle_limit = 0.01
    try:
        with pytest.raises(StuckTest):
            loop.run_until_complete(loop.create_future())
    finally:
        loop.close()


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.paused: list[bool] = []
        self.lost: list[Exception | None] = []
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def pause_writing(self) -> None:
        self.paused.append(True)

    def resume_writing(self) -> None:
        self.paused.append(False)

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_reader_that_pauses_pushes_back_on_the_writer():
    a, b = FakeTransport.pair(("10.0.0.1", 1), ("10.0.0.2", 2))
    writer, reader = Recorder(), Recorder()
    a.connect(writer)
    b.connect(reader)
    a.set_write_buffer_limits(high=1000)
    b.pause_reading()

    a.write(b"x" * 600)
    a.write(b"y" * 600)
    await settle()

    assert reader.data == b"" and a.get_write_buffer_size() == 1200
    assert writer.paused == [True]
    b.resume_reading()
    await settle()
    assert reader.data == b"x" * 600 + b"y" * 600
    assert writer.paused == [True, False]


async def test_close_delivers_then_ends_and_abort_resets():
    a, b = FakeTransport.pair(("10.0.0.1", 1), ("10.0.0.2", 2))
    one, two = Recorder(), Recorder()
    a.connect(one)
    b.connect(two)
    a.write(b"last words")
    a.close()
    await settle()
    assert (two.data, two.eof) == (b"last words", True)
    assert one.lost == [None] and two.lost == [None]

    c, d = FakeTransport.pair(("10.0.0.1", 3), ("10.0.0.2", 4))
    three, four = Recorder(), Recorder()
    c.connect(three)
    d.connect(four)
    c.write(b"never delivered")
    c.abort()
    await settle()
    assert four.data == b""
    assert isinstance(four.lost[0], ConnectionResetError)


async def test_writing_to_a_closed_peer_is_a_reset():
    c, d = FakeTransport.pair(("10.0.0.1", 3), ("10.0.0.2", 4))
    writer, closer = Recorder(), Recorder()
    c.connect(writer)
    d.connect(closer)
    c.pause_reading()  # the writer does not read: it does not hear the peer's EOF
    d.close()
    await settle()
    assert closer.lost == [None] and writer.lost == []
    c.write(b"anyone there?")
    await settle()
    assert isinstance(writer.lost[0], ConnectionResetError)
