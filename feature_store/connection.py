"""Where the store lives: a Redis URL, standalone or Cluster, turned into redis-py clients.

`redis+cluster://host:port` (or `rediss+cluster://`, or any URL with `cluster=True`,
e.g. from `REDIS_CLUSTER=true`) selects redis-py's cluster client, which discovers the
other nodes from the one named; every other URL (`redis://`, `rediss://`, `unix://`) is
a single Redis. The same key layout serves both: every multi-key command the store
sends touches one user's keys, which share a hash tag (feature_store/keys.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def redacted_url(url: str) -> str:
    """The URL without its password, fit for logs, /readyz and error messages.

    Textual, not parsed: the user-info is everything before the last '@' ahead of the query
    (a password may hold '/' or ':'), and a query parameter counts as the password when its
    percent-decoded name is `password` (redis-py decodes `%70assword` too). Host, port (IPv6
    brackets included) and path stay as written.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, qmark, query = rest.partition("?")
    if "@" in head:
        userinfo, host = head.rsplit("@", 1)
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        head = f"{user}:***@{host}"
    if query:
        items = (item.partition("=") for item in query.split("&"))
        query = "&".join(
            f"{k}=***" if unquote_plus(k).lower() == "password" else k + eq + v for k, eq, v in items
        )
    return f"{scheme}://{head}{qmark}{query}"


@dataclass(frozen=True)
class RedisAddress:
    """A Redis URL as redis-py takes it, and whether it names a Redis Cluster."""

    url: str
    cluster: bool = False

    @classmethod
    def parse(cls, url: str, cluster: bool | None = None) -> "RedisAddress":
        """`redis+cluster://` -> (redis://..., cluster); `cluster=True` forces the cluster client."""
        scheme = urlsplit(url).scheme.lower()
        if scheme in CLUSTER_SCHEMES:
            plain = urlunsplit(urlsplit(url)._replace(scheme=CLUSTER_SCHEMES[scheme]))
            return cls(plain, True)
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"Redis URL {redacted_url(url)!r} has scheme {scheme!r}; use redis://, rediss://, unix://, "
                f"redis+cluster:// or rediss+cluster://"
            )
        if cluster and scheme == "unix":
            raise ValueError("a Redis Cluster is reached over TCP: use redis+cluster://host:port, not unix://")
        return cls(url, bool(cluster))

    @property
    def redacted(self) -> str:
        return redacted_url(self.url)


def sync_client(address: RedisAddress, *, socket_timeout: float = 60.0, socket_connect_timeout: float = 5.0):
    """A blocking client (bulk loads, stats, the benchmark): `redis.Redis` or `redis.RedisCluster`."""
    kw = dict(socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout)
    if address.cluster:
        return redis.RedisCluster.from_url(address.url, **kw)
    return redis.Redis.from_url(address.url, **kw)


def async_client(
    address: RedisAddress,
    *,
    socket_timeout: float = 0.5,
    socket_connect_timeout: float = 0.5,
    max_connections: int | None = None,
    retries: int = 1,
    retry_backoff_s: float = 0.0,
    retry_backoff_cap_s: float = 0.01,
    health_check_interval: float = 0.0,
):
    """An asyncio client for the service: `redis.asyncio.Redis` or `redis.asyncio.RedisCluster`.

    `retries` retries with exponential backoff (from `retry_backoff_s`, at most
    `retry_backoff_cap_s`; 0: at once) follow a connection error or timeout, so a pooled
    connection broken by a Redis restart reconnects; redis-py sets no policy worth relying on.
    """
    backoff = ExponentialBackoff(cap=retry_backoff_cap_s, base=retry_backoff_s) if retry_backoff_s > 0 else NoBackoff()
    retry = AsyncRetry(backoff, retries)
    if address.cluster:
        kw = {} if max_connections is None else {"max_connections": max_connections}
        return aioredis.RedisCluster.from_url(
            address.url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
            retry=retry, health_check_interval=health_check_interval, **kw,
        )
    return aioredis.Redis.from_url(
        address.url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
        max_connections=max_connections, retry=retry, health_check_interval=health_check_interval,
    )


def is_cluster(client) -> bool:
    return isinstance(client, (redis.RedisCluster, aioredis.RedisCluster))
