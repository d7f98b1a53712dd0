"""Fences: one small key per data version and cluster slot that tells a live append what to do.

A live append runs one Lua script on one user's keys, which share the user's hash tag, so
in Redis Cluster it cannot read `{ns}:current` (another slot). What it needs to know
about its data version it reads from the version's *fence* for the user's slot instead:
`{ns}:v{V}:f:{<tag>}`, where `<tag>` is a string chosen so that it hashes to that slot
(`slot_tag(slot)`); there is one fence per slot (16384) per version, on a single Redis
too, so that both run one layout. A fence's value is plain text (`Fence.encode`):

    <state> <next> <max_history> <n_profile> <user_ttl_s> <id_window> <id_ttl_s>

state  L  loading: the bulk load is writing this version; appends are parked in the
          user's pending list and merged by the loader before the switch;
       S  serving: appends apply to the user's value;
       N  serving, and version <next> is being loaded (or was just switched to):
          appends apply here and the client applies them to <next> as well;
       R  retired (replaced by <next>, being deleted): appends go to <next> instead.

A missing fence means the version does not exist (any more): the client re-reads
`{ns}:current`. Because a fence changes in the same slot, atomically with respect to the
scripts on that slot's users, no append can slip between a state change and the next.
"""

from __future__ import annotations

import functools
from binascii import crc_hqx
from dataclasses import dataclass, replace

from feature_store.keys import KeySpace

N_SLOTS = 16384  # Redis Cluster hash slots
STATES = ("L", "S", "N", "R")


def key_slot(tag: bytes) -> int:
    """The cluster slot of a hash tag (CRC16/XMODEM mod 16384, as Redis computes it)."""
    return crc_hqx(tag, 0) % N_SLOTS


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For every slot s, a short string whose hash tag lands in s (decimal numbers, searched once)."""
    tags: list[str | None] = [None] * N_SLOTS
    missing = N_SLOTS
    i = 0
    while missing:
        s = str(i).encode()
        slot = crc_hqx(s, 0) % N_SLOTS
        if tags[slot] is None:
            tags[slot] = s.decode()
            missing -= 1
        i += 1
    return tuple(tags)  # type: ignore[arg-type]


def slot_tag(slot: int) -> str:
    return slot_tags()[slot]


def user_fence_tag(user_id: int) -> str:
    """The fence tag of the user's slot: the user's keys and this fence share a slot."""
    return slot_tags()[key_slot(str(int(user_id)).encode())]


@dataclass(frozen=True)
class Fence:
    """What a version tells live appends (the same for every slot except during a change)."""

    state: str
    next: str | None = None
    max_history: int = 50
    n_profile: int = 0
    user_ttl_s: int = 0  # 0 = users never expire
    id_window: int = 128  # event ids remembered per user
    id_ttl_s: int = 86_400  # ... for this long after the user's last append

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"fence state must be one of {STATES}, got {self.state!r}")
        if self.state in ("N", "R") and not self.next:
            raise ValueError(f"fence state {self.state} needs the next version")

    def encode(self) -> str:
        return (
            f"{self.state} {self.next or '-'} {self.max_history} {self.n_profile} "
            f"{self.user_ttl_s} {self.id_window} {self.id_ttl_s}"
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> "Fence":
        text = raw.decode() if isinstance(raw, bytes) else raw
        state, nxt, *numbers = text.split()
        max_history, n_profile, user_ttl_s, id_window, id_ttl_s = map(int, numbers)
        return cls(state, None if nxt == "-" else nxt, max_history, n_profile, user_ttl_s, id_window, id_ttl_s)

    def to(self, state: str, next: str | None = None) -> "Fence":
        return replace(self, state=state, next=next)


@functools.lru_cache(maxsize=8)
def _fence_keys(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{{{t}}}" for t in slot_tags())


def fence_keys(keys: KeySpace) -> tuple[str, ...]:
    """Every fence key of a version, slot 0 first."""
    return _fence_keys(keys.fence_prefix)


def write_fences(client, keys: KeySpace, fence: Fence) -> None:
    """SET the fence of every slot (sync client; one round trip, split per node on a cluster)."""
    from feature_store.connection import is_cluster

    value = fence.encode()
    names = fence_keys(keys)
    if is_cluster(client):  # one key per slot: nothing to batch, the pipeline groups per node
        pipe = client.pipeline(transaction=False)
        for key in names:
            pipe.set(key, value)
        pipe.execute()
        return
    for a in range(0, N_SLOTS, 4096):
        flat = [x for key in names[a : a + 4096] for x in (key, value)]
        client.execute_command("MSET", *flat)


def read_fence(client, keys: KeySpace) -> Fence | None:
    """The version's fence of slot 0 (None: the version has no fences)."""
    raw = client.get(keys.fence(slot_tag(0)))
    return None if raw is None else Fence.decode(raw)


def delete_fences(client, keys: KeySpace) -> int:
    """UNLINK every fence of a version (a cluster client splits the command per slot)."""
    names = fence_keys(keys)
    return int(sum(client.unlink(*names[a : a + 4096]) for a in range(0, N_SLOTS, 4096)))
