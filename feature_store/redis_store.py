"""The Redis backend of the history store: one round trip per batch of users.

Reads go through redis.asyncio on the service's event loop: GET for one user, MGET for a
batch, the keys of the data version that `{ns}:current` names. The version is re-read
lazily at most every `version_refresh_s` seconds (and on a miss, at most every
`miss_refresh_s`), so a new bulk load is picked up without a restart and a reader never
uses a version older than that; the loader waits longer than this before deleting the
old version. Bulk loads use a plain synchronous client (feature_store/loader.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from feature_store.base import HistoryStore, StoreUnavailableError
from feature_store.keys import KeySpace, check_name, current_key
from feature_store.loader import DEFAULT_CHUNK_USERS, DEFAULT_MAX_HISTORY, LoadReport, load_log
from feature_store.records import CorruptValueError, UserHistory, decode_user
from model.data.log import BehaviourLog

logger = logging.getLogger(__name__)

_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, OSError)


def redacted_url(url: str) -> str:
    """The URL without its password (user-info or `?password=`), fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None and "password" not in parts.query.lower():
        return url
    if parts.password is not None:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    if "password" in parts.query.lower():
        query = "&".join(
            f"{k}=***" if k.lower() == "password" else (f"{k}={v}" if sep else k)
            for k, sep, v in (item.partition("=") for item in parts.query.split("&"))
        )
        parts = parts._replace(query=query)
    return urlunsplit(parts)


class RedisHistoryStore(HistoryStore):
    """Histories of one namespace in one Redis (standalone; Cluster comes later)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        url: str,
        namespace: str = "din",
        version_refresh_s: float = 1.0,
        miss_refresh_s: float = 0.1,
    ):
        self._redis = client
        self._url = url
        self.namespace = check_name(namespace, "namespace")
        self.version_refresh_s = version_refresh_s
        self.miss_refresh_s = miss_refresh_s
        self.decode_errors = 0  # values that failed to decode (served as unknown users)
        self._keys: KeySpace | None = None
        self._meta: dict = {}
        self._checked_at = float("-inf")  # time.monotonic() of the last pointer read

    @classmethod
    def from_url(
        cls,
        url: str,
        namespace: str = "din",
        *,
        socket_timeout: float = 0.5,
        socket_connect_timeout: float = 0.5,
        max_connections: int | None = None,
        retries: int = 1,
        retry_backoff_s: float = 0.0,
        retry_backoff_cap_s: float = 0.01,
        health_check_interval: float = 0.0,
        version_refresh_s: float = 1.0,
        miss_refresh_s: float = 0.1,
    ) -> "RedisHistoryStore":
        """A store for `url` (redis://, rediss:// for TLS, unix://; a password in the URL); connects on first use.

        Timeouts are short, and `retries` retries with exponential backoff (starting at
        `retry_backoff_s`, at most `retry_backoff_cap_s`; 0: at once) follow a connection
        error or timeout: a pooled connection broken by a Redis restart reconnects on the
        retry (redis-py 8 speaks RESP3 and sets no retry policy of its own worth relying on).
        A connection idle for `health_check_interval` seconds is PINGed before use (0: never).
        """
        backoff = ExponentialBackoff(cap=retry_backoff_cap_s, base=retry_backoff_s) if retry_backoff_s > 0 else NoBackoff()
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            max_connections=max_connections,
            retry=Retry(backoff, retries),
            health_check_interval=health_check_interval,
        )
        return cls(
            client, url=url, namespace=namespace,
            version_refresh_s=version_refresh_s, miss_refresh_s=miss_refresh_s,
        )

    # ---------------------------------------------------------------------- state
    @property
    def url(self) -> str:
        return redacted_url(self._url)

    @property
    def version(self) -> str | None:
        """The data version reads use now (None: nothing loaded, or not yet connected)."""
        return self._keys.version if self._keys else None

    @property
    def meta(self) -> dict:
        """The current version's meta (profile_fields, max_history, users, created_at...)."""
        return dict(self._meta)

    @property
    def profile_fields(self) -> tuple[str, ...]:
        return tuple(self._meta.get("profile_fields", ()))

    @property
    def max_history(self) -> int | None:
        return self._meta.get("max_history")

    def _unavailable(self, e: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(f"Redis at {self.url} is unavailable: {e.__class__.__name__}: {e}")

    async def refresh_version(self) -> str | None:
        """Re-read `{ns}:current` now (and the meta when the version changed)."""
        self._checked_at = time.monotonic()  # set first: concurrent readers don't pile on
        raw = await self._redis.get(current_key(self.namespace))
        version = raw.decode() if raw is not None else None
        if version == self.version:
            return version
        if version is None:
            self._keys, self._meta = None, {}
            return None
        keys = KeySpace(namespace=self.namespace, version=version)
        raw_meta = await self._redis.get(keys.meta)
        try:
            meta = json.loads(raw_meta) if raw_meta is not None else {}
        except ValueError:
            logger.warning("meta key %s is not JSON; profile fields unknown", keys.meta)
            meta = {}
        if self._keys is not None:
            logger.info("feature store %s: data version %s -> %s", self.namespace, self.version, version)
        self._keys, self._meta = keys, meta
        return version

    # ---------------------------------------------------------------------- reads
    async def _fetch(self, user_ids: list[int]) -> list[bytes | None]:
        if self._keys is None:
            return [None] * len(user_ids)
        if len(user_ids) == 1:
            return [await self._redis.get(self._keys.user(user_ids[0]))]
        return await self._redis.mget(self._keys.users(user_ids))

    def _decode(self, value: bytes | None, user_id: int) -> UserHistory | None:
        if value is None:
            return None
        try:
            return decode_user(value)
        except CorruptValueError as e:
            self.decode_errors += 1
            if self.decode_errors <= 10 or self.decode_errors % 1000 == 0:
                logger.warning("user %d: %s (served as an unknown user; %d so far)", user_id, e, self.decode_errors)
            return None

    async def get_histories(self, user_ids: Sequence[int]) -> list[UserHistory | None]:
        ids = [int(u) for u in user_ids]
        if not ids:
            return []
        try:
            now = time.monotonic()
            if now - self._checked_at >= self.version_refresh_s:
                await self.refresh_version()
            values = await self._fetch(ids)
            if None in values and time.monotonic() - self._checked_at >= self.miss_refresh_s:
                before = self.version
                if await self.refresh_version() != before:
                    values = await self._fetch(ids)
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        return [self._decode(v, u) for v, u in zip(values, ids)]

    async def scan_user_ids(self, limit: int, *, max_scanned: int = 20_000) -> list[int]:
        """Up to `limit` user ids of the current data version, in SCAN order; bounded work.

        SCAN walks Redis's hash table, so the order follows key hashes, not user ids: the
        first ids found are an arbitrary (not seeded, not uniform) but stable subset of the
        population. The walk stops at `limit` ids or after about `max_scanned` keys
        (SCAN COUNT steps of 1000), whichever comes first.
        """
        if limit < 1:
            return []
        step = 1000
        try:
            if time.monotonic() - self._checked_at >= self.version_refresh_s:
                await self.refresh_version()
            if self._keys is None:
                return []
            prefix = self._keys.user_prefix.encode()
            ids: list[int] = []
            cursor, scanned = 0, 0
            while True:
                cursor, keys = await self._redis.scan(cursor, match=prefix + b"*", count=step)
                scanned += step
                for key in keys:  # b"{prefix}{<uid>}"
                    with contextlib.suppress(ValueError):
                        ids.append(int(key[len(prefix) + 1 : -1]))
                if cursor == 0 or len(ids) >= limit or scanned >= max_scanned:
                    return ids[:limit]
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e

    async def ping(self) -> None:
        try:
            await self._redis.ping()
            if time.monotonic() - self._checked_at >= self.version_refresh_s:
                await self.refresh_version()
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e

    async def close(self) -> None:
        await self._redis.aclose()

    # ---------------------------------------------------------------------- writes
    def bulk_load(
        self,
        log: BehaviourLog,
        *,
        max_history: int = DEFAULT_MAX_HISTORY,
        keep_old: bool = False,
        progress: bool = False,
        chunk_users: int = DEFAULT_CHUNK_USERS,
        grace_s: float | None = None,
        profile_fields: Sequence[str] | None = None,
    ) -> LoadReport:
        """Load `log` into a new data version and switch to it (sync; see loader.py).

        `grace_s` (default: twice `version_refresh_s`) is how long the old version stays
        after the switch, so readers that have not re-checked the pointer still find it.
        `profile_fields` picks and orders the stored profile ids (a bundle's spec); None =
        all of the log's.
        """
        grace = 2 * self.version_refresh_s if grace_s is None else grace_s
        client = redis.Redis.from_url(self._url, socket_timeout=60.0, socket_connect_timeout=5.0)
        try:
            return load_log(
                client, log, namespace=self.namespace, max_history=max_history,
                keep_old=keep_old, progress=progress, chunk_users=chunk_users, grace_s=grace,
                profile_fields=profile_fields,
            )
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        finally:
            client.close()
