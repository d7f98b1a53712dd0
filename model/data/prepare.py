"""`din prepare IN OUT`: sort a behaviour log by (user_id, timestamp) in bounded memory.

Streamed training needs each user's events together and in time order. A log larger
than memory is sorted with a classic external sort by range partitioning:

1. read IN in record batches; keep a uniform sample of the rows' user ids (bottom-k,
   model/data/reservoir.py) and count the rows;
2. choose P partitions so that one partition, with the sort's working copies, fits in
   `memory_mb`; the sample's user-id quantiles are the partition boundaries, so every
   partition holds about the same number of events and whole users;
3. read IN again and append each batch's rows to its partition's temporary Parquet file
   (rows keep their file order inside a partition);
4. for each partition in user-id order: load it, sort it stably by (user_id, timestamp)
   in memory, append it to OUT in row groups of `row_group_rows` rows.

Ties (same user, same timestamp) keep their order in IN, exactly as
BehaviourLog.sorted_by_user_time does in memory. A single user with more events than a
partition's budget still lands in one partition (users are never split). IN may be
Parquet or CSV; OUT is Parquet, written atomically (a temporary file, then a rename),
with small row groups so streamed training reads each block with little waste.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from model.data.log import REQUIRED_COLUMNS, LogFormatError
from model.data.reservoir import BottomKSample
from model.data.stream_plan import batch_columns

QUANTILE_SAMPLE = 1 << 17  # user ids sampled to choose the partition boundaries
_WORKING_COPIES = 4  # columns + sort order + sorted copies: bytes in memory per byte of data
_PREPARE_SALT = 3


@dataclass(frozen=True)
class PrepareReport:
    source: Path
    out: Path
    rows: int
    users: int
    partitions: int
    seconds: float

    def to_json(self) -> dict:
        return {"source": str(self.source), "out": str(self.out), "rows": self.rows, "users": self.users,
                "partitions": self.partitions, "seconds": self.seconds}  # fmt: skip


_CSV_BLOCK_BYTES = 1 << 24  # a CSV is read (and its column types inferred) a block at a time


def _columns_of(names: list[str], path: Path) -> tuple[str, ...]:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise LogFormatError(
            f"{path}: missing column(s) {', '.join(missing)}; a behaviour log needs "
            f"{', '.join(REQUIRED_COLUMNS)} and may have label"
        )
    return (*REQUIRED_COLUMNS, "label") if "label" in names else REQUIRED_COLUMNS


def _name_columns(message: str, names: list[str]) -> str:
    """Arrow says "CSV column #3"; say which one: "column #3 ('timestamp')"."""
    return re.sub(r"column #(\d+)", lambda m: f"column #{m[1]} ({names[int(m[1])]!r})" if int(m[1]) < len(names) else m[0], message)


def _batches(path: Path, read_rows: int) -> tuple[tuple[str, ...], Iterator[dict[str, np.ndarray]]]:
    """The log's columns and an iterator over its record batches as validated int64 columns."""
    csv = path.suffix.lower() in (".csv", ".tsv", ".txt")
    try:
        if csv:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            names = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter)).schema.names
        else:
            names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        raise LogFormatError(f"{path}: cannot be read as {'CSV' if csv else 'Parquet'} ({e})") from None
    columns = _columns_of(names, path)

    def gen() -> Iterator[dict[str, np.ndarray]]:
        if csv:
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(include_columns=list(columns)),
            )
            source = iter(reader)
        else:
            source = pq.ParquetFile(path).iter_batches(batch_size=read_rows, columns=list(columns))
        try:
            for batch in source:
                if batch.num_rows:
                    yield batch_columns(batch, path, columns)
        except pa.ArrowInvalid as e:  # a CSV block past the first one holds a value of another type
            raise LogFormatError(f"{path}: {_name_columns(str(e), names)}; every id and timestamp must be a whole number") from None

    return columns, gen()


def _schema(columns: tuple[str, ...]) -> pa.Schema:
    return pa.schema([(c, pa.int8() if c == "label" else pa.int64()) for c in columns])


def _table(cols: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    return pa.table({c: cols[c].astype(schema.field(c).type.to_pandas_dtype(), copy=False) for c in schema.names}, schema=schema)


def prepare_log(
    source: str | Path,
    out: str | Path,
    *,
    memory_mb: int = 512,
    row_group_rows: int = 65_536,
    read_rows: int = 65_536,
    progress: bool = False,
) -> PrepareReport:
    """Sort `source` by (user_id, timestamp) into the Parquet file `out` (see the module docstring)."""
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise LogFormatError(f"{source}: no such file")
    if source.resolve() == out.resolve():
        raise ValueError(f"OUT must differ from IN ({source}); the sort reads IN twice")
    if memory_mb < 16 or row_group_rows < 1 or read_rows < 1:
        raise ValueError("memory_mb must be >= 16, row_group_rows and read_rows >= 1")
    started = time.perf_counter()
    bar = _bar(progress)

    # 1. count rows, sample user ids
    columns, batches = _batches(source, read_rows)
    sample = BottomKSample(QUANTILE_SAMPLE, salt=_PREPARE_SALT, columns=("user",))
    rows = 0
    for cols in batches:
        n = cols["user_id"].size
        sample.add(rows + np.arange(n, dtype=np.int64), user=cols["user_id"])
        rows += n
        bar.update(n)
    if rows == 0:
        raise LogFormatError(f"{source}: the behaviour log is empty")
    bytes_per_row = 8 * len(columns) * _WORKING_COPIES
    partitions = max(1, -(-rows * bytes_per_row // (memory_mb << 20)))
    users = np.sort(sample.values()["user"])
    bounds = np.unique(users[(np.arange(1, partitions) * users.size) // partitions]) if partitions > 1 else np.zeros(0, np.int64)
    partitions = bounds.size + 1  # duplicate quantiles (heavy users) merge partitions

    schema = _schema(columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    tmp_out = tmp_dir / "out.parquet"
    try:
        # 2./3. route every row to its partition (file order kept within a partition)
        part_paths = [tmp_dir / f"part-{p:05d}.parquet" for p in range(partitions)]
        if partitions > 1:
            writers = [pq.ParquetWriter(p, schema) for p in part_paths]
            try:
                _, batches = _batches(source, read_rows)
                for cols in batches:
                    part = np.searchsorted(bounds, cols["user_id"], side="left")
                    order = np.argsort(part, kind="stable")
                    edges = np.searchsorted(part[order], np.arange(partitions + 1))
                    for p in np.flatnonzero(np.diff(edges)):
                        take = order[edges[p] : edges[p + 1]]
                        writers[p].write_table(_table({c: v[take] for c, v in cols.items()}, schema))
                    bar.update(cols["user_id"].size)
            finally:
                for w in writers:
                    w.close()
        # 4. sort each partition in memory and append it
        n_users = 0
        with pq.ParquetWriter(tmp_out, schema) as writer:
            for p in range(partitions):
                if partitions > 1:
                    table = pq.read_table(part_paths[p])
                    cols = {c: table.column(c).to_numpy() for c in columns}
                    del table
                    part_paths[p].unlink()
                else:
                    _, batches = _batches(source, read_rows)
                    chunks = list(batches)
                    cols = {c: np.concatenate([b[c] for b in chunks]) for c in columns}
                    del chunks
                if cols["user_id"].size == 0:
                    continue
                order = np.lexsort((cols["timestamp"], cols["user_id"]))  # stable
                cols = {c: v[order] for c, v in cols.items()}
                user = cols["user_id"]
                n_users += 1 + int(np.count_nonzero(user[1:] != user[:-1]))
                writer.write_table(_table(cols, schema), row_group_size=row_group_rows)
                bar.update(user.size)
                del cols, order, user
        tmp_out.replace(out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        bar.close()
    return PrepareReport(source, out, rows, n_users, partitions, time.perf_counter() - started)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool):
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(unit="row", desc="prepare", leave=False)  # stderr
