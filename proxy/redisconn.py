"""The Redis the config's ``redis`` section names, as one redis-py asyncio client.

Whatever uses Redis (the rate limiter's buckets, the response cache's store) opens it
here, so every mode reaches every user alike:

- ``single``: ``redis.asyncio.Redis`` from ``url``.
- ``sentinel``: ``nodes`` are the sentinels; the client is the current master of
  ``master`` (database ``db``). The pool asks the sentinels for the master's address at
  each new connection, and a connection that failed is dropped, so after a failover the
  next connection goes to the promoted replica: the proxy follows failovers by itself.
- ``cluster``: ``nodes`` are any cluster members; ``RedisCluster`` learns the slot map
  from them and refreshes it after a connection error. Every key a single call touches
  must hash to one slot: ``hash_tagged`` makes such keys.

The password (``password_env``) is read from the environment at each connect by a
credential provider: it is never stored on the client, so no ``repr``, log line, error
message or ``/status`` can show it. It goes to the data nodes, and to the sentinels too:
sentinels that require one (``requirepass``, as Helm charts set it to the data nodes'
password) get it, and a sentinel without a password of its own, which refuses an AUTH,
is asked again on the same connection without one (``_sentinel_connected``). A URL may
carry its own password instead; config refuses both at once.

Retries inside redis-py are off in every mode: callers bound each call with their own
deadline and have their own fallback, and a retry would double the time a dead Redis
costs. ``connect_timeout`` bounds each TCP connect (also to the sentinels).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import AuthenticationError

from proxy.config import RedisConfig

log = logging.getLogger(__name__)


class EnvPassword(CredentialProvider):
    """The password in environment variable ``name``, read at each connect (no AUTH when
    the variable is unset or empty)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get_credentials(self) -> tuple[str] | tuple[()]:  # type: ignore[override]
        password = os.environ.get(self.name)
        return (password,) if password else ()

    async def get_credentials_async(self) -> tuple[str] | tuple[()]:  # type: ignore[override]
        return self.get_credentials()

    def __repr__(self) -> str:
        return f"EnvPassword({self.name!r})"


@dataclass(eq=False)
class SharedRedis:
    """One open client for the configured Redis, and how to close all it opened.

    ``client`` is a ``redis.asyncio.Redis`` (single, sentinel) or a ``RedisCluster``
    (cluster); ``mode`` says which, ``where`` names it for logs (never the password).
    """

    mode: str
    client: Any
    where: str
    _sentinel: Sentinel | None = None

    @property
    def cluster(self) -> bool:
        """True when calls go through ``RedisCluster``: one slot per call, no pipelines
        of scripts across slots."""
        return self.mode == "cluster"

    async def ping(self) -> None:
        """PING what the client writes to; raises redis-py's error if any part fails.

        In cluster mode that is every master, each asked on its own: RedisCluster's own
        ``ping()`` was seen answering True while a dead master still held slots. The
        slot map is refreshed first when a failed call asked for it, so after a
        failover the promoted replica is asked, not the dead node.
        """
        if not self.cluster:
            await self.client.ping()
            return
        await self.client.initialize()
        await asyncio.gather(
            *[self.client.ping(target_nodes=node) for node in self.client.get_primaries()]
        )

    async def aclose(self) -> None:
        """Close the client, its pools and (sentinel) the clients of the sentinels."""
        try:
            await self.client.aclose()
        finally:
            if self._sentinel is not None:
                await self._sentinel.aclose()


def hash_tagged(prefix: str, key: str) -> str:
    """``{prefix}{{key}}``: Redis Cluster hashes only the part in braces, so every key
    made from ``key`` (with any prefix) lands in the slot ``key`` picks.

    A ``}`` inside ``key`` ends the tag early: the slot then comes from the part before
    it, still the same slot for the same key, which is all a one-key call needs.
    """
    return f"{prefix}{{{key}}}"


def connect(
    config: RedisConfig,
    *,
    connect_timeout: float | None = None,
    socket_timeout: float | None = None,
    **client_options: Any,
) -> SharedRedis:
    """A client for ``config`` (no I/O yet: connections open on first use).

    ``connect_timeout`` defaults to ``config.timeout``; ``socket_timeout`` (per read and
    write inside redis-py) defaults to none: callers that bound whole calls themselves
    spare its per-read timer. ``client_options`` go to redis-py as they are (e.g.
    ``decode_responses``, ``max_connections``).
    """
    connect_timeout = config.timeout if connect_timeout is None else connect_timeout
    password: dict[str, Any] = {}
    if config.password_env:
        password["credential_provider"] = EnvPassword(config.password_env)
        if not os.environ.get(config.password_env):
            log.warning(
                "redis.password_env: %s is not set; connecting without a password",
                config.password_env,
            )
    options = _bounded(connect_timeout, socket_timeout) | password | client_options
    if config.mode == "single":
        assert config.url is not None
        client = redis.asyncio.Redis.from_url(config.url, retry_on_error=[], **options)
        return SharedRedis("single", client, _url_without_password(config.url))
    nodes = [_host_port(node) for node in config.nodes]
    listed = ",".join(config.nodes)
    if config.mode == "sentinel":
        assert config.master is not None
        # Sentinel queries happen inside a connect: each is bounded as the connect is.
        sentinel_options = _bounded(connect_timeout, connect_timeout) | password
        if password:
            sentinel_options["redis_connect_func"] = _sentinel_connected
        sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_options)
        client = sentinel.master_for(config.master, db=config.db, **options)
        where = f"sentinel master {config.master} db {config.db} via {listed}"
        return SharedRedis("sentinel", client, where, sentinel)
    if config.mode == "cluster":
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes], **options
        )
        return SharedRedis("cluster", client, f"cluster via {listed}")
    raise ValueError(f"unknown redis mode {config.mode!r}")


def _bounded(connect_timeout: float, socket_timeout: float | None) -> dict[str, Any]:
    """The timeouts of a client's connections, and no retries inside redis-py (a fresh
    ``Retry`` each: redis-py may adjust a client's own)."""
    return {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), 0),
    }


# What a server without a password says to AUTH (Redis 6 and later; before).
_NO_PASSWORD_SET = ("without any password configured", "no password is set")


async def _sentinel_connected(connection: Any) -> None:
    """A new connection to a sentinel: set up with the password (redis-py's
    ``on_connect``), or, when this sentinel has none of its own and refuses the AUTH,
    without it. The connection remembers: it reconnects without AUTH."""
    try:
        await connection.on_connect()
    except AuthenticationError as error:
        if connection.credential_provider is None or not any(
            words in str(error) for words in _NO_PASSWORD_SET
        ):
            raise
        connection.credential_provider = None
        await connection.on_connect()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _url_without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
