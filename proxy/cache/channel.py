"""One Redis pub/sub subscription, as the cache's listeners hold it in every mode.

The stampede lock (``redislock.py``, ``store: redis``) and the purge bus
(``purgebus.py``, ``store: memory``) each listen on one channel of the configured Redis;
a process has one or the other, never both. ``subscription`` opens it the way every
mode needs (a cluster client learns its slot map first, then subscribes on the node of
the channel's slot; a PUBLISH reaches every node) and closes it whatever happens.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

log = logging.getLogger("sluicegate")


@asynccontextmanager
async def subscription(subscriber: Any, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
    """Subscribed to ``channel`` through ``subscriber`` (a client without a read timeout:
    it waits for news); yields the messages' payloads. Raises whatever the client raises."""
    # A cluster client must know its slot map before it can pick the channel's node.
    await subscriber.initialize()
    pubsub = subscriber.pubsub()
    payloads = _payloads(pubsub)
    try:
        await pubsub.subscribe(channel)
        yield payloads
    finally:
        await payloads.aclose()  # closed now, not whenever it is collected
        await _close_quietly(pubsub, channel)


async def _payloads(pubsub: Any) -> AsyncIterator[bytes]:
    async for message in pubsub.listen():
        if message.get("type") == "message":
            yield message["data"]


async def _close_quietly(pubsub: Any, channel: str) -> None:
    try:
        await pubsub.aclose()
    except Exception as error:  # its connection may be dead already: nothing to do
        log.debug("closing the subscription to %s: %s", channel, error)
