"""Raw id -> row: the direct table for compact ids and the binary search agree with a dict."""

import numpy as np
import pytest

from model.contract import FIRST_ID_ROW, UNK_ROW, Vocabulary

I64 = np.iinfo(np.int64)
EDGES = np.array([I64.min, I64.min + 1, -(2**62), -1, 0, 1, 2**62, I64.max - 1, I64.max], dtype=np.int64)


def _expected(ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    row_of = {int(x): i + FIRST_ID_ROW for i, x in enumerate(ids)}
    return np.array([row_of.get(int(x), UNK_ROW) for x in raw.ravel()], dtype=np.int64).reshape(raw.shape)


@pytest.mark.parametrize(
    "ids, dense",
    [
        (np.arange(1000), True),  # catalogue ids
        (np.array([7]), True),
        (np.array([3, 5, 11, 12]), True),  # gaps within DENSE_SPAN_PER_ID
        (np.arange(2**61, 2**61 + 300, 3), True),  # compact, far from zero
        (np.array([2**62 - 5, 2**62 - 1]), True),  # the largest ids the table takes
        (np.array([-4, 0, 9]), False),  # negative: searched
        (np.arange(0, 2**40, 2**30), False),  # sparse (hashes): searched
        (np.array([0, 2**62]), False),
        (np.array([], dtype=np.int64), False),
    ],
)
def test_lookup_matches_a_dict_on_both_paths(ids, dense):
    vocab = Vocabulary(ids)
    assert (vocab._rows is not None) == dense  # the path under test is the one meant
    rng = np.random.default_rng(0)
    lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 10)
    raw = np.concatenate([ids, rng.integers(lo - 20, hi + 20, 500), EDGES]).astype(np.int64)
    np.testing.assert_array_equal(vocab.lookup(raw), _expected(ids, raw))
    got = vocab.lookup(raw[:-1].reshape(2, -1) if raw.size % 2 else raw.reshape(2, -1))  # any shape
    assert got.dtype == np.int64 and got.ndim == 2


def test_ids_below_the_table_do_not_wrap_into_it():
    """An id just below lo, and one 2**64 below a table entry, are unknown."""
    vocab = Vocabulary(np.arange(2**61, 2**61 + 10))
    raw = np.array([2**61 - 1, 2**61 - 2**63, I64.min], dtype=np.int64)
    np.testing.assert_array_equal(vocab.lookup(raw), [UNK_ROW] * 3)
