"""Redis key names: a namespace, a data version, and a hash tag on the user id.

    {ns}:current               -> the live data version (a string); switched by one SET
    {ns}:seq                   -> INCR counter that hands out new data versions
    {ns}:loading               -> HASH version -> JSON state of an unfinished bulk load
    {ns}:v{version}:meta       -> JSON: profile_fields, max_history, users, created_at, ...
    {ns}:v{version}:u:{<uid>}  -> one user's packed value (feature_store/records.py)
    {ns}:v{version}:e:{<uid>}  -> LIST: the user's most recent event ids (idempotent appends)
    {ns}:v{version}:p:{<uid>}  -> LIST: events appended while this version is still loading
    {ns}:v{version}:q:{<tag>}  -> SET: users of one slot that have such parked events
    {ns}:v{version}:f:{<tag>}  -> the version's fence for one cluster slot (feature_store/fences.py)
    {ns}:v{version}:a:{<ad>}   -> one ad's packed features (category id, ...)

A bulk load writes every key of a new version first and flips `{ns}:current` last, so a
reader never sees a half-loaded version. The literal braces around the user id are a
Redis Cluster hash tag: every key of one user (history now, counters later) hashes to the
same slot, whatever the namespace and version. Namespaces and versions are restricted to
characters that are neither hash-tag braces nor glob specials, so `SCAN MATCH` on a
version prefix is exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{what} {value!r} is not allowed: use letters, digits, '_', '.' or '-' "
            f"(no ':', braces, spaces or glob characters)"
        )
    return value


def current_key(namespace: str = "din") -> str:
    """The pointer key that names the live data version of `namespace`."""
    return f"{check_name(namespace, 'namespace')}:current"


def seq_key(namespace: str = "din") -> str:
    """The counter a bulk load INCRs to get a fresh data version."""
    return f"{check_name(namespace, 'namespace')}:seq"


@dataclass(frozen=True, kw_only=True)
class KeySpace:
    """The keys of one data version of one namespace."""

    namespace: str = "din"
    version: str

    def __post_init__(self) -> None:
        check_name(self.namespace, "namespace")
        check_name(str(self.version), "data version")
        object.__setattr__(self, "version", str(self.version))

    @property
    def prefix(self) -> str:
        """Every key of this version starts with this (used by SCAN to delete a version)."""
        return f"{self.namespace}:v{self.version}:"

    @property
    def user_prefix(self) -> str:
        return f"{self.prefix}u:"

    @property
    def fence_prefix(self) -> str:
        return f"{self.prefix}f:"

    @property
    def pending_match(self) -> str:
        """SCAN MATCH pattern for the events parked while this version loads."""
        return f"{self.prefix}p:*"

    @property
    def user_match(self) -> str:
        return f"{self.user_prefix}*"

    @property
    def current(self) -> str:
        return current_key(self.namespace)

    @property
    def meta(self) -> str:
        return f"{self.prefix}meta"

    @property
    def match_all(self) -> str:
        """SCAN MATCH pattern for every key of this version."""
        return f"{self.prefix}*"

    def user(self, user_id: int) -> str:
        return f"{self.user_prefix}{{{int(user_id)}}}"

    def users(self, user_ids: Iterable[int]) -> list[str]:
        p = self.user_prefix
        return [f"{p}{{{int(u)}}}" for u in user_ids]

    def event_ids(self, user_id: int) -> str:
        """The ring of the user's recent event ids (same slot as the user's value)."""
        return f"{self.prefix}e:{{{int(user_id)}}}"

    def pending(self, user_id: int) -> str:
        """Events for the user that arrived while this version was loading (same slot)."""
        return f"{self.prefix}p:{{{int(user_id)}}}"

    def pending_users(self, tag: str) -> str:
        """SET of the users with parked events in the slot of `tag` (same slot as its fence)."""
        return f"{self.prefix}q:{{{tag}}}"

    def fence(self, tag: str) -> str:
        """The fence key whose hash tag `tag` lands in one given cluster slot."""
        return f"{self.prefix}f:{{{tag}}}"

    def ad(self, ad_id: int) -> str:
        return f"{self.prefix}a:{{{int(ad_id)}}}"

    def ads(self, ad_ids: Iterable[int]) -> list[str]:
        p = f"{self.prefix}a:"
        return [f"{p}{{{int(a)}}}" for a in ad_ids]


def retiring_key(namespace: str = "din") -> str:
    """HASH of replaced data versions whose deletion is due: version -> successor. A load
    interrupted in its grace period leaves its entry, and the next load deletes the version."""
    return f"{check_name(namespace, 'namespace')}:retiring"


def loading_key(namespace: str = "din") -> str:
    """HASH of the unfinished bulk loads of `namespace`: version -> JSON state (resume, heartbeat)."""
    return f"{check_name(namespace, 'namespace')}:loading"
