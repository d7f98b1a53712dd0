"""The packed binary value of one user: header, profile ids, behaviour records (newest first).

One Redis value per user, so one GET (or one MGET for a batch) brings everything the
scorer needs. The layout is fixed-size and little-endian, so decoding is a zero-copy
`np.frombuffer` view instead of a parse; docs/feature-store.md has the byte table and
tests/test_records.py pins the bytes.

    offset  size   field
    0       4      magic b"DINU"
    4       1      format version (u8, = FORMAT_VERSION)
    5       1      n_profile (u8): number of profile ids that follow
    6       2      reserved (u16 little-endian, = 0)
    8       8*P    profile raw ids (int64 LE), in the order of the store's profile_fields
    8+8*P   24*T   T records of RECORD_DTYPE, newest first
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAGIC = b"DINU"
FORMAT_VERSION = 1
HEADER_DTYPE = np.dtype([("magic", "S4"), ("version", "u1"), ("n_profile", "u1"), ("reserved", "<u2")])
HEADER_SIZE = HEADER_DTYPE.itemsize  # 8
RECORD_DTYPE = np.dtype([("item_id", "<i8"), ("cate_id", "<i8"), ("timestamp", "<i8")])
RECORD_SIZE = RECORD_DTYPE.itemsize  # 24
RECORD_FIELDS = RECORD_DTYPE.names  # ("item_id", "cate_id", "timestamp")
MAX_PROFILE_FIELDS = 255  # n_profile is a u8

assert HEADER_SIZE == 8 and RECORD_SIZE == 24


class CorruptValueError(ValueError):
    """A stored value that is not a valid user record (wrong magic, version or length)."""


@dataclass(frozen=True)
class UserHistory:
    """One user's stored features.

    `records` is a structured array of RECORD_DTYPE, newest first; `records["item_id"]`
    etc. are int64 views. Both arrays may be read-only views into the Redis reply bytes.
    """

    profile: np.ndarray  # (P,) int64 raw profile ids, in the store's profile_fields order
    records: np.ndarray  # (T,) RECORD_DTYPE, newest first

    def __len__(self) -> int:
        return int(self.records.shape[0])


def header_bytes(n_profile: int) -> bytes:
    """The 8 header bytes of a value with `n_profile` profile ids."""
    if not 0 <= n_profile <= MAX_PROFILE_FIELDS:
        raise ValueError(f"n_profile must be in 0..{MAX_PROFILE_FIELDS}, got {n_profile}")
    header = np.zeros((), dtype=HEADER_DTYPE)
    header["magic"] = MAGIC
    header["version"] = FORMAT_VERSION
    header["n_profile"] = n_profile
    return header.tobytes()


def make_records(item_id, cate_id, timestamp) -> np.ndarray:
    """A RECORD_DTYPE array from three equally long id columns (given newest first)."""
    item_id = np.asarray(item_id, dtype=np.int64)
    cate_id = np.asarray(cate_id, dtype=np.int64)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    if not (item_id.ndim == cate_id.ndim == timestamp.ndim == 1):
        raise ValueError("item_id, cate_id and timestamp must be 1-D")
    if not (len(item_id) == len(cate_id) == len(timestamp)):
        raise ValueError(
            f"item_id, cate_id and timestamp must have the same length, got "
            f"{len(item_id)}, {len(cate_id)}, {len(timestamp)}"
        )
    out = np.empty(len(item_id), dtype=RECORD_DTYPE)
    out["item_id"] = item_id
    out["cate_id"] = cate_id
    out["timestamp"] = timestamp
    return out


def _as_records(records: np.ndarray) -> np.ndarray:
    records = np.asarray(records)
    if records.dtype == RECORD_DTYPE:
        return np.ascontiguousarray(records)
    if records.dtype.names is None or set(RECORD_FIELDS) - set(records.dtype.names):
        raise ValueError(f"records must be a structured array with fields {RECORD_FIELDS}, got dtype {records.dtype}")
    return make_records(*(records[f] for f in RECORD_FIELDS))


def encode_user(records: np.ndarray, profile=None) -> bytes:
    """Pack one user's records (newest first) and profile raw ids into a Redis value."""
    recs = _as_records(records)
    if recs.ndim != 1:
        raise ValueError(f"records must be 1-D, got shape {recs.shape}")
    prof = np.asarray([] if profile is None else profile, dtype="<i8")
    if prof.ndim != 1:
        raise ValueError(f"profile must be 1-D, got shape {prof.shape}")
    return header_bytes(len(prof)) + prof.tobytes() + recs.tobytes()


def decode_user(value: bytes) -> UserHistory:
    """Zero-copy view of a value written by `encode_user`; CorruptValueError if it is not one."""
    size = len(value)
    if size < HEADER_SIZE:
        raise CorruptValueError(f"user value is {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    if value[:4] != MAGIC:
        raise CorruptValueError(f"user value starts with {bytes(value[:4])!r}, expected magic {MAGIC!r}")
    version = value[4]
    if version != FORMAT_VERSION:
        raise CorruptValueError(
            f"user value has format version {version}; this code reads version {FORMAT_VERSION} "
            f"(reload the data with this version of `din load`)"
        )
    n_profile = value[5]
    body = size - HEADER_SIZE - 8 * n_profile
    if body < 0 or body % RECORD_SIZE:
        raise CorruptValueError(
            f"user value is {size} bytes; with {n_profile} profile ids it must be "
            f"{HEADER_SIZE + 8 * n_profile} + {RECORD_SIZE}*k bytes (truncated or padded)"
        )
    profile = np.frombuffer(value, dtype="<i8", count=n_profile, offset=HEADER_SIZE)
    records = np.frombuffer(value, dtype=RECORD_DTYPE, offset=HEADER_SIZE + 8 * n_profile)
    return UserHistory(profile=profile, records=records)


_PREFIX = MAGIC + bytes([FORMAT_VERSION])
_NO_PROFILE = np.empty(0, dtype="<i8")
_NO_PROFILE.flags.writeable = False


def _history(profile: np.ndarray, records: np.ndarray) -> UserHistory:
    """A UserHistory without the frozen dataclass's __init__ (the read path makes one per user)."""
    h = object.__new__(UserHistory)
    object.__setattr__(h, "profile", profile)
    object.__setattr__(h, "records", records)
    return h


def decode_users(values: "list[bytes | None]") -> "list[UserHistory | CorruptValueError | None]":
    """`decode_user` for a batch (an MGET reply), ~4x faster per value: None stays None, a
    value that is not valid comes back as its CorruptValueError (not raised)."""
    out: list = []
    append = out.append
    frombuffer = np.frombuffer
    for v in values:
        if v is None:
            append(None)
            continue
        if v.startswith(_PREFIX):
            p = v[5]
            head = HEADER_SIZE + 8 * p
            n = len(v)
            if n >= head and not (n - head) % RECORD_SIZE:
                profile = frombuffer(v, "<i8", p, HEADER_SIZE) if p else _NO_PROFILE
                append(_history(profile, frombuffer(v, RECORD_DTYPE, -1, head)))
                continue
        try:
            decode_user(v)  # for its message
            append(CorruptValueError("user value failed the batch checks"))  # (unreachable in practice)
        except CorruptValueError as e:
            append(e)
    return out


def encode_users(
    counts: np.ndarray, record_words: np.ndarray, profiles: np.ndarray
) -> tuple[bytes, np.ndarray]:
    """Encode many users at once into one buffer; returns (buffer, offsets).

    `counts[i]` records of user i are rows `sum(counts[:i]) ...` of `record_words`, an
    (R, 3) int64 array (item_id, cate_id, timestamp), newest first within each user;
    `profiles` is (U, P) int64. User i's value is `buffer[offsets[i]:offsets[i+1]]`.
    Every part is a whole number of int64 words, so the values are laid out as one int64
    array: the header and profile words of each user are scattered in front of its records.
    """
    counts = np.asarray(counts, dtype=np.int64)
    record_words = np.asarray(record_words, dtype="<i8").reshape(-1)
    if record_words.size != 3 * int(counts.sum()):
        raise ValueError(f"record_words holds {record_words.size // 3} records, counts sum to {int(counts.sum())}")
    n_users = len(counts)
    profiles = np.asarray(profiles, dtype="<i8").reshape(n_users, -1)
    n_profile = profiles.shape[1]
    lead = 1 + n_profile  # header word + profile words per user
    words_per_user = lead + 3 * counts
    word_end = np.cumsum(words_per_user)
    word_start = word_end - words_per_user
    out = np.empty(int(word_end[-1]) if n_users else 0, dtype="<i8")
    lead_pos = (word_start[:, None] + np.arange(lead)).ravel()
    lead_words = np.empty((n_users, lead), dtype="<i8")
    lead_words[:, 0] = np.frombuffer(header_bytes(n_profile), dtype="<i8")[0]
    lead_words[:, 1:] = profiles
    is_record = np.ones(out.size, dtype=bool)
    is_record[lead_pos] = False
    out[lead_pos] = lead_words.ravel()
    out[is_record] = record_words
    offsets = np.concatenate(([0], word_end)) * 8
    return out.tobytes(), offsets


# ---------------------------------------------------------------------------------------
# Ad features: one small value per ad id, the fields named by the version's meta
# (`ad_fields`, cate_id first).
#
#     offset  size   field
#     0       4      magic b"DINA"
#     4       1      format version (u8, = FORMAT_VERSION)
#     5       1      n_fields (u8): number of int64 fields that follow
#     6       2      reserved (u16 little-endian, = 0)
#     8       8*F    field values (int64 LE), in the order of the meta's ad_fields
AD_MAGIC = b"DINA"


def ad_header_bytes(n_fields: int) -> bytes:
    if not 1 <= n_fields <= MAX_PROFILE_FIELDS:
        raise ValueError(f"n_fields must be in 1..{MAX_PROFILE_FIELDS}, got {n_fields}")
    header = np.zeros((), dtype=HEADER_DTYPE)
    header["magic"] = AD_MAGIC
    header["version"] = FORMAT_VERSION
    header["n_profile"] = n_fields
    return header.tobytes()


def encode_ads(fields: np.ndarray) -> bytes:
    """(A, F) int64 field values -> A fixed-size values laid end to end (each 8 + 8*F bytes)."""
    fields = np.asarray(fields, dtype="<i8")
    if fields.ndim != 2:
        raise ValueError(f"ad fields must be 2-D (ads, fields), got shape {fields.shape}")
    words = np.empty((fields.shape[0], 1 + fields.shape[1]), dtype="<i8")
    words[:, 0] = np.frombuffer(ad_header_bytes(fields.shape[1]), dtype="<i8")[0]
    words[:, 1:] = fields
    return words.tobytes()


def decode_ads(values: "list[bytes | None]", n_fields: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(found (N,) bool, fields (N, F) int64 with -1 where not found, corrupt count), vectorised.

    A value that is not an ad value with `n_fields` fields counts as corrupt and not found.
    """
    size = 8 + 8 * n_fields
    header = ad_header_bytes(n_fields)
    found = np.fromiter((v is not None and len(v) == size and v[:8] == header for v in values), dtype=bool, count=len(values))
    corrupt = int(sum(v is not None for v in values)) - int(found.sum())
    out = np.full((len(values), n_fields), -1, dtype=np.int64)
    if found.any():
        joined = b"".join(v for v, ok in zip(values, found.tolist()) if ok)
        out[found] = np.frombuffer(joined, dtype="<i8").reshape(-1, 1 + n_fields)[:, 1:]
    return found, out, corrupt
