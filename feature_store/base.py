"""The feature store as the service and the CLI see it: a tiny interface, one file per backend.

The service only needs `get_histories`, `ping` and `close` (async, on its event loop);
the CLI needs `bulk_load` (sync, a batch job). Redis is the backend today
(feature_store/redis_store.py); anything that fulfils this interface can replace it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from feature_store.records import UserHistory

if TYPE_CHECKING:
    from feature_store.loader import LoadReport
    from model.data.log import BehaviourLog


class StoreUnavailableError(RuntimeError):
    """The store cannot be reached (connection refused, timeout); the message says where."""


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
    ) -> "LoadReport":
        """Write every user of `log` into a new data version and switch readers to it.

        `profile_fields` picks and orders the profile ids stored (None: all of the log's).
        """
