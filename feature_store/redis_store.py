"""The Redis backend of the history store: one round trip per batch of users.

Reads go through redis.asyncio on the service's event loop: one MGET per batch of users
(split per slot on a Redis Cluster; a key of the wrong type reads as nil), the keys of the
data version that `{ns}:current` names. The version is re-read lazily at most every `version_refresh_s`
seconds (and on a miss, at most every `miss_refresh_s`), so a new bulk load is picked up
without a restart and a reader never uses a version older than that; the loader waits
longer than this before deleting the old version. Live appends run the Lua script of
feature_store/append_script.py per user, steered by the version's fences
(feature_store/fences.py). Bulk loads use a plain synchronous client (loader.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import redis
import redis.asyncio as aioredis

from feature_store import metrics
from feature_store.append_script import APPEND_LUA, APPEND_SHA, PENDING_TTL_S
from feature_store.base import (
    CONNECTION_WAIT,
    AdFeatures,
    HistoryStore,
    StoreBusyError,
    StoreError,
    StoreStats,
    StoreUnavailableError,
)
from feature_store.connection import RedisAddress, async_client, redacted_url, sync_client
from feature_store.events import AppendReport, EventBatch
from feature_store.fences import Fence, user_fence_tag
from feature_store.keys import KeySpace, check_name, current_key, loading_key, retiring_key
from feature_store.loader import (
    AD_FIELDS,
    DEFAULT_CHUNK_USERS,
    DEFAULT_ID_TTL_S,
    DEFAULT_ID_WINDOW,
    DEFAULT_MAX_HISTORY,
    LoadReport,
    create_empty_version,
    load_log,
)
from feature_store.records import MAX_PROFILE_FIELDS, CorruptValueError, UserHistory, decode_ads, decode_users
from model.data.log import BehaviourLog

logger = logging.getLogger(__name__)

# no answer, or a cluster that is not serving right now (CLUSTERDOWN, TRYAGAIN: error replies
# that say "retry later", not "refused"): an outage, which the service's breaker counts
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, OSError, redis.exceptions.ClusterError, redis.exceptions.TryAgainError)
_POOL_EXHAUSTED = redis.exceptions.MaxConnectionsError  # a ConnectionError, but Redis was not asked
MAX_APPEND_HOPS = 6  # version redirects one append may follow (normally 1, 2 during a load)
STATS_SAMPLE = 1000  # user keys whose MEMORY USAGE / STRLEN `stats` averages

__all__ = ["RedisHistoryStore", "StoreError", "redacted_url"]


class _CallSlots:
    """At most `n` store calls in flight, `n` being the connection pool's size.

    Each call holds at most one connection (per node, on a cluster) at a time, so calls
    past the pool's size queue here for a free one instead of failing with redis-py's
    MaxConnectionsError ("Too many connections"), which says nothing about Redis. While a
    call queues, the caller's ConnectionWait (feature_store.base) says so: its deadline
    passing there is local congestion, not an outage. Waiters are served in arrival order,
    so a burst of ad look-ups does not starve the history reads that came in between.
    """

    __slots__ = ("_sem",)

    def __init__(self, n: int):
        self._sem = asyncio.Semaphore(n)

    async def __aenter__(self) -> None:
        sem = self._sem
        if not sem.locked():
            await sem.acquire()  # returns at once
            return
        wait = CONNECTION_WAIT.get()
        if wait is None:
            await sem.acquire()
            return
        wait.waiting = True  # left set if the wait is cancelled: the caller's deadline passed here
        await sem.acquire()
        wait.waiting = False

    async def __aexit__(self, *exc) -> None:
        self._sem.release()


def _field_names(value: object, *, at_least: int) -> bool:
    return (
        isinstance(value, list) and at_least <= len(value) <= MAX_PROFILE_FIELDS
        and all(isinstance(f, str) and f for f in value)
    )


def meta_problems(meta: dict) -> dict[str, str]:
    """The fields of a version's meta that the reads rely on and that are not of the shape
    `din load` writes: {field: what is wrong}. A missing field is not a problem (the reads
    use their defaults), a present one of the wrong shape is garbage."""
    problems: dict[str, str] = {}
    if "ad_fields" in meta and not _field_names(meta["ad_fields"], at_least=1):
        problems["ad_fields"] = f"a list of 1..{MAX_PROFILE_FIELDS} field names"
    if "profile_fields" in meta and not _field_names(meta["profile_fields"], at_least=0):
        problems["profile_fields"] = f"a list of at most {MAX_PROFILE_FIELDS} field names"
    max_history = meta.get("max_history")
    if "max_history" in meta and not (isinstance(max_history, int) and not isinstance(max_history, bool) and max_history > 0):
        problems["max_history"] = "a positive integer"
    return {field: f"{field!r} is {json.dumps(meta[field])[:80]}, not {shape}" for field, shape in problems.items()}


class RedisHistoryStore(HistoryStore):
    """Histories and ad features of one namespace in one Redis or one Redis Cluster."""

    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        *,
        url: str,
        namespace: str = "din",
        version_refresh_s: float = 1.0,
        miss_refresh_s: float = 0.1,
        cluster: bool | None = None,
        max_connections: int | None = None,
    ):
        """`max_connections`: the client's pool size (per node on a cluster); store calls past
        it queue for a free connection (None: no bound, the pool is unbounded)."""
        self._redis = client
        self._url = url
        self._address = RedisAddress.parse(url, cluster)
        self.cluster = isinstance(client, aioredis.RedisCluster)
        self.namespace = check_name(namespace, "namespace")
        self.version_refresh_s = version_refresh_s
        self.miss_refresh_s = miss_refresh_s
        self.decode_errors = 0  # values that failed to decode (served as unknown users / ads)
        self.repaired_values = 0  # corrupt user values replaced by a live append
        self._keys: KeySpace | None = None
        self._meta: dict = {}
        self._meta_errors: dict[str, str] = {}  # field -> why the version's meta value is unusable
        self._checked_at = float("-inf")  # time.monotonic() of the last pointer read
        self._refreshing: asyncio.Future | None = None  # the pointer read in flight, shared
        self._slots = _CallSlots(max_connections) if max_connections else contextlib.nullcontext()

    @classmethod
    def from_url(
        cls,
        url: str,
        namespace: str = "din",
        *,
        cluster: bool | None = None,
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
        """A store for `url` (redis://, rediss:// for TLS, unix://, redis+cluster://; a password in
        the URL); connects on first use.

        `cluster=True` uses the cluster client for a plain redis:// URL (REDIS_CLUSTER). Timeouts
        are short, and `retries` retries with exponential backoff follow a connection error or
        timeout (see `feature_store.connection.async_client`). A connection idle for
        `health_check_interval` seconds is PINGed before use (0: never).
        """
        address = RedisAddress.parse(url, cluster)
        client = async_client(
            address, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
            max_connections=max_connections, retries=retries, retry_backoff_s=retry_backoff_s,
            retry_backoff_cap_s=retry_backoff_cap_s, health_check_interval=health_check_interval,
        )
        return cls(
            client, url=url, namespace=namespace, cluster=cluster,
            version_refresh_s=version_refresh_s, miss_refresh_s=miss_refresh_s, max_connections=max_connections,
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
        """() when the meta's value is garbage (logged and counted when the version was read)."""
        if "profile_fields" in self._meta_errors:
            return ()
        return tuple(self._meta.get("profile_fields", ()))

    @property
    def max_history(self) -> int | None:
        if "max_history" in self._meta_errors:
            return None
        return self._meta.get("max_history")

    def _unavailable(self, e: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(f"Redis at {self.url} is unavailable: {e.__class__.__name__}: {e}")

    def _busy(self, e: Exception) -> StoreBusyError:
        return StoreBusyError(f"no free connection to Redis at {self.url} (all in use by this process): {e}")

    def _refused(self, e: redis.ResponseError, what: str) -> StoreError:
        """An error reply (OOM, WRONGTYPE, NOAUTH...): Redis is up but did not do it."""
        return StoreError(f"Redis at {self.url} refused {what}: {e}")

    @contextlib.asynccontextmanager
    async def _call(self, what: str | None = None) -> AsyncIterator[None]:
        """One store call: a connection slot (_CallSlots), and redis-py's failures as the store's.

        Pool exhaustion is StoreBusyError (MaxConnectionsError is a ConnectionError, but Redis
        was not asked), no connection StoreUnavailableError, and an error reply StoreError
        when `what` names the call (else it goes up as it is).
        """
        try:
            async with self._slots:
                yield
        except _POOL_EXHAUSTED as e:  # (a cluster node's pool; or a stray caller past the slots)
            raise self._busy(e) from e
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        except redis.ResponseError as e:
            if what is None:
                raise
            raise self._refused(e, what) from e

    async def refresh_version(self) -> str | None:
        """Re-read `{ns}:current` now (and the meta when the version changed).

        Concurrent callers share one read and all wait for it: a reader must not go on with
        the version a read in flight is replacing (at start-up: none yet, which would serve
        every user and ad as unknown, and the ad cache would keep that for its TTL).
        """
        if self._refreshing is None:
            self._checked_at = time.monotonic()  # set first: readers that come later don't start another
            task = asyncio.ensure_future(self._read_version())
            task.add_done_callback(self._refreshed)
            self._refreshing = task
        return await asyncio.shield(self._refreshing)

    def _refreshed(self, task: asyncio.Future) -> None:
        if self._refreshing is task:
            self._refreshing = None
        if task.cancelled() or task.exception() is not None:  # retrieved: the callers that awaited it got it
            # the version was not read: the next reader reads it, instead of going on for
            # version_refresh_s with what the store knew before (at start-up: nothing loaded)
            self._checked_at = float("-inf")

    async def _version_now(self) -> None:
        """Refresh the version when it is older than version_refresh_s, or wait for the read in flight."""
        if self._refreshing is not None or time.monotonic() - self._checked_at >= self.version_refresh_s:
            await self.refresh_version()

    async def _read_version(self) -> str | None:
        """Read the pointer; one that is garbage or of the wrong type is a StoreError (Redis
        is up, its data is not usable), not a crash of the caller."""
        pointer = current_key(self.namespace)
        try:
            raw = await self._redis.get(pointer)
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        except redis.ResponseError as e:  # WRONGTYPE: something else wrote the pointer key
            raise StoreError(f"{pointer} in Redis at {self.url} is not a data version pointer ({e}): "
                             f"run `din load` to write a data version") from e
        try:
            version = raw.decode() if raw is not None else None
            if version == self.version:
                return version
            if version is None:
                self._keys, self._meta, self._meta_errors = None, {}, {}
                return None
            keys = KeySpace(namespace=self.namespace, version=version)
        except ValueError as e:  # not UTF-8, or not a version name
            raise StoreError(f"{pointer} in Redis at {self.url} holds {raw[:64]!r}, not a data version name "
                             f"({e}): run `din load` to write a data version") from None
        try:
            raw_meta = await self._redis.get(keys.meta)
            meta = json.loads(raw_meta) if raw_meta is not None else {}
            if not isinstance(meta, dict):  # valid JSON, but not the object `din load` writes
                raise ValueError(f"JSON {type(meta).__name__}, not an object")
        except _UNAVAILABLE as e:  # not read: the version stays unread, and the next reader tries again
            raise self._unavailable(e) from e
        except (ValueError, redis.ResponseError) as e:  # not JSON, not an object, or a key of the wrong type
            if isinstance(e, redis.ResponseError) and not str(e).startswith("WRONGTYPE"):
                raise self._refused(e, f"the read of {keys.meta}") from e  # refused this once (e.g. NOAUTH)
            self._corrupt("meta", f"meta key {keys.meta}", f"{e}; profile and ad fields unknown")
            meta = {}
        # fields of the wrong shape (a buggy or foreign writer): reported here once, then the
        # reads that need the field fail as a StoreError (ad reads) or treat it as unknown
        errors = {
            field: f"meta key {keys.meta} in Redis at {self.url}: {problem}"
            for field, problem in meta_problems(meta).items()
        }
        if errors:
            self._corrupt("meta", f"data version {version}", "; ".join(errors.values()) + " (run `din load`)")
        if self._keys is not None:
            logger.info("feature store %s: data version %s -> %s", self.namespace, self.version, version)
        self._keys, self._meta, self._meta_errors = keys, meta, errors
        return version

    # ---------------------------------------------------------------------- reads
    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        """Values of `keys`; nil for a missing key and for a key of the wrong type.

        One key is an MGET too, never a GET: GET raises WRONGTYPE for a key that holds a
        list (a stray write), which would fail the call as if Redis were down (and open
        the service's circuit breaker for every user) instead of serving that one user as
        unknown, as a batch does.
        """
        if len(keys) == 1:
            return await self._redis.mget(keys)  # the client's own retry policy, as GET had
        if self.cluster:
            return await self._redis.mget_nonatomic(keys)  # one MGET per slot, pipelined per node
        return await self._mget_packed(keys)

    async def _mget_packed(self, keys: list[str]) -> list[bytes | None]:
        """MGET formatted here: redis-py's packer costs ~20% of a 64-user read.

        Same pool, timeouts and reply parser as the client; one retry on a fresh
        connection when a pooled one turns out broken (a restarted Redis), as the
        client's own retry policy does.
        """
        parts = [b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)]
        for key in keys:
            k = key.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(k), k))
        packed = b"".join(parts)
        pool = self._redis.connection_pool
        for attempt in (0, 1):
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command(packed)
                return await conn.read_response()
            except (redis.ConnectionError, OSError):
                await conn.disconnect()
                if attempt:
                    raise
            except BaseException:
                await conn.disconnect()  # a timeout or a cancelled request: the reply is unread
                raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    async def _fetch(self, user_ids: list[int]) -> list[bytes | None]:
        if self._keys is None:
            return [None] * len(user_ids)
        return await self._mget(self._keys.users(user_ids))

    def _corrupt(self, kind: str, what: str, error: object, n: int = 1) -> None:
        self.decode_errors += n
        metrics.CORRUPT_VALUES.labels(kind).inc(n)
        if self.decode_errors <= 10 or self.decode_errors % 1000 == 0:
            logger.warning("%s: %s (served as unknown; %d corrupt values so far)", what, error, self.decode_errors)

    async def get_histories(self, user_ids: Sequence[int]) -> list[UserHistory | None]:
        ids = [int(u) for u in user_ids]
        if not ids:
            return []
        async with self._call("the history read"):
            await self._version_now()
            values = await self._fetch(ids)
            if None in values and time.monotonic() - self._checked_at >= self.miss_refresh_s:
                before = self.version
                if await self.refresh_version() != before:
                    values = await self._fetch(ids)
        out = decode_users(values)
        for i, h in enumerate(out):
            if h.__class__ is CorruptValueError:
                self._corrupt("user", f"user {ids[i]}", h)
                out[i] = None
        return out

    async def get_ad_features(self, ad_ids) -> AdFeatures:
        """Category id (and any other ad field) per ad, -1 / not found for unknown ads; one MGET."""
        ids = np.asarray(ad_ids, dtype=np.int64)
        async with self._call("the ad read"):
            await self._version_now()
            if (error := self._meta_errors.get("ad_fields")) is not None:
                raise StoreError(f"{error}: the ad features of data version {self.version} cannot be read; "
                                 f"run `din load` to write a data version")
            fields = tuple(self._meta.get("ad_fields", AD_FIELDS))
            if self._keys is None or ids.size == 0:
                return AdFeatures(fields, np.zeros(ids.size, bool), np.full((ids.size, len(fields)), -1, np.int64))
            values = await self._mget(self._keys.ads(ids.tolist()))
        found, out, corrupt = decode_ads(values, len(fields))
        if corrupt:
            self._corrupt("ad", f"{corrupt} ad value(s) of data version {self.version}", "not an ad value of this layout", corrupt)
        return AdFeatures(fields, found, out)

    # ---------------------------------------------------------------------- live appends
    async def _append_version(self) -> str:
        await self._version_now()
        if self._keys is None:
            await self.refresh_version()
        if self._keys is None:  # nothing loaded yet: the first event creates an empty version
            fence = Fence("S", None, DEFAULT_MAX_HISTORY, 0, 0, DEFAULT_ID_WINDOW, DEFAULT_ID_TTL_S)
            await asyncio.to_thread(self._create_empty_version, fence)
            await self.refresh_version()
        return self.version

    def _create_empty_version(self, fence: Fence) -> str:
        client = sync_client(self._address, socket_timeout=5.0)
        try:
            return create_empty_version(client, self.namespace, fence)
        except redis.ResponseError as e:  # e.g. OOM: Redis is up but takes no writes
            raise StoreError(f"Redis at {self.url} refused to create the first data version: {e}") from e
        finally:
            client.close()

    async def _run_appends(self, groups, todo: list[tuple[int, str]]) -> list:
        for attempt in (0, 1):
            pipe = self._redis.pipeline(transaction=False)
            for i, version in todo:
                uid, blob, ids = groups[i]
                keys = KeySpace(namespace=self.namespace, version=version)
                tag = user_fence_tag(uid)
                pipe.execute_command(  # (a cluster pipeline routes EVALSHA by its keys)
                    "EVALSHA", APPEND_SHA, 5, keys.user(uid), keys.event_ids(uid), keys.pending(uid),
                    keys.fence(tag), keys.pending_users(tag), "append", len(ids), blob, *ids, PENDING_TTL_S, uid,
                )
            replies = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                await self._redis.script_load(APPEND_LUA)  # (every primary, on a cluster)
                continue  # safe to re-run: appends are idempotent per event id
            for r in replies:
                if isinstance(r, redis.ResponseError):  # e.g. OOM: Redis is up but takes no writes
                    raise self._refused(r, "the append")
                if isinstance(r, Exception):
                    raise r
            return replies
        raise AssertionError("unreachable")

    async def append_events(self, events: EventBatch) -> AppendReport:
        """Append live behaviours; returns once Redis has run every user's script.

        Each user's events go through one script call on the live version; a fence may
        send them on to the version being loaded (state N) or to the successor of a
        retired one (R), or report the version gone (stale: re-read the pointer).
        """
        groups = events.by_user()
        async with self._call("the append"):
            version = await self._append_version()
            if not groups:
                return AppendReport(0, 0, 0, 0, version)
            first: dict[int, tuple[int, int]] = {}
            todo = [(i, version) for i in range(len(groups))]
            seen = set(todo)
            for _ in range(MAX_APPEND_HOPS):
                if not todo:
                    break
                replies = await self._run_appends(groups, todo)
                after: list[tuple[int, str]] = []
                refreshed: str | None = None
                for (i, v), reply in zip(todo, replies):
                    status, nxt = (x.decode() if isinstance(x, bytes) else str(x) for x in reply[:2])
                    target = None
                    if status == "stale":
                        if refreshed is None:
                            refreshed = await self.refresh_version() or ""
                        if refreshed in ("", v):
                            raise StoreError(
                                f"data version {v} of {self.namespace!r} has no fences (loaded by an older "
                                f"`din load`?): run `din load` again before sending events"
                            )
                        target = refreshed
                    elif status == "retired":
                        target = nxt
                    else:
                        if status == "repaired":
                            self.repaired_values += 1
                            logger.warning("user %d: corrupt value replaced by a fresh history on append", groups[i][0])
                        first.setdefault(i, (int(reply[2]), int(reply[3])))
                        target = nxt if nxt != "-" else None
                    if target is not None and (i, target) not in seen:
                        seen.add((i, target))
                        after.append((i, target))
                todo = after
            if todo:
                raise StoreError(f"appends kept being redirected between data versions ({sorted(set(v for _, v in todo))})")
        applied = sum(a for a, _ in first.values())
        dups = sum(d for _, d in first.values())
        metrics.EVENTS_APPLIED.inc(applied)
        metrics.EVENTS_DUPLICATE.inc(dups)
        return AppendReport(len(events), applied, dups, len(groups), self.version or version)

    # ---------------------------------------------------------------------- stats
    async def _sum_over_nodes(self, value) -> float:
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            return float(sum(value.values()))
        return float(value)

    async def stats(self) -> StoreStats:
        """Scans the live version's keys (seconds for millions of users): a CLI command, not a hot path."""
        async with self._call():
            await self.refresh_version()
            keys = self._keys
            kinds = {"u": "users", "e": "event_ids", "p": "pending", "q": "pending_sets", "a": "ads", "f": "fences"}
            counts = {name: 0 for name in kinds.values()}
            sample: list[bytes] = []
            if keys is not None:
                start = len(keys.prefix)
                async for key in self._redis.scan_iter(match=keys.match_all, count=5000):
                    kind = kinds.get(key[start : start + 1].decode(errors="replace"))
                    if kind is not None and key[start + 1 : start + 2] == b":":
                        counts[kind] += 1
                        if kind == "users" and len(sample) < STATS_SAMPLE:
                            sample.append(key)
            memory = strlen = 0.0
            if sample:
                pipe = self._redis.pipeline(transaction=False)
                for key in sample:
                    pipe.memory_usage(key, samples=0)
                    pipe.strlen(key)
                replies = await pipe.execute()
                memory = float(np.mean([r or 0 for r in replies[0::2]]))
                strlen = float(np.mean(replies[1::2]))
            info = await self._redis.info("memory")
            if self.cluster:
                used = sum(v["used_memory"] for v in info.values()) if "used_memory" not in info else info["used_memory"]
            else:
                used = info["used_memory"]
            total_keys = int(await self._sum_over_nodes(await self._redis.dbsize()))
            versions = []
            async for key in self._redis.scan_iter(match=f"{self.namespace}:v*:meta", count=5000):
                versions.append(key.decode().split(":")[1][1:])
            loading = sorted(k.decode() for k in (await self._redis.hkeys(loading_key(self.namespace))))
            retiring = sorted(k.decode() for k in (await self._redis.hkeys(retiring_key(self.namespace))))
        return StoreStats(
            namespace=self.namespace, version=self.version, users=counts["users"], ads=counts["ads"],
            keys=total_keys, version_keys=counts, bytes_per_user=round(memory, 1),
            value_bytes_per_user=round(strlen, 1), memory_used=int(used),
            versions=sorted(versions, key=lambda v: (len(v), v)), loading=loading, retiring=retiring, meta=self.meta,
        )

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
        async with self._call("the user scan"):
            await self._version_now()
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

    async def ping(self) -> None:
        async with self._call():
            await self._redis.ping()
            await self._version_now()

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
        user_ttl_s: int = 0,
        id_window: int = DEFAULT_ID_WINDOW,
        id_ttl_s: int = DEFAULT_ID_TTL_S,
        resume: bool = True,
        stale_after_s: float | None = None,
    ) -> LoadReport:
        """Load `log` into a new data version and switch to it (sync; see loader.py).

        `grace_s` (default: twice `version_refresh_s`) is how long the old version stays
        after the switch, so readers that have not re-checked the pointer still find it.
        `profile_fields` picks and orders the stored profile ids (a bundle's spec); None =
        all of the log's. `user_ttl_s` > 0 expires users that long after their last
        behaviour arrived (load or live append). `resume` continues a killed load of the
        same data.
        """
        grace = 2 * self.version_refresh_s if grace_s is None else grace_s
        client = sync_client(self._address)
        extra = {} if stale_after_s is None else {"stale_after_s": stale_after_s}
        try:
            return load_log(
                client, log, namespace=self.namespace, max_history=max_history,
                keep_old=keep_old, progress=progress, chunk_users=chunk_users, grace_s=grace,
                profile_fields=profile_fields, user_ttl_s=user_ttl_s, id_window=id_window,
                id_ttl_s=id_ttl_s, resume=resume, **extra,
            )
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        finally:
            client.close()
