"""Amazon reviews as a behaviour log, under the DIN paper's protocol (Amazon Electronics).

Input: a directory with a 5-core reviews file and a metadata file, JSON lines, gzipped or
not (McAuley's releases: `reviews_Electronics_5.json.gz` + `meta_Electronics.json.gz`
from 2014, or `Electronics_5.json.gz` + `meta_Electronics.json.gz` from 2018). The file
whose name starts with `meta` is the metadata; the other one holds the reviews.

- Each review (`reviewerID`, `asin`, `unixReviewTime`) is a behaviour with label 1. A user's
  repeated review of the same product is dropped (the earliest is kept), so a target is
  never already in its own history.
- Category: from the metadata, the LAST entry of the first `categories` list (as the DIN
  preprocessing does); newer files: the last entry of `category`, else `main_cat`.
  Old metadata lines are Python literals, not JSON: each line is tried as JSON first, then
  with `ast.literal_eval`.
- Ids: reviewerID and asin -> sorted unique index (0..n-1); category names -> sorted
  unique index + 1, with 0 = `UNKNOWN_CATEGORY` for products without metadata/category.
  The maps are kept in `AmazonDataset`.
- Negatives: next to every review the log holds one impression of the same user at the
  same time with label 0, `is_behaviour=False`, of an item drawn uniformly (seeded) from
  the items that user NEVER reviewed. `is_behaviour` tells the sample builder that such an
  impression is a candidate only and must never enter a history.
- Split (`split` column): per user, ordered by time (ties in file order), the last review
  and its negative are test (2), the second-to-last and its negative validation (1), the
  rest train (0). The DIN code has no validation split; we select models on it.
"""

from __future__ import annotations

import ast
import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson

from model.data.download import download_amazon  # noqa: F401  (re-exported for users)
from model.data.log import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, BehaviourLog, LogFormatError

UNKNOWN_CATEGORY = 0
UNKNOWN_CATEGORY_NAME = "<unknown>"
_JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


@dataclass
class AmazonDataset:
    """The log plus the string-id maps: `users[i]` is the reviewerID of user_id i, etc."""

    log: BehaviourLog
    users: np.ndarray  # str, index = user_id
    items: np.ndarray  # str (asin), index = item_id
    categories: np.ndarray  # str, index = cate_id; 0 = UNKNOWN_CATEGORY_NAME
    reviews: int  # reviews kept (= behaviours)
    duplicates_dropped: int  # repeated (user, asin) reviews dropped


def _open_text(path: Path):
    """Text lines of a plain or gzipped file (told apart by the gzip magic bytes, not the name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered text lines; a cut-off download, or a file that is not gzip or not UTF-8 where it
    claims to be, is a LogFormatError naming the file (gzip's EOFError would read as 'Aborted.')."""
    n = 0
    with _open_text(path) as f:
        try:
            for n, line in enumerate(f, 1):
                yield n, line
        except (EOFError, OSError, UnicodeDecodeError) as e:
            raise LogFormatError(
                f"{path}: unreadable after line {n} (truncated or corrupt gzip, or not UTF-8: {e}); download it again"
            ) from None


def _records(path: Path, wanted: set[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, dict) per non-empty line; strict JSON or a Python literal dict.

    With `wanted`, Python-literal lines whose asin is not in it are skipped unparsed
    (literal_eval is ~100x slower than JSON, and the 2014 metadata lists every product).
    """
    for n, line in _lines(path):
        line = line.strip()
        if not line:
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            if wanted is not None:
                m = _ASIN.search(line)
                if m is not None and m.group(1) not in wanted:
                    continue
            try:
                record = ast.literal_eval(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise LogFormatError(f"{path}, line {n}: neither JSON nor a Python literal dict") from None
        if not isinstance(record, dict):
            raise LogFormatError(f"{path}, line {n}: expected an object, found {type(record).__name__}")
        yield n, record


def _category(record: dict[str, Any]) -> str | None:
    """The DIN choice: last entry of the first `categories` list; newer files: `category`, `main_cat`."""
    cats = record.get("categories")
    if isinstance(cats, list) and cats and isinstance(cats[0], list) and cats[0]:
        return str(cats[0][-1])
    cat = record.get("category")
    if isinstance(cat, list) and cat:
        return str(cat[-1])
    main = record.get("main_cat")
    return str(main) if main else None


def find_amazon_files(path: str | Path) -> tuple[Path, Path]:
    """(reviews file, metadata file) in an Amazon directory, with a clear error otherwise."""
    if str(path) == "":
        raise LogFormatError("amazon needs the folder holding the reviews and meta files (data spec amazon:PATH)")
    root = Path(path)
    if not root.is_dir():
        raise LogFormatError(f"{root}: not a directory; pass the folder holding the reviews and meta_*.json(.gz) files")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(_JSON_SUFFIXES))
    meta = [p for p in files if p.name.lower().startswith("meta")]
    reviews = [p for p in files if not p.name.lower().startswith("meta")]
    if len(meta) != 1 or len(reviews) != 1:
        found = ", ".join(p.name for p in files) or "no .json/.json.gz files"
        raise LogFormatError(
            f"{root}: expected exactly one reviews file (e.g. reviews_Electronics_5.json.gz) and one "
            f"metadata file named meta_*.json(.gz); found {found}"
        )
    return reviews[0], meta[0]


def _read_reviews(path: Path) -> tuple[list[str], list[str], list[int]]:
    users, items, times = [], [], []
    for n, r in _records(path):
        try:
            users.append(str(r["reviewerID"]))
            items.append(str(r["asin"]))
            times.append(int(r["unixReviewTime"]))
        except KeyError as e:
            raise LogFormatError(f"{path}, line {n}: review has no {e.args[0]!r} field") from None
        except (TypeError, ValueError):
            raise LogFormatError(f"{path}, line {n}: unixReviewTime must be an integer") from None
    if not users:
        raise LogFormatError(f"{path}: no reviews")
    return users, items, times


def _sample_negatives(user: np.ndarray, item: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """For each row, an item drawn uniformly from those `user[row]` never reviewed (vectorised rejection)."""
    reviewed = np.unique(user * n_items + item)  # sorted (user, item) keys
    full = np.flatnonzero(np.bincount(user) >= n_items)  # rows are unique (user, item) pairs
    if full.size:
        raise LogFormatError(f"user id {int(full[0])} reviewed every item; no negative can be sampled for them")
    neg = rng.integers(0, n_items, size=len(user))
    todo = np.arange(len(user))
    while todo.size:
        keys = user[todo] * n_items + neg[todo]
        pos = np.minimum(np.searchsorted(reviewed, keys), reviewed.size - 1)
        todo = todo[reviewed[pos] == keys]
        neg[todo] = rng.integers(0, n_items, size=todo.size)
    return neg


def load_amazon_files(reviews_path: Path, meta_path: Path, *, seed: int = 0) -> AmazonDataset:
    """Read one reviews file and one metadata file under the DIN protocol (module docstring)."""
    raw_users, raw_items, raw_times = _read_reviews(Path(reviews_path))
    users, user = np.unique(np.array(raw_users, dtype=object).astype(str), return_inverse=True)
    items, item = np.unique(np.array(raw_items, dtype=object).astype(str), return_inverse=True)
    user, item = user.astype(np.int64), item.astype(np.int64)
    ts = np.array(raw_times, dtype=np.int64)

    # Oldest first within a user, ties in file order; then keep each (user, item) once, the earliest.
    order = np.lexsort((ts, user))
    user, item, ts = user[order], item[order], ts[order]
    _, first = np.unique(user * len(items) + item, return_index=True)
    keep = np.sort(first)
    dropped = len(user) - len(keep)
    user, item, ts = user[keep], item[keep], ts[keep]

    item_cat: dict[str, str] = {}
    wanted = set(items.tolist())
    for n, r in _records(Path(meta_path), wanted):
        asin = r.get("asin")
        if asin is None:
            raise LogFormatError(f"{meta_path}, line {n}: metadata has no 'asin' field")
        cat = _category(r)
        if asin in wanted and cat is not None:
            item_cat[str(asin)] = cat
    if UNKNOWN_CATEGORY_NAME in item_cat.values():  # a real category with our sentinel's name
        raise LogFormatError(f"{meta_path}: category name {UNKNOWN_CATEGORY_NAME!r} is reserved")
    categories = np.array([UNKNOWN_CATEGORY_NAME, *sorted(set(item_cat.values()))], dtype=str)
    cat_index = {c: i for i, c in enumerate(categories.tolist())}
    cate_of_item = np.array([cat_index.get(item_cat.get(a, ""), UNKNOWN_CATEGORY) for a in items.tolist()],
                            dtype=np.int64)

    # Split: position from the end of each user's (time-ordered) reviews.
    n = len(user)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, n])
    from_end = np.repeat(starts + counts, counts) - 1 - np.arange(n)
    split = np.where(from_end == 0, SPLIT_TEST, np.where(from_end == 1, SPLIT_VALID, SPLIT_TRAIN)).astype(np.int8)

    neg = _sample_negatives(user, item, len(items), np.random.default_rng(seed))

    # Interleave: row 2k is review k, row 2k+1 its negative (same user and time, so a stable
    # sort by (user, time) keeps each pair together, the review first).
    pair_item = np.column_stack([item, neg]).ravel()
    log = BehaviourLog(
        user_id=np.repeat(user, 2),
        item_id=pair_item,
        cate_id=cate_of_item[pair_item],
        timestamp=np.repeat(ts, 2),
        label=np.tile(np.array([1, 0], dtype=np.int8), n),
        name=f"amazon:{Path(reviews_path).name}",
        is_behaviour=np.tile(np.array([True, False]), n),
        split=np.repeat(split, 2),
    )
    return AmazonDataset(log=log, users=users, items=items, categories=categories, reviews=n,
                         duplicates_dropped=dropped)


def load_amazon_dataset(path: str | Path, *, seed: int = 0) -> AmazonDataset:
    """Read an Amazon directory (one reviews file + one meta_* file) with its id maps."""
    reviews, meta = find_amazon_files(path)
    return load_amazon_files(reviews, meta, seed=seed)


def load_amazon(path: str | Path, *, seed: int = 0) -> BehaviourLog:
    """The behaviour log of an Amazon directory under the DIN protocol (see the module docstring)."""
    return load_amazon_dataset(path, seed=seed).log
