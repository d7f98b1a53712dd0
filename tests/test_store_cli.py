"""The feature store's commands: `din load` without a bundle, `din events FILE`, `din store stats`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from typer.testing import CliRunner

from model.data.log import BehaviourLog, write_log
from service.cli import app


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result


def test_load_events_and_stats_from_the_command_line(redis_url, tmp_path):
    log = BehaviourLog(user_id=np.array([1, 1, 2]), item_id=np.array([10, 11, 20]),
                       cate_id=np.array([1, 1, 2]), timestamp=np.array([5, 6, 7]))
    path = write_log(log, tmp_path / "log.parquet")
    loaded = invoke("load", "--data", f"events:{path}", "--redis-url", redis_url, "--max-history", "3",
                    "--user-ttl", "3600", "--json")
    assert loaded.exit_code == 0, loaded.output
    report = json.loads(loaded.stdout)
    assert (report["users"], report["events"], report["ads"]) == (2, 3, 3)

    events = tmp_path / "events.csv"
    pacsv.write_csv(pa.table({
        "user_id": [1, 3, 1], "item_id": [12, 30, 13], "cate_id": [1, 3, 1],
        "timestamp": [8, 1, 9], "event_id": ["e1", "e2", "e3"],
    }), events)
    first = invoke("events", str(events), "--redis-url", redis_url, "--batch", "2", "--json")
    again = invoke("events", str(events), "--redis-url", redis_url, "--json")  # the same file re-sent
    assert json.loads(first.stdout) == {"events": 3, "applied": 3, "duplicates": 0, "data_version": report["version"]}
    assert json.loads(again.stdout)["duplicates"] == 3

    stats = json.loads(invoke("store", "stats", "--redis-url", redis_url, "--json").stdout)
    assert stats["version"] == report["version"] and stats["users"] == 3 and stats["ads"] == 3
    assert stats["version_keys"]["event_ids"] == 2 and stats["version_keys"]["fences"] == 16384
    # user 1: 3 kept (max history) of 4 -> 8 + 3 * 24 bytes; users 2, 3: 1 record each
    assert stats["value_bytes_per_user"] == (80 + 32 + 32) / 3
    assert stats["bytes_per_user"] > stats["value_bytes_per_user"] and stats["memory_used"] > 0
    text = invoke("store", "stats", "--redis-url", redis_url).stdout
    assert f"data version      {report['version']}" in text and "users             3" in text


def test_events_file_errors_name_the_file_and_column(redis_url, tmp_path):
    bad = tmp_path / "bad.csv"
    pacsv.write_csv(pa.table({"user_id": [1], "item_id": [2], "cate_id": [3], "timestamp": [4]}), bad)
    result = CliRunner().invoke(app, ["events", str(bad), "--redis-url", redis_url])
    assert result.exit_code == 2
    assert "bad.csv: missing column(s) event_id" in result.output


def test_a_store_the_command_cannot_use_is_one_line_not_a_traceback(redis_url, tmp_path):
    """Unreachable, a URL scheme or namespace it refuses, a plain node taken for a cluster."""
    from feature_store.embedded import free_port

    log = write_log(BehaviourLog(user_id=np.array([1]), item_id=np.array([10]), cate_id=np.array([1]), timestamp=np.array([5])),
                    tmp_path / "log.parquet")  # fmt: skip
    events = tmp_path / "events.csv"
    pacsv.write_csv(pa.table({"user_id": [1], "item_id": [12], "cate_id": [1], "timestamp": [8], "event_id": ["e1"]}), events)
    closed = f"redis://127.0.0.1:{free_port()}/0"
    cases = [
        (["store", "stats", "--redis-url", closed], "is unavailable"),
        (["load", "--data", f"events:{log}", "--redis-url", closed], "is unavailable"),
        (["events", str(events), "--redis-url", closed], "is unavailable"),
        (["store", "stats", "--redis-url", "http://x"], "has scheme 'http'"),
        (["store", "stats", "--namespace", "a:b", "--redis-url", redis_url], "namespace 'a:b' is not allowed"),
        (["load", "--data", f"events:{log}", "--redis-cluster", "--redis-url", redis_url], "luster"),
    ]
    for args, says in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert says in result.output and "Traceback" not in result.output, (args, result.output)


def test_namespace_comes_from_redis_namespace_as_the_services_does(redis_url, redis_client, tmp_path):
    """REDIS_NAMESPACE exported for `din serve` used to be ignored by load, events and stats (they wrote
    and read "din"): every user then ranked with an empty history."""
    log = write_log(BehaviourLog(user_id=np.array([1, 2]), item_id=np.array([10, 20]), cate_id=np.array([1, 2]),
                                 timestamp=np.array([5, 6])), tmp_path / "log.parquet")  # fmt: skip
    events = tmp_path / "events.csv"
    pacsv.write_csv(pa.table({"user_id": [1], "item_id": [12], "cate_id": [1], "timestamp": [8], "event_id": ["e1"]}), events)
    env = {"REDIS_NAMESPACE": "prod"}
    loaded = CliRunner().invoke(app, ["load", "--data", f"events:{log}", "--redis-url", redis_url, "--json"], env=env)
    assert loaded.exit_code == 0, loaded.output
    assert redis_client.get("prod:current").decode() == json.loads(loaded.stdout)["version"]
    assert redis_client.get("din:current") is None
    appended = CliRunner().invoke(app, ["events", str(events), "--redis-url", redis_url, "--json"], env=env)
    assert json.loads(appended.stdout)["applied"] == 1
    stats = json.loads(CliRunner().invoke(app, ["store", "stats", "--redis-url", redis_url, "--json"], env=env).stdout)
    assert (stats["namespace"], stats["users"]) == ("prod", 2)
    flag = CliRunner().invoke(app, ["store", "stats", "--redis-url", redis_url, "--namespace", "din", "--json"], env=env)
    assert json.loads(flag.stdout)["namespace"] == "din"  # the flag wins over the variable

    # refused as the service refuses it, before the data is read, naming the variable
    bad = {"REDIS_NAMESPACE": "a:b"}
    for args in (["load", "--data", f"events:{tmp_path / 'missing.parquet'}"], ["events", str(events)], ["store", "stats"]):
        result = CliRunner().invoke(app, [*args, "--redis-url", redis_url], env=bad)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.strip().startswith("error: --namespace / REDIS_NAMESPACE: namespace 'a:b' is not allowed"), (args, result.output)
    assert redis_client.keys("a:b*") == []
