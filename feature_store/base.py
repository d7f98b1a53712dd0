"""The feature store as the service and the CLI see it: a tiny interface, one file per backend.

The service needs `get_histories`, `get_ad_features`, `append_events`, `ping` and
`close` (async, on its event loop); the CLI needs `bulk_load` (sync, a batch job) and
`stats`. Redis is the backend we ship (feature_store/redis_store.py);
feature_store/memory_store.py is a plain in-process one (tests, experiments); anything
that fulfils this interface can replace them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from feature_store.records import UserHistory

if TYPE_CHECKING:
    from feature_store.events import AppendReport, EventBatch
    from feature_store.loader import LoadReport
    from model.data.log import BehaviourLog


class StoreUnavailableError(RuntimeError):
    """The store cannot be reached (connection refused, timeout); the message says where."""


class StoreError(RuntimeError):
    """The store answered, but cannot do what was asked; the message says what to do.

    Redis is up (refusing writes when out of memory, a key holding data it cannot use), so
    the service refuses or degrades this call but does not count it as an outage.
    """


class StoreBusyError(RuntimeError):
    """The service's own connection pool had no free connection: Redis was not even asked.

    Local congestion (a burst of calls), not an outage: the service degrades or refuses
    this call but must not count it against Redis (its circuit breaker would stop every
    user's history reads while Redis is healthy).
    """


@dataclass
class ConnectionWait:
    """Whether a store call is queued for a free connection right now.

    A caller that puts a deadline on store calls (the service's StoreGuard) sets one in
    `CONNECTION_WAIT` around each call; the store sets `waiting` while the call queues.
    A deadline that passes while `waiting` is local congestion (StoreBusyError's case),
    not a Redis that does not answer.
    """

    waiting: bool = False


CONNECTION_WAIT: ContextVar[ConnectionWait | None] = ContextVar("din_store_connection_wait", default=None)


@dataclass(frozen=True)
class AdFeatures:
    """Features of N requested ads: `values[:, j]` is field `fields[j]`; -1 where not `found`."""

    fields: tuple[str, ...]
    found: np.ndarray  # (N,) bool
    values: np.ndarray  # (N, F) int64

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.fields.index(name)]


@dataclass(frozen=True)
class StoreStats:
    """What `din store stats` prints: size and shape of the live data version."""

    namespace: str
    version: str | None
    users: int  # user keys of the live version
    ads: int
    keys: int  # every key in the database(s), all versions and namespaces
    version_keys: dict[str, int]  # keys of the live version by kind: users, event_ids, pending, ads, fences
    bytes_per_user: float  # Redis memory per user key (MEMORY USAGE, sampled)
    value_bytes_per_user: float  # the packed value alone (STRLEN, sampled)
    memory_used: int  # bytes (INFO used_memory, summed over primaries)
    versions: list[str] = field(default_factory=list)  # data versions present (have a meta)
    loading: list[str] = field(default_factory=list)  # unfinished loads
    retiring: list[str] = field(default_factory=list)  # replaced versions whose deletion is due (the next load's)
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class HistoryStore(ABC):
    """Per-user behaviour histories, newest first, keyed by raw int64 user id."""

    @property
    @abstractmethod
    def profile_fields(self) -> tuple[str, ...]:
        """Names of `UserHistory.profile` entries, in order (empty until data is known)."""

    @abstractmethod
    async def get_histories(self, user_ids: Sequence[int]) -> list[UserHistory | None]:
        """One history per requested user, in request order; None = unknown user.

        A value that cannot be decoded counts as unknown (and is counted), never an error;
        an unreachable store raises StoreUnavailableError.
        """

    async def get_history(self, user_id: int) -> UserHistory | None:
        return (await self.get_histories([user_id]))[0]

    async def scan_user_ids(self, limit: int) -> list[int]:
        """Up to `limit` ids of users the store holds now (any subset; bounded work).

        For demos and tools (GET /api/sample), not the ranking path; optional for a backend.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list its users")

    @abstractmethod
    async def get_ad_features(self, ad_ids: np.ndarray) -> AdFeatures:
        """Features (category id, ...) of each ad, in request order, in one round trip."""

    @abstractmethod
    async def append_events(self, events: "EventBatch") -> "AppendReport":
        """Append behaviours to their users' histories (atomic per user, newest first,
        bounded, idempotent per event_id); return only once the store holds them."""

    @abstractmethod
    async def stats(self) -> StoreStats:
        """Users, keys, memory and data version of the live data."""

    @abstractmethod
    async def ping(self) -> None:
        """Return when the store answers; raise StoreUnavailableError otherwise."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""

    @abstractmethod
    def bulk_load(
        self,
        log: "BehaviourLog",
        *,
        max_history: int = 50,
        keep_old: bool = False,
        progress: bool = False,
        profile_fields: Sequence[str] | None = None,
        user_ttl_s: int = 0,
    ) -> "LoadReport":
        """Write every user of `log` into a new data version and switch readers to it.

        `profile_fields` picks and orders the profile ids stored (None: all of the log's).
        """
