"""The configuration: YAML file -> frozen pydantic models.

The models below are the one place that states every key, its type and its default.
Attribute names are the YAML keys; durations are float seconds, sizes int bytes, rates
float tokens per second. Parsing never stops at the first problem: every error of a file
is collected and reported at once, each as `{file}: {location}: {message}`.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import math
import os
import re
import ssl
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from proxy.balancing.policies import POLICIES
from proxy.balancing.retry import FAILURE_WORDS, RETRY_CONDITIONS
from proxy.errors import ConfigError
from proxy.units import parse_duration, parse_rate, parse_size

__all__ = [
    "AdminConfig",
    "BreakerConfig",
    "CacheConfig",
    "CompressConfig",
    "Config",
    "ConfigError",
    "FlapDampingConfig",
    "HealthCheckConfig",
    "Limits",
    "Listener",
    "LoggingConfig",
    "MatchConfig",
    "RateLimitConfig",
    "RedisConfig",
    "RetryConfig",
    "RouteCacheConfig",
    "RouteConfig",
    "ServerConfig",
    "StickyConfig",
    "TLSConfig",
    "Timeouts",
    "UpstreamConfig",
    "ZoneAffinityConfig",
    "load_config",
    "parse_config",
]

# Policy names and failure words come from the modules that act on them, one table each.
POLICY_NAMES = tuple(POLICIES)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
ON_REDIS_ERROR = ("local", "allow", "deny")
RATE_LIMIT_MODES = ("enforce", "shadow")
REDIS_MODES = ("single", "sentinel", "cluster")
CACHE_STORES = ("memory", "redis")
COMPRESSION_ALGORITHMS = ("zstd", "br", "gzip")
DEFAULT_COMPRESS_TYPES = (
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "image/svg+xml",
)

# An HTTP token (RFC 9110): what method and header names may be made of.
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


# --------------------------------------------------------------------------- validators


def _show(value: object) -> str:
    """A value as the user wrote it in YAML, for `(got ...)`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _converted(parse: Callable[[Any], Any], *, positive: bool = False) -> BeforeValidator:
    # The > 0 check lives here rather than in Field(gt=0) so the message quotes what the
    # user wrote ("got '0s'") instead of the converted number ("got 0.0").
    def convert(value: Any) -> Any:
        result = parse(value)
        if positive and result <= 0:
            raise ValueError(f"must be > 0 (got {_show(value)})")
        return result

    return BeforeValidator(convert)


Duration = Annotated[float, _converted(parse_duration)]
PositiveDuration = Annotated[float, _converted(parse_duration, positive=True)]
Size = Annotated[int, _converted(parse_size)]
Rate = Annotated[float, _converted(parse_rate)]


def _one_of(*choices: str, normalize: Callable[[str], str] = str) -> AfterValidator:
    def check(value: str) -> str:
        if normalize(value) not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {_show(value)})")
        return normalize(value)

    return AfterValidator(check)


def _keyed(*words: str) -> AfterValidator:
    """One of `words` (e.g. client_ip), or `header:NAME` / `cookie:NAME`."""
    expected = ", ".join([*words, "header:NAME", "cookie:NAME"])

    def check(value: str) -> str:
        kind, sep, name = value.partition(":")
        if value in words or (sep and kind in ("header", "cookie") and _TOKEN_RE.match(name)):
            return value
        raise ValueError(f"must be one of {expected} (got {_show(value)})")

    return AfterValidator(check)


def _non_empty(what: str) -> BeforeValidator:
    # Checked on the raw list: pydantic's min_length counts only the items that validated,
    # so one bad item in a short list would also be reported as "empty".
    def check(value: Any) -> Any:
        if isinstance(value, list | dict) and not value:
            raise ValueError(f"needs at least one {what}")
        return value

    return BeforeValidator(check)


def _parse_host_port(value: Any) -> tuple[str, int]:
    """'0.0.0.0:8080', '[::1]:8080', ':8080' (any address) or a bare port number."""
    usage = "use host:port, e.g. 0.0.0.0:8080 or [::1]:8080"
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_text = "", str(value)
    elif isinstance(value, str):
        host, sep, port_text = value.strip().rpartition(":")
        if not sep:
            raise ValueError(f"invalid address {_show(value)} ({usage})")
    else:
        raise ValueError(f"invalid address {_show(value)} ({usage})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid address {_show(value)} ({usage})") from None
    elif ":" in host or (host and not _HOSTNAME_RE.match(host)):
        raise ValueError(f"invalid address {_show(value)} ({usage})")
    if not port_text.isdigit():
        raise ValueError(f"invalid address {_show(value)} ({usage})")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535 (got {port})")
    return host or "0.0.0.0", port


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _normalized_address(value: Any) -> str:
    return _format_address(*_parse_host_port(value))


Address = Annotated[str, BeforeValidator(_normalized_address)]


def _stringify_scalar(value: Any) -> Any:
    """Header/cookie values may be written unquoted (`X-Canary: 1`); match them as text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


MatchValue = Annotated[str, BeforeValidator(_stringify_scalar)]

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any) -> Any:
    """`${NAME}` parts replaced by the environment's value (unset: empty); an empty result
    means "not set", so `zone: ${SLUICEGATE_ZONE}` without the variable is no zone."""
    if not isinstance(value, str):
        return value
    expanded = _ENV_RE.sub(lambda m: os.environ.get(m.group(1), ""), value).strip()
    return expanded or None


ZoneName = Annotated[str | None, BeforeValidator(_expand_env)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ------------------------------------------------------------------------------- models


class TLSConfig(_Model):
    cert: str
    key: str

    @field_validator("cert", "key")
    @classmethod
    def _readable(cls, path: str) -> str:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
        return path

    @model_validator(mode="after")
    def _loads_as_pair(self) -> TLSConfig:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
            raise ValueError(
                f"cannot load certificate {self.cert!r} with key {self.key!r}: {reason}"
            ) from None
        return self


def _first_of_its_kind(info: ValidationInfo, what: str, value: str) -> str:
    """Values that must be unique across a file; the validation context remembers them."""
    if info.context is not None:
        seen = info.context.setdefault(f"seen:{what}", set())
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)
    return value


class _Bound(_Model):
    """A model with an ``address``: its host and port, derived (not settable in YAML)."""

    address: Address

    @functools.cached_property
    def host(self) -> str:
        return _parse_host_port(self.address)[0]

    @functools.cached_property
    def port(self) -> int:
        return _parse_host_port(self.address)[1]


class Listener(_Bound):
    tls: TLSConfig | None = None

    @field_validator("address")
    @classmethod
    def _unique(cls, address: str, info: ValidationInfo) -> str:
        return _first_of_its_kind(info, "listen address", address)


class AdminConfig(_Bound):
    address: Address = "127.0.0.1:9901"
    token_env: str | None = None


class RedisConfig(_Model):
    mode: Annotated[str, _one_of(*REDIS_MODES)] = "single"
    url: str | None = None  # mode single
    nodes: tuple[Address, ...] = ()  # mode sentinel (the sentinels) or cluster (any members)
    master: str | None = None  # mode sentinel: the monitored master's name
    db: Annotated[int, Field(ge=0)] = 0  # mode sentinel
    password_env: str | None = None  # the password is read from this environment variable
    timeout: PositiveDuration = 0.05
    instances: Annotated[int, Field(ge=1)] = 1

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"invalid redis URL {url!r} (use redis://host:port/db, rediss:// or unix://)"
            )
        return url

    @model_validator(mode="after")
    def _mode_needs(self) -> RedisConfig:
        if self.mode == "single":
            if self.url is None:
                raise ValueError("mode single needs url (e.g. redis://127.0.0.1:6379/0)")
            if self.nodes or self.master:
                raise ValueError("nodes and master are for mode sentinel or cluster")
            if self.password_env and urlsplit(self.url).password is not None:
                raise ValueError("url carries a password and password_env names another: keep one")
        else:
            if self.url is not None:
                raise ValueError(f"mode {self.mode} takes nodes, not url")
            if not self.nodes:
                raise ValueError(f"mode {self.mode} needs nodes: [host:port, ...]")
            if self.mode == "sentinel" and not self.master:
                raise ValueError("mode sentinel needs master (the monitored master's name)")
            if self.mode == "cluster" and self.master:
                raise ValueError("master is for mode sentinel")
        return self

    @property
    def password(self) -> str | None:
        """Read at each connect, never stored in the config or shown."""
        return os.environ.get(self.password_env) if self.password_env else None


class CacheConfig(_Model):
    store: Annotated[str, _one_of(*CACHE_STORES)] = "memory"
    max_size: Annotated[Size, Field(ge=1)] = 256 * 1024 * 1024
    max_object_size: Annotated[Size, Field(ge=1)] = 8 * 1024 * 1024
    lock_timeout: Duration = 5.0


class Limits(_Model):
    max_header_bytes: Annotated[Size, Field(ge=1)] = 16 * 1024
    max_body_bytes: Size = 10 * 1024 * 1024
    client_header_timeout: PositiveDuration = 10.0
    client_body_timeout: PositiveDuration = 30.0
    keepalive_timeout: Duration = 75.0
    max_connections: Annotated[int, Field(ge=1)] = 10000


class LoggingConfig(_Model):
    level: Annotated[str, _one_of(*LOG_LEVELS, normalize=str.lower)] = "info"
    access_log: bool = True
    format: Annotated[str, _one_of(*LOG_FORMATS)] = "json"


class ServerConfig(_Model):
    url: str
    weight: Annotated[int, Field(ge=1)] = 1
    backup: bool = False
    zone: ZoneName = None
    resolve: PositiveDuration | None = None  # DNS discovery: re-resolve the host this often

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        _parse_server_url(url)
        return url

    @functools.cached_property
    def _parts(self) -> tuple[str, str, int]:
        return _parse_server_url(self.url)

    @property
    def scheme(self) -> str:
        return self._parts[0]

    @property
    def host(self) -> str:
        return self._parts[1]

    @property
    def port(self) -> int:
        return self._parts[2]


def _parse_server_url(url: str) -> tuple[str, str, int]:
    """'http://10.0.0.1:8080' -> ('http', '10.0.0.1', 8080); https defaults to 443."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid URL {url!r}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"invalid URL {url!r} (scheme must be http or https)")
    if not parts.hostname:
        raise ValueError(f"invalid URL {url!r} (no host)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"invalid URL {url!r} (no path, query or fragment allowed)")
    if parts.username is not None:
        raise ValueError(f"invalid URL {url!r} (no user info allowed)")
    if port == 0:
        raise ValueError(f"invalid URL {url!r} (port must be 1-65535)")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


class Timeouts(_Model):
    connect: PositiveDuration = 1.0
    read: PositiveDuration = 30.0


class FlapDampingConfig(_Model):
    max_flips: Annotated[int, Field(ge=1)] = 4
    window: PositiveDuration = 60.0
    hold_down: PositiveDuration = 30.0


def _parse_status_range(value: Any) -> Any:
    """'200-399', '200' or 200 -> (low, high)."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d{3}\s*(-\s*\d{3}\s*)?", value):
        low_text, _, high_text = value.partition("-")
        low, high = int(low_text), int(high_text or low_text)
    else:
        raise ValueError(f"must be a status range like 200-399, or one status (got {_show(value)})")
    if not (100 <= low <= 599 and 100 <= high <= 599):
        raise ValueError(f"status must be 100-599 (got {_show(value)})")
    if low > high:
        raise ValueError(f"range must be low-high (got {_show(value)})")
    return (low, high)


class HealthCheckConfig(_Model):
    path: str = "/health"
    interval: PositiveDuration = 2.0
    timeout: PositiveDuration = 1.0
    healthy_threshold: Annotated[int, Field(ge=1)] = 2
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 3
    expect_status: Annotated[tuple[int, int], BeforeValidator(_parse_status_range)] = (200, 399)
    flap_damping: FlapDampingConfig | None = None

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"must start with '/' (got {path!r})")
        return path


class BreakerConfig(_Model):
    failure_threshold: Annotated[int, Field(ge=1)] = 5
    open_duration: PositiveDuration = 30.0
    half_open_requests: Annotated[int, Field(ge=1)] = 1
    failure_rate: Annotated[float, Field(gt=0, le=1)] | None = None
    min_requests: Annotated[int, Field(ge=1)] = 20
    window: PositiveDuration = 10.0


class RetryConfig(_Model):
    tries: Annotated[int, Field(ge=1)] = 3
    timeout: PositiveDuration = 10.0
    on: frozenset[Annotated[str, _one_of(*RETRY_CONDITIONS)]] = frozenset({"error", "timeout"})
    max_body_bytes: Size = 1024 * 1024
    budget: Annotated[float, Field(gt=0, le=1)] = 0.2


class StickyConfig(_Model):
    cookie: Annotated[str, Field(min_length=1)] = "sg_srv"
    ttl: PositiveDuration = 3600.0

    @field_validator("cookie")
    @classmethod
    def _cookie_name(cls, name: str) -> str:
        if not _TOKEN_RE.match(name):
            raise ValueError(f"invalid cookie name {name!r}")
        return name


class ZoneAffinityConfig(_Model):
    min_healthy_percent: Annotated[float, Field(ge=0, le=100)] = 50.0


class UpstreamConfig(_Model):
    name: str  # filled from the key under `upstreams:`
    policy: Annotated[str, _one_of(*POLICY_NAMES)] = "round_robin"
    hash_key: Annotated[str, _keyed("client_ip")] | None = None
    servers: Annotated[tuple[ServerConfig, ...], _non_empty("server")]
    keepalive: Annotated[int, Field(ge=0)] = 64
    timeouts: Timeouts = Timeouts()
    failure_on: frozenset[Annotated[str, _one_of(*FAILURE_WORDS)]] = frozenset(
        {"error", "timeout", "invalid_header", "http_502", "http_503", "http_504"}
    )
    health_check: HealthCheckConfig | None = None
    min_healthy_percent: Annotated[float, Field(ge=0, le=100)] = 0.0
    circuit_breaker: BreakerConfig = BreakerConfig()
    retry: RetryConfig = RetryConfig()
    resolvers: tuple[Address, ...] = ()  # DNS servers for `resolve`; empty: the system's
    slow_start: Duration = 0.0  # 0: off
    sticky: StickyConfig | None = None
    zone_affinity: ZoneAffinityConfig | None = None

    @field_validator("servers")
    @classmethod
    def _has_primary(cls, servers: tuple[ServerConfig, ...]) -> tuple[ServerConfig, ...]:
        if servers and all(server.backup for server in servers):
            raise ValueError("at least one server must not be a backup")
        return servers

    @model_validator(mode="before")
    @classmethod
    def _default_hash_key(cls, data: Any) -> Any:
        """ip_hash without a hash_key hashes the client address."""
        if isinstance(data, dict) and data.get("policy") == "ip_hash" and "hash_key" not in data:
            data = {**data, "hash_key": "client_ip"}
        return data


class MatchConfig(_Model):
    host: str | None = None
    path_prefix: str = "/"
    methods: frozenset[str] | None = None
    headers: dict[str, MatchValue] = Field(default_factory=dict)
    cookie: dict[str, MatchValue] = Field(default_factory=dict)

    @field_validator("host")
    @classmethod
    def _host_pattern(cls, host: str | None) -> str | None:
        if host is None:
            return None
        name = host[2:] if host.startswith("*.") else host
        if not _HOSTNAME_RE.match(name) or "*" in name:
            raise ValueError(f"must be a host name or *.suffix (got {host!r})")
        return host.lower()

    @field_validator("path_prefix")
    @classmethod
    def _absolute_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"must start with '/' (got {path!r})")
        return path

    @field_validator("methods", mode="before")
    @classmethod
    def _upper_methods(cls, methods: Any) -> Any:
        if not isinstance(methods, list | tuple):
            return methods
        for method in methods:
            if not isinstance(method, str) or not _TOKEN_RE.match(method):
                raise ValueError(f"invalid method {_show(method)}")
        return frozenset(method.upper() for method in methods)

    @field_validator("headers")
    @classmethod
    def _lower_header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        # Header names are case-insensitive: keep them lower-case so matching is a lookup.
        for name in headers:
            if not _TOKEN_RE.match(name):
                raise ValueError(f"invalid header name {name!r}")
        return {name.lower(): value for name, value in headers.items()}


class RateLimitConfig(_Model):
    rate: Rate
    burst: Annotated[int, Field(ge=1)] | None = None  # None -> max(1, ceil(rate per second))
    key: Annotated[str, _keyed("client_ip", "route")] = "client_ip"
    on_redis_error: Annotated[str, _one_of(*ON_REDIS_ERROR)] = "local"
    mode: Annotated[str, _one_of(*RATE_LIMIT_MODES)] = "enforce"

    @model_validator(mode="after")
    def _default_burst(self) -> RateLimitConfig:
        if self.burst is None:
            # The model is frozen; this is its own construction, the one moment to fill it.
            object.__setattr__(self, "burst", max(1, math.ceil(self.rate)))
        return self


def _cache_key_part(value: str) -> str:
    kind, sep, name = value.partition(":")
    if sep and kind in ("header", "cookie") and _TOKEN_RE.match(name):
        return f"{kind}:{name.lower()}" if kind == "header" else value
    raise ValueError(f"must be header:NAME or cookie:NAME (got {_show(value)})")


class RouteCacheConfig(_Model):
    key: tuple[Annotated[str, AfterValidator(_cache_key_part)], ...] = ()
    heuristic: bool = False


class CompressConfig(_Model):
    algorithms: Annotated[
        tuple[Annotated[str, _one_of(*COMPRESSION_ALGORITHMS)], ...], _non_empty("algorithm")
    ] = COMPRESSION_ALGORITHMS
    min_size: Size = 1024
    types: tuple[str, ...] = DEFAULT_COMPRESS_TYPES
    level: Annotated[int, Field(ge=1, le=9)] | None = None  # None: each algorithm's default


class RouteConfig(_Model):
    name: Annotated[str, Field(min_length=1)]
    match: MatchConfig = MatchConfig()
    upstream: str
    strip_prefix: bool = False
    rate_limit: RateLimitConfig | None = None
    cache: RouteCacheConfig | None = None
    compress: CompressConfig | None = None

    @field_validator("name")
    @classmethod
    def _unique_name(cls, name: str, info: ValidationInfo) -> str:
        return _first_of_its_kind(info, "route name", name)

    @field_validator("upstream")
    @classmethod
    def _defined_upstream(cls, upstream: str, info: ValidationInfo) -> str:
        known = (info.context or {}).get("upstream_names")
        if known is not None and upstream not in known:
            raise ValueError(f"unknown upstream {upstream!r}{_did_you_mean(upstream, known)}")
        return upstream


def _parse_network(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"invalid network {_show(value)} (use e.g. 10.0.0.0/8 or 127.0.0.1)")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError as exc:
        raise ValueError(f"invalid network {value!r} ({exc})") from None


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_parse_network)]


class Config(_Model):
    source: str = ""  # the file it came from; set by parse_config, not a YAML key
    listen: Annotated[tuple[Listener, ...], _non_empty("listener")] = (
        Listener(address="0.0.0.0:8080"),
    )
    # validate_default: the default admin address may clash with a listener too.
    admin: AdminConfig = Field(default=AdminConfig(), validate_default=True)
    workers: Annotated[int, Field(ge=0)] = 1  # 0 = one per CPU, resolved by the daemon
    trusted_proxies: tuple[Network, ...] = ()
    shutdown_timeout: Duration = 30.0
    # SIGTERM: keep serving (readiness 503, answers `Connection: close`) this long before
    # the listeners close, so an L4 balancer or a Kubernetes Service stops sending first.
    drain_time: Duration = 0.0
    redis: RedisConfig | None = None
    zone: ZoneName = None
    cache: CacheConfig | None = None
    limits: Limits = Limits()
    logging: LoggingConfig = LoggingConfig()
    upstreams: Annotated[dict[str, UpstreamConfig], _non_empty("upstream")]
    routes: Annotated[tuple[RouteConfig, ...], _non_empty("route")]

    @field_validator("admin")
    @classmethod
    def _admin_apart_from_traffic(cls, admin: AdminConfig, info: ValidationInfo) -> AdminConfig:
        for index, listener in enumerate(info.data.get("listen", ())):
            if listener.address == admin.address:
                raise ValueError(f"same address as listen[{index}] ({admin.address})")
        return admin

    @model_validator(mode="before")
    @classmethod
    def _name_upstreams(cls, data: Any) -> Any:
        """Each upstream's `name` is its key under `upstreams:`."""
        if isinstance(data, dict) and isinstance(data.get("upstreams"), dict):
            # YAML reads `123:` as a number; an upstream name is text all the same.
            upstreams = {
                str(key): {**value, "name": str(key)} if isinstance(value, dict) else value
                for key, value in data["upstreams"].items()
            }
            data = {**data, "upstreams": upstreams}
        return data

    @model_validator(mode="after")
    def _cache_needs_section(self) -> Config:
        for index, route in enumerate(self.routes):
            if route.cache is not None and self.cache is None:
                raise ValueError(f"routes[{index}].cache: needs the top-level cache section")
        if self.cache is not None and self.cache.store == "redis" and self.redis is None:
            raise ValueError("cache.store: redis needs the top-level redis section")
        return self

    def summary(self) -> str:
        """'3 routes, 2 upstreams, 3 servers' (servers counted over all upstreams)."""
        servers = sum(len(upstream.servers) for upstream in self.upstreams.values())
        return ", ".join(
            [
                _count(len(self.routes), "route"),
                _count(len(self.upstreams), "upstream"),
                _count(servers, "server"),
            ]
        )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------- loading

# Keys a user may not write although the model has them: filled in by the loader.
_RESERVED_KEYS = {Config: {"source"}, UpstreamConfig: {"name"}}


def read_config_file(path: str) -> bytes:
    """The config file's bytes; raises ConfigError when it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None


def load_config(path: str, content: bytes | None = None) -> Config:
    """Read and validate a YAML config file (``content``: its bytes, when already read);
    raises ConfigError listing every problem."""
    if content is None:
        content = read_config_file(path)
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: cannot read config file: not UTF-8 ({exc.reason})"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {_describe_yaml_error(exc)}"]) from None
    return parse_config(data, path)


def parse_config(data: Any, source: str) -> Config:
    """Validate already-parsed YAML data; `source` names it in errors and `Config.source`."""
    if data is None:
        raise ConfigError([f"{source}: the file is empty (expected a mapping of settings)"])
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: top level must be a mapping (got {_show(data)})"])
    errors = [f"{source}: {where}: unknown key" for where in _reserved_keys_used(data)]
    upstreams = data.get("upstreams")
    # Routes check their upstream against these names; when `upstreams` itself is broken
    # that is the error to report, not every route.
    names = {str(name) for name in upstreams} if isinstance(upstreams, dict) else None
    context = {"upstream_names": names}
    try:
        config = Config.model_validate({**data, "source": source}, context=context)
    except ValidationError as exc:
        errors += [f"{source}: {line}" for line in _translate(exc)]
        raise ConfigError(errors) from None
    if errors:
        raise ConfigError(errors)
    return config


def _reserved_keys_used(data: dict) -> list[str]:
    found = ["source"] if "source" in data else []
    upstreams = data.get("upstreams")
    if isinstance(upstreams, dict):
        for name, upstream in upstreams.items():
            if isinstance(upstream, dict) and "name" in upstream:
                found.append(f"upstreams.{name}.name")
    return found


class _StrictLoader(yaml.SafeLoader):
    """YAML 1.2-style booleans (only true/false: `on:` is a key, not True) and no
    duplicate keys (a later value silently winning hides mistakes)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"


# ------------------------------------------------------------------ error translation


def _translate(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        if error["type"] == "invalid_key":  # the key itself is the location: `5:` not `[5]`
            loc = (*loc[:-1], str(loc[-1]))
        lines.append(f"{_format_location(loc)}: {_message(error)}")
    return lines


def _format_location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


_TYPE_NAMES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "frozen_set_type": "a list",
}


def _message(error: Any) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return "required"
    if kind == "invalid_key":  # a mapping key that is not text, e.g. `5: x`
        return "unknown key"
    if kind == "extra_forbidden":
        return "unknown key" + _did_you_mean(str(error["loc"][-1]), _keys_at(error["loc"][:-1]))
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]} (got {_show(value)})"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        symbol, name = bounds[kind]
        return f"must be {symbol} {_show(ctx[name])} (got {_show(value)})"
    return error["msg"][:1].lower() + error["msg"][1:]


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys a user may write at `loc`, for did-you-mean hints."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        elif typing.get_origin(annotation) in (tuple, list, frozenset):
            annotation = typing.get_args(annotation)[0]
        else:
            return []
    model = _unwrap(annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [key for key in model.model_fields if key not in _RESERVED_KEYS.get(model, ())]


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and `X | None` down to X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation
