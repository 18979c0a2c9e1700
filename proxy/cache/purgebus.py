"""Purges that reach every instance's memory store, through Redis pub/sub.

With ``cache.store: memory`` each process keeps its own store, so a purge (the admin's
``POST /cache/purge``, or an unsafe method's invalidation, RFC 9111 §4.4) applied by one
process leaves the others serving what was purged. When a top-level ``redis`` section is
configured, the process that purged publishes what it purged on one channel, and every
process (other instances, sibling workers) that subscribes applies it to its own store.

A message names its sender, so the sender does not purge twice, and the sender's
instance: under a supervisor the workers of one instance share it, and a worker ignores
its siblings' admin purges, since the supervisor asks every worker itself and adds up
their answers (a sibling's message arriving first would take the count from the answer).
Its siblings' invalidations it applies: nobody else tells it of those. A message carries
what to purge as the store matches it (a normalised URL, a prefix, a tag; an
invalidation's URLs), so a receiver applies it without parsing requests again.

Redis failing makes purges local only: the publishing process still purges its own
store and answers; the loss is logged once (and its end once), and the subscription is
opened again every ``RETRY`` seconds until Redis answers. Purges published while a
process was not subscribed do not reach it (pub/sub keeps nothing): entries it kept
expire by their own freshness.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.cache.channel import subscription
from proxy.cache.outage import Outage
from proxy.cache.redisstore import PREFIX, REDIS_FAILURES

log = logging.getLogger("sluicegate")

CHANNEL = PREFIX + "purged"
RETRY = 1.0  # seconds between attempts to subscribe again after a failure
KINDS = frozenset({"url", "prefix", "tag", "invalidation"})


@dataclass(frozen=True, slots=True)
class Purge:
    """What to purge: ``by`` is the metric's label (url, prefix, tag, invalidation); each
    of ``values`` is matched as a URL (url, invalidation), a URL prefix or a tag."""

    by: str
    values: tuple[str, ...]

    @property
    def kind(self) -> str:
        """How the store matches each value: an invalidation purges URLs."""
        return "url" if self.by == "invalidation" else self.by

    def encode(self, sender: str, instance: str) -> bytes:
        message = {"from": sender, "instance": instance, "by": self.by, "values": list(self.values)}
        return json.dumps(message).encode()


@dataclass(frozen=True, slots=True)
class Message:
    sender: str  # the process
    instance: str  # the process, or the supervisor whose worker it is
    purge: Purge


def decode(data: bytes) -> Message | None:
    """A message as published; None for anything malformed (another program on the
    channel must not break the subscription)."""
    try:
        message = json.loads(data)
        sender, instance = message["from"], message["instance"]
        by, values = message["by"], message["values"]
    except (ValueError, TypeError, KeyError):
        return None
    if (
        not isinstance(sender, str)
        or not isinstance(instance, str)
        or not isinstance(by, str)
        or by not in KINDS
        or not isinstance(values, list)
        or not all(isinstance(value, str) and value for value in values)
    ):
        return None
    return Message(sender, instance, Purge(by, tuple(values)))


class PurgeBus:
    """One process's end of the channel: ``publish`` what it purged, ``start`` listening
    for what the others purged (``apply`` is called with each).

    ``client`` makes the calls (each bounded by ``deadline``); ``subscriber`` holds the
    subscription, a client without a read timeout since it waits for news.
    """

    def __init__(
        self,
        client: Any,
        subscriber: Any,
        apply: Callable[[Purge], Awaitable[Any]],
        deadline: float | None = None,
        retry: float = RETRY,
    ) -> None:
        self.client = client
        self.subscriber = subscriber
        self.apply = apply
        self.deadline = deadline
        self.retry = retry
        self.sender = os.urandom(8).hex()
        self.instance = self.sender  # a worker's is its supervisor's (``SharedCache.start``)
        self.outage = Outage()  # a failed publish spares the next ones a deadline each
        self.subscribed = asyncio.Event()
        self._lost = False
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Subscribe (in the background); a second call does nothing."""
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()

    async def publish(self, purge: Purge) -> None:
        """Tell the other processes; on failure they are not told (logged once)."""
        if self.outage.skipping():
            return
        try:
            async with asyncio.timeout(self.deadline):
                await self.client.publish(CHANNEL, purge.encode(self.sender, self.instance))
        except REDIS_FAILURES as error:
            self.outage.failed()
            self._lose(error)
            return
        if self.subscribed.is_set():
            self._regain()

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # whatever the client raises: try again later
                self.subscribed.clear()
                self._lose(error)
            await asyncio.sleep(self.retry)

    async def _listen(self) -> None:
        async with subscription(self.subscriber, CHANNEL) as payloads:
            self._regain()
            self.subscribed.set()
            async for payload in payloads:
                message = decode(payload)
                if message is None:
                    log.debug("cache purge bus: ignored a malformed message")
                elif self.concerns_me(message):
                    await self.apply(message.purge)
        raise ConnectionError("subscription ended")

    def concerns_me(self, message: Message) -> bool:
        if message.sender == self.sender:
            return False  # purged when it was sent
        # A sibling worker's admin purge: the supervisor asks this worker too.
        return message.instance != self.instance or message.purge.by == "invalidation"

    def _lose(self, error: BaseException) -> None:
        if not self._lost:
            self._lost = True
            log.warning(
                "cache purges are local only (Redis pub/sub failed: %s)",
                str(error) or type(error).__name__,
                extra={"event": "cache"},
            )

    def _regain(self) -> None:
        if self._lost:
            self._lost = False
            log.info("cache purges reach every instance again", extra={"event": "cache"})
