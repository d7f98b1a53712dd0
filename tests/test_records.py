"""The packed user value: pinned bytes, round trips, and clear errors on corrupt values."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.records import (
    RECORD_DTYPE,
    CorruptValueError,
    decode_user,
    encode_user,
    encode_users,
    make_records,
)

# Hand-written from the layout in docs/feature-store.md: header, 2 profile ids, 2 records.
GOLDEN_HEX = (
    "44494e55" "01" "02" "0000"  # magic "DINU", version 1, n_profile 2, reserved 0
    "0100000000000000"  # profile[0] = 1
    "ffffffffffffffff"  # profile[1] = -1 (no profile id: two's complement int64)
    "0700000000000000" "0300000000000000" "e803000000000000"  # newest: item 7, cate 3, ts 1000
    "0500000000000000" "0200000000000000" "8403000000000000"  # older:  item 5, cate 2, ts 900
)


def golden_records() -> np.ndarray:
    return make_records(item_id=[7, 5], cate_id=[3, 2], timestamp=[1000, 900])


def test_golden_bytes():
    value = encode_user(golden_records(), profile=[1, -1])
    assert value.hex() == GOLDEN_HEX
    assert len(value) == 8 + 2 * 8 + 2 * 24


def test_decode_golden_is_a_zero_copy_view():
    value = bytes.fromhex(GOLDEN_HEX)
    h = decode_user(value)
    assert h.profile.dtype == np.int64 and h.profile.tolist() == [1, -1]
    assert h.records.dtype == RECORD_DTYPE
    assert h.records["item_id"].tolist() == [7, 5]
    assert h.records["cate_id"].tolist() == [3, 2]
    assert h.records["timestamp"].tolist() == [1000, 900]
    assert len(h) == 2
    # a view of the reply bytes, not a copy
    assert h.records.base is value and h.profile.base is value
    assert not h.records.flags.writeable


def test_round_trip_random_int64_ids():
    rng = np.random.default_rng(0)
    n = 37
    recs = make_records(
        rng.integers(-(2**62), 2**62, n), rng.integers(0, 2**40, n), rng.integers(0, 2**62, n)
    )
    profile = rng.integers(-(2**63), 2**63 - 1, 5)
    h = decode_user(encode_user(recs, profile))
    np.testing.assert_array_equal(h.records, recs)
    np.testing.assert_array_equal(h.profile, profile)


@pytest.mark.parametrize("n_records,profile", [(0, None), (0, [4, 5]), (3, None)])
def test_round_trip_empty_parts(n_records, profile):
    recs = make_records(np.arange(n_records), np.arange(n_records) + 10, np.arange(n_records) + 100)
    value = encode_user(recs, profile)
    assert len(value) == 8 + 8 * len(profile or []) + 24 * n_records
    h = decode_user(value)
    assert len(h) == n_records
    assert h.profile.tolist() == (profile or [])
    assert h.records["cate_id"].tolist() == list(range(10, 10 + n_records))


def test_encode_accepts_other_integer_structured_dtypes():
    other = np.zeros(2, dtype=[("timestamp", "<i4"), ("item_id", ">i8"), ("cate_id", "<i2")])
    other["item_id"] = [7, 5]
    other["cate_id"] = [3, 2]
    other["timestamp"] = [1000, 900]
    assert encode_user(other, profile=[1, -1]).hex() == GOLDEN_HEX


def test_encode_rejects_records_without_the_fields():
    with pytest.raises(ValueError, match="item_id"):
        encode_user(np.zeros(3, dtype=[("item", "<i8")]))


def test_encode_users_matches_encode_user():
    """The bulk loader's vectorised encoder writes exactly the per-user bytes."""
    rng = np.random.default_rng(1)
    counts = np.array([3, 0, 1, 5, 0])
    words = rng.integers(-(2**62), 2**62, (counts.sum(), 3))
    profiles = rng.integers(-5, 2**40, (5, 2))
    data, offsets = encode_users(counts, words, profiles)
    assert offsets[-1] == len(data)
    start = 0
    for i, c in enumerate(counts):
        recs = make_records(*words[start : start + c].T)
        start += c
        assert data[offsets[i] : offsets[i + 1]] == encode_user(recs, profiles[i])


def test_encode_users_without_profile_fields():
    data, offsets = encode_users(np.array([1, 2]), np.arange(9).reshape(3, 3), np.empty((2, 0)))
    assert data[offsets[0] : offsets[1]] == encode_user(make_records([0], [1], [2]))
    assert data[offsets[1] : offsets[2]] == encode_user(make_records([3, 6], [4, 7], [5, 8]))


GOLDEN = bytes.fromhex(GOLDEN_HEX)


@pytest.mark.parametrize(
    "value,message",
    [
        (b"XINU" + GOLDEN[4:], r"starts with b'XINU', expected magic b'DINU'"),
        (GOLDEN[:4] + b"\x02" + GOLDEN[5:], r"format version 2; this code reads version 1"),
        (GOLDEN[:-1], r"71 bytes; with 2 profile ids it must be 24 \+ 24\*k bytes"),
        (GOLDEN + b"\x00", r"73 bytes"),
        (GOLDEN[:5] + b"\x09" + GOLDEN[6:], r"with 9 profile ids"),  # n_profile beyond the value
        (GOLDEN[:6], r"6 bytes, shorter than the 8-byte header"),
        (b"", r"0 bytes, shorter"),
    ],
    ids=["bad-magic", "wrong-version", "truncated", "padded", "bad-n-profile", "short-header", "empty"],
)
def test_corrupt_values_raise_clear_errors(value, message):
    with pytest.raises(CorruptValueError, match=message):
        decode_user(value)


# --------------------------------------------------------------------------- ad values, fences
AD_GOLDEN_HEX = (
    "44494e41" "01" "01" "0000"  # magic "DINA", version 1, one field, reserved 0
    "0300000000000000"  # cate_id = 3
)


def test_ad_value_golden_bytes_and_vectorised_decode():
    from feature_store.records import decode_ads, encode_ads

    data = encode_ads(np.array([[3], [2**53 + 1]]))
    assert data[:16].hex() == AD_GOLDEN_HEX and len(data) == 32
    found, values, corrupt = decode_ads([data[:16], None, data[16:], b"DINA\x01\x02\x00\x00" + bytes(16), data[:15]], 1)
    assert found.tolist() == [True, False, True, False, False]
    assert values[:, 0].tolist() == [3, -1, 2**53 + 1, -1, -1]
    assert corrupt == 2  # another field count, a truncated value


def test_fence_text_is_pinned():
    from feature_store.fences import Fence, key_slot, slot_tag, slot_tags

    assert Fence("N", "8", 50, 2, 0, 128, 86400).encode() == "N 8 50 2 0 128 86400"
    assert Fence.decode(b"S - 30 0 3600 64 60") == Fence("S", None, 30, 0, 3600, 64, 60)
    tags = slot_tags()
    assert len(tags) == 16384 and all(key_slot(t.encode()) == s for s, t in enumerate(tags))
    assert slot_tag(0) == tags[0]


def test_batch_decode_equals_one_by_one_and_returns_errors():
    from feature_store.records import decode_users

    good = bytes.fromhex(GOLDEN_HEX)
    no_profile = encode_user(make_records([1, 2], [3, 4], [5, 6]))
    values = [good, None, no_profile, good[:-1], b"XINU" + good[4:], encode_user(make_records([], [], []))]
    out = decode_users(values)
    assert out[1] is None
    for i in (0, 2, 5):
        want = decode_user(values[i])
        np.testing.assert_array_equal(out[i].records, want.records)
        np.testing.assert_array_equal(out[i].profile, want.profile)
        assert out[i].records.base is values[i] and not out[i].records.flags.writeable
    assert isinstance(out[3], CorruptValueError) and "truncated" in str(out[3])
    assert isinstance(out[4], CorruptValueError) and "magic" in str(out[4])
    assert out[2].profile.size == 0
    assert out[0].profile.tolist() == [1, -1] and len(out[0]) == 2
