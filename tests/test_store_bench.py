"""`din bench store` on a tiny population: the JSON has exactly the issue's shape and exact sizes."""

from __future__ import annotations

import shutil

import pytest

from feature_store.bench import StoreBenchConfig, run_store_bench, synthetic_store_log
from feature_store.loader import group_histories


def test_bench_store_reports_the_issues_json(tmp_path):
    config = StoreBenchConfig(
        users=2000, history=7, items=300, batch1_reads=50, batch64_reads=10, append_events=300,
        redis_benchmark_requests=2000,
    )
    result, details = run_store_bench(config, log=lambda m: None)
    assert {k: set(v) for k, v in result.items()} == {
        "load": {"users_per_s", "mb_per_s", "redis_set_ratio"},
        "read": {"batch1_users_per_s", "batch64_users_per_s", "redis_get_ratio"},
        "append": {"events_per_s"},
        "memory": {"bytes_per_user", "raw_bytes_per_user"},
    }
    assert result["memory"]["raw_bytes_per_user"] == 8 + 24 * 7  # header + 7 records, no profile
    assert result["memory"]["bytes_per_user"] > result["memory"]["raw_bytes_per_user"]  # + key, object overhead
    assert details["ads"] == 300 and details["value_bytes"] == 8 + 24 * 7
    if shutil.which("redis-benchmark") is None:
        pytest.skip("no redis-benchmark: ratios are null")
    assert result["load"]["redis_set_ratio"] > 0 and result["read"]["redis_get_ratio"] > 0


def test_synthetic_bench_log_is_already_grouped_and_keeps_every_behaviour():
    log = synthetic_store_log(users=50, history=4, items=10, categories=3)
    g = group_histories(log, max_history=4)
    assert g.counts.tolist() == [4] * 50
    first_user = log.item_id[g.rows[:4]].tolist()
    assert first_user == log.item_id[:4][::-1].tolist()  # newest (last) first
    assert (log.cate_id == log.item_id % 3).all()
