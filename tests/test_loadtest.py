"""The load-test parts: summary and thresholds on fixture CSVs, the population file, the
locustfile's traffic model and response checks, and a real headless locust run against a
live service.

Locust monkey-patches the standard library with gevent when it is imported, so it is never
imported in this process: the locustfile is exercised in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from loadtest import summary as S
from loadtest.run import LoadTestConfig, write_population
from model.data.log import BehaviourLog

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
VENV_BIN = Path(sys.executable).parent

# The header rows locust 2.x writes (copied from a real run).
STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)
HISTORY_HEADER = (
    "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%,"
    "Total Request Count,Total Failure Count,Total Median Response Time,Total Average Response Time,"
    "Total Min Response Time,Total Max Response Time,Total Average Content Size"
)


def stats_row(typ, name, requests, failures, rps, p50, p95, p99, mx=None, avg=None):
    measured = p99 != "N/A"  # locust writes N/A percentiles (and 0 times) before any response
    mx = (p99 * 2 if measured else 0) if mx is None else mx
    avg = (p50 * 1.1 if measured else 0.0) if avg is None else avg
    pct = [p50, p50, p50, p50, p95, p95, p99, p99, mx, mx, mx]  # 50 66 75 80 90 95 98 99 99.9 99.99 100
    return ",".join(map(str, [typ, name, requests, failures, p50, avg, 1.0, mx, 1234.0, rps, rps * failures / max(requests, 1), *pct]))


def write_run(prefix: Path, *, rank=(1000, 5, 50.0, 20, 60, 80), events=None, history=None) -> Path:
    """Fixture CSVs of a finished run: /rank (and /events) rows plus the Aggregated row."""
    rows = [stats_row("POST", "/rank", *rank)]
    total = list(rank)
    if events is not None:
        rows.append(stats_row("POST", "/events", *events))
        total = [rank[0] + events[0], rank[1] + events[1], rank[2] + events[2], rank[3], max(rank[4], events[4]),
                 max(rank[5], events[5])]  # fmt: skip
    rows.append(stats_row("", "Aggregated", *total))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}_stats.csv").write_text("\n".join([STATS_HEADER, *rows]) + "\n")
    hist = history or [
        # ts, users, rps, fail/s, p50, p95, p99 (N/A before the first response)
        (1_700_000_000, 0, 0.0, 0.0, "N/A", "N/A", "N/A"),
        (1_700_000_001, 5, 40.0, 0.0, 18, 50, 70),
        (1_700_000_002, 10, 55.0, 1.0, 20, 60, 80),
        (1_700_000_004, 10, 52.0, 0.0, 21, 61, 82),
    ]
    lines = [HISTORY_HEADER]
    for ts, users, rps, fps, p50, p95, p99 in hist:
        pct = [p50, p50, p50, p50, p95, p95, p99, p99, p99, p99, p99]
        # a per-endpoint row (--csv-full-history) that the summary must skip, then Aggregated
        lines.append(",".join(map(str, [ts, users, "POST", "/rank", rps, fps, *pct, 10, 0, 1, 1, 1, 1, 1])))
        lines.append(",".join(map(str, [ts, users, "", "Aggregated", rps, fps, *pct, 10, 0, 1, 1, 1, 1, 1])))
    Path(f"{prefix}_stats_history.csv").write_text("\n".join(lines) + "\n")
    return prefix


# --- summary and thresholds ---------------------------------------------------------------


def test_summary_reads_the_totals_and_the_endpoints(tmp_path):
    prefix = write_run(tmp_path / "locust", rank=(1000, 5, 50.0, 20, 60, 80), events=(100, 0, 5.0, 10, 30, 40))
    s = S.summarize(prefix)
    assert s.requests == 1100 and s.failures == 5
    assert s.failure_rate == pytest.approx(5 / 1100)
    assert s.rps == pytest.approx(55.0)
    assert (s.p50_ms, s.p95_ms, s.p99_ms) == (20.0, 60.0, 80.0)
    assert [e.name for e in s.endpoints] == ["/rank", "/events"]
    assert s.endpoints[0].failure_rate == pytest.approx(0.005) and s.endpoints[1].failures == 0
    assert s.duration_s == 4.0


def test_degraded_answers_are_counted_apart(tmp_path):
    prefix = tmp_path / "locust"
    write_run(prefix, rank=(1000, 0, 50.0, 20, 60, 80))
    stats = Path(f"{prefix}_stats.csv")
    lines = stats.read_text().splitlines()
    lines.insert(2, stats_row("POST", "/rank [degraded]", 7, 0, 0.5, 55, 60, 61))
    stats.write_text("\n".join(lines) + "\n")
    s = S.summarize(prefix)
    assert s.degraded == 7 and s.failures == 0
    assert "degraded (ranked without history): 7 (0.70%)" in S.format_summary(s)


def test_thresholds_pass_and_fail(tmp_path):
    s = S.summarize(write_run(tmp_path / "ok", rank=(1000, 5, 50.0, 20, 60, 80)))
    assert S.check(s, S.Thresholds(max_failure_rate=0.01, max_p99_ms=100)) == []
    assert S.check(s, S.Thresholds(max_failure_rate=0.005, max_p99_ms=80)) == []  # limits are inclusive
    (problem,) = S.check(s, S.Thresholds(max_failure_rate=0.004, max_p99_ms=None))
    assert "failure rate 0.50% (5 of 1000)" in problem
    (problem,) = S.check(s, S.Thresholds(max_failure_rate=0.01, max_p99_ms=79))
    assert "p99 latency 80 ms" in problem
    assert len(S.check(s, S.Thresholds(max_failure_rate=0.0, max_p99_ms=10))) == 2


def test_main_exits_non_zero_on_a_failing_run(tmp_path, capsys):
    good = write_run(tmp_path / "good", rank=(2000, 10, 100.0, 12, 40, 90))
    assert S.main([str(good), "--max-failure-rate", "0.01", "--max-p99-ms", "100"]) == 0
    assert "PASS" in capsys.readouterr().out

    failing = write_run(tmp_path / "failing", rank=(2000, 60, 100.0, 12, 40, 90))  # 3% failed
    out_json = tmp_path / "failing.json"
    assert S.main([str(failing), "--max-failure-rate", "0.01", "--json", str(out_json)]) == 1
    assert "FAIL: failure rate 3.00% (60 of 2000)" in capsys.readouterr().out
    written = json.loads(out_json.read_text())
    assert written["failure_rate"] == pytest.approx(0.03) and written["requests"] == 2000 and written["problems"]

    slow = write_run(tmp_path / "slow", rank=(2000, 0, 100.0, 12, 40, 250))
    assert S.main([str(slow), "--max-p99-ms", "200"]) == 1

    empty = write_run(tmp_path / "empty", rank=(0, 0, 0.0, "N/A", "N/A", "N/A"))
    assert S.main([str(empty)]) == 1
    assert "no request completed" in capsys.readouterr().out

    # not a locust CSV: exit 2 with the file named
    Path(f"{tmp_path}/bad_stats.csv").write_text("a,b\n1,2\n")
    assert S.main([str(tmp_path / "bad")]) == 2
    assert "bad_stats.csv" in capsys.readouterr().err
    assert S.main([str(tmp_path / "absent")]) == 2


def test_history_and_plot(tmp_path):
    prefix = write_run(tmp_path / "locust")
    h = S.read_history(f"{prefix}_stats_history.csv")
    assert h.t_s.tolist() == [0.0, 1.0, 2.0, 4.0]  # only the Aggregated rows
    assert h.users.tolist() == [0, 5, 10, 10]
    assert math.isnan(h.p99_ms[0]) and h.p99_ms[1:].tolist() == [70, 80, 82]
    assert h.rps.tolist() == [0.0, 40.0, 55.0, 52.0]
    png = S.plot(h, tmp_path / "out" / "loadtest.png", title="fixture")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (990, 660)  # 9 x 6 inches at 110 dpi


# --- the population file --------------------------------------------------------------------


def test_population_orders_users_by_activity_and_maps_items_to_their_category(tmp_path):
    #            user  item  cate
    rows = [(7, 100, 1), (7, 101, 2), (7, 100, 1), (9, 100, 3), (3, 102, 2), (3, 101, 2), (5, 103, 4),
            (7, 102, 2), (3, 100, 1)]  # fmt: skip
    u, i, c = (np.array(col, dtype=np.int64) for col in zip(*rows))
    log = BehaviourLog(user_id=u, item_id=i, cate_id=c, timestamp=np.arange(len(rows), dtype=np.int64))
    path = write_population(log, tmp_path / "pop.json")
    pop = json.loads(path.read_text())
    assert pop["format"] == 1
    assert pop["users"] == [7, 3, 5, 9] and pop["user_events"] == [4, 3, 1, 1]  # ties by id
    assert pop["items"] == [100, 101, 102, 103]
    assert pop["item_cates"] == [1, 2, 2, 4]  # item 100: category 1 three times, 3 once
    assert pop["item_events"] == [4, 2, 2, 1]
    capped = json.loads(write_population(log, tmp_path / "cap.json", max_users=2).read_text())
    assert capped["users"] == [7, 3]


def test_din_loadtest_writes_the_population_file_and_names_itself_in_help(tmp_path):
    log = tmp_path / "events.csv"
    log.write_text("user_id,item_id,cate_id,timestamp\n7,100,1,1\n7,101,2,2\n3,100,1,3\n")
    cli = [sys.executable, "-m", "service.cli", "loadtest"]
    run = subprocess.run([*cli, "population", "--data", f"events:{log}", "--out", str(tmp_path / "pop.json")],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    pop = json.loads((tmp_path / "pop.json").read_text())
    assert pop["users"] == [7, 3] and pop["items"] == [100, 101]
    usage = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert usage.returncode == 0 and usage.stdout.startswith("usage: din loadtest [")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="--duration"):
        LoadTestConfig(duration_s=0)
    with pytest.raises(ValueError, match="--max-failure-rate"):
        LoadTestConfig(max_failure_rate=1.5)
    with pytest.raises(ValueError, match="--shape"):
        LoadTestConfig(shape="sawtooth")


# --- the locustfile, in a subprocess ---------------------------------------------------------

TRAFFIC_PROBE = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    from types import SimpleNamespace
    spec = importlib.util.spec_from_file_location("locustfile", sys.argv[1])
    lf = importlib.util.module_from_spec(spec); sys.modules["locustfile"] = lf; spec.loader.exec_module(lf)
    t = lf.traffic()
    draws = [t.user() for _ in range(20000)]
    known = [u for u, k in draws if k]
    unknown = [u for u, k in draws if not k]
    sets = t.pool
    body = json.loads(t.rank_body(42, sets[0]))
    events = json.loads(t.events_body(42, 1700000000))
    cs = sets[0]
    items = list(cs.cate_of)
    good = {"model_version": "v1", "user_id": 42, "history_length": 3, "degraded": False,
            "ranked": [{"item_id": i, "cate_id": cs.cate_of[i], "ctr": 0.9 - 0.01 * n} for n, i in enumerate(items)]}
    def bad(**change):
        p = json.loads(json.dumps(good)); p.update(change); return p
    swapped = json.loads(json.dumps(good)); swapped["ranked"][0], swapped["ranked"][1] = swapped["ranked"][1], swapped["ranked"][0]
    dup = json.loads(json.dumps(good)); dup["ranked"][1] = dup["ranked"][0]
    wrong_cate = json.loads(json.dumps(good)); wrong_cate["ranked"][2]["cate_id"] += 1000
    tie = json.loads(json.dumps(good)); tie["ranked"][1]["ctr"] = tie["ranked"][0]["ctr"]
    check = lambda p, known=True, top_k=0, strict=True: lf.check_rank_response(p, 42, known, cs, top_k, strict)
    shape = lf.RankingLoadShape()
    shape.runner = SimpleNamespace(environment=SimpleNamespace(
        parsed_options=SimpleNamespace(num_users=10, spawn_rate=5.0, run_time=100)))
    ticks = {}
    for at in (0, 10, 30, 65, 80, 99.5, 100):
        shape.get_run_time = lambda at=at: at
        ticks[str(at)] = shape.tick()
    print(json.dumps({
        "n_users": len(t._users), "first_unknown": t.first_unknown_user,
        "unknown_share": len(unknown) / len(draws), "min_unknown": min(unknown),
        "top_user_share": known.count(t._users[0]) / len(draws),
        "last_user_share": known.count(t._users[-1]) / len(draws),
        "pool": len(sets), "set_sizes": sorted({len(s.cate_of) for s in sets}),
        "body_keys": sorted(body), "body_user": body["user_id"], "body_candidates": body["candidates"][:3],
        "cate_of_first": [cs.cate_of[c["item_id"]] for c in body["candidates"][:3]],
        "events": len(events["events"]), "event_keys": sorted(events["events"][0]),
        "event_ids_distinct": len({e["event_id"] for e in events["events"]}),
        "good": check(good), "good_top3": check(bad(ranked=good["ranked"][:3]), top_k=3),
        "tie": check(tie), "swapped": check(swapped), "dup": check(dup), "wrong_cate": check(wrong_cate),
        "short": check(bad(ranked=good["ranked"][:-1])), "other_user": check(bad(user_id=43)),
        "degraded": check(bad(degraded=True)), "degraded_allowed": check(bad(degraded=True), strict=False),
        "unknown_with_history": check(good, known=False),
        "ctr_range": check(bad(ranked=[dict(r, ctr=1.5) if n == 0 else r for n, r in enumerate(good["ranked"])])),
        "missing": check({"user_id": 42}), "ticks": ticks,
    }))
    """
)


def test_locustfile_traffic_model_and_response_checks(tmp_path):
    n_users, n_items = 50, 30
    users = list(range(1000, 1000 + n_users))
    pop = {
        "format": 1, "source": "test", "users": users, "user_events": list(range(n_users, 0, -1)),
        "items": list(range(1, n_items + 1)), "item_cates": [100 + i % 4 for i in range(1, n_items + 1)],
        "item_events": [1] * n_items,
    }  # fmt: skip
    (tmp_path / "pop.json").write_text(json.dumps(pop))
    env = {
        "PATH": str(VENV_BIN), "LOADTEST_POPULATION": str(tmp_path / "pop.json"), "LOADTEST_CANDIDATES": "20",
        "LOADTEST_UNKNOWN_USER_RATE": "0.05", "LOADTEST_ZIPF_S": "1.0", "LOADTEST_CANDIDATE_POOL": "16",
        "LOADTEST_EVENTS_BATCH": "4", "LOADTEST_SEED": "1",
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", TRAFFIC_PROBE, str(LOCUSTFILE)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])

    assert r["n_users"] == n_users and r["first_unknown"] == 1000 + n_users
    assert r["min_unknown"] >= r["first_unknown"]  # an unknown user is never a loaded one
    assert abs(r["unknown_share"] - 0.05) < 0.01  # binomial sd 0.0015 over 20000 draws
    harmonic = sum(1.0 / k for k in range(1, n_users + 1))
    assert r["top_user_share"] == pytest.approx(0.95 / harmonic, abs=0.015)  # Zipf s=1: hot user
    assert r["last_user_share"] == pytest.approx(0.95 / (n_users * harmonic), abs=0.004)  # cold user
    assert r["pool"] == 16 and r["set_sizes"] == [20]  # distinct items per request
    assert r["body_keys"] == ["candidates", "user_id"] and r["body_user"] == 42
    assert [c["cate_id"] for c in r["body_candidates"]] == [100 + c["item_id"] % 4 for c in r["body_candidates"]]
    assert r["events"] == 4 and r["event_keys"] == ["cate_id", "event_id", "item_id", "timestamp", "user_id"]
    assert r["event_ids_distinct"] == 4

    assert r["good"] is None and r["good_top3"] is None and r["tie"] is None
    assert r["swapped"].startswith("not sorted: ranked[1]")
    assert "appears twice" in r["dup"] and "has cate_id" in r["wrong_cate"]
    assert r["short"] == "19 ranked items, expected 20"
    assert "user_id 43" in r["other_user"] and r["degraded"].startswith("degraded") and r["degraded_allowed"] is None
    assert r["unknown_with_history"].startswith("unknown user 42")
    assert "not in [0, 1]" in r["ctr_range"] and "no 'model_version'" in r["missing"]

    # ramp over 20% of -t at users / ramp time, hold, spike x2 at 60-75%, hold, stop at -t
    assert r["ticks"] == {
        "0": [10, 1.0], "10": [10, 1.0], "30": [10, 5.0], "65": [20, 5.0], "80": [10, 5.0], "99.5": [10, 5.0],
        "100": None,
    }  # fmt: skip


DEFAULT_RANGES_PROBE = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("locustfile", sys.argv[1])
    lf = importlib.util.module_from_spec(spec); sys.modules["locustfile"] = lf; spec.loader.exec_module(lf)
    pop = lf.traffic().population
    os.environ["LOADTEST_USERS"] = "7"
    lf._traffic = None
    other = lf.traffic().population
    overridden = [other.user_ids.size, other.item_ids.size, len(set(other.item_cates.tolist()))]
    print(json.dumps({
        "users": pop.user_ids.tolist(), "items": pop.item_ids.tolist(), "cates": pop.item_cates.tolist(),
        "overridden": overridden, "doc": lf.__doc__,
    }))
    """
)


def test_locustfile_default_population_is_the_default_synthetic_data():
    """Without LOADTEST_POPULATION (locust by hand against `make demo`), the traffic's ids are
    exactly those of `--data synthetic`: every user known, no item or category that does not exist."""
    from model.data.synthetic import DEFAULT_SYNTHETIC, generate

    env = {"PATH": str(VENV_BIN)}  # no LOADTEST_* at all
    result = subprocess.run(
        [sys.executable, "-c", DEFAULT_RANGES_PROBE, str(LOCUSTFILE)], env=env, capture_output=True, text=True,
        timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])

    log = generate(DEFAULT_SYNTHETIC)
    assert r["users"] == list(range(1, DEFAULT_SYNTHETIC.users + 1))
    assert r["users"] == np.unique(log.user_id).tolist()  # ids start at 1, every one has behaviours
    assert r["items"] == list(range(1, DEFAULT_SYNTHETIC.items + 1))
    assert set(np.unique(log.item_id).tolist()) <= set(r["items"])
    assert sorted(set(r["cates"])) == list(range(1, DEFAULT_SYNTHETIC.categories + 1))
    assert sorted(set(r["cates"])) == np.unique(log.cate_id).tolist()
    # one knob overrides only itself; the others stay the synthetic defaults
    assert r["overridden"] == [7, DEFAULT_SYNTHETIC.items, DEFAULT_SYNTHETIC.categories]
    # what the docstring and the docs tell a user
    assert (f"{DEFAULT_SYNTHETIC.users} users, {DEFAULT_SYNTHETIC.items} items, "
            f"{DEFAULT_SYNTHETIC.categories} categories") in " ".join(r["doc"].split())  # fmt: skip
    docs = " ".join((ROOT / "docs" / "loadtest.md").read_text().split())
    assert f"default synthetic data ({DEFAULT_SYNTHETIC.users:,} users, " in docs


# --- a real run: locust headless against a live service ----------------------------------------

needs_service = pytest.mark.skipif(
    importlib.util.find_spec("service.app") is None, reason="service.app is not importable yet (being written)"
)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(behaviour log, bundle dir): `din synth` and a one-epoch `din train` on 80 users."""
    root = tmp_path_factory.mktemp("loadtest-bundle")
    log = root / "log.parquet"
    din = str(VENV_BIN / "din")
    for cmd in (
        [din, "synth", "--users", "80", "--items", "60", "--categories", "8", "--seed", "1", "--out", str(log)],
        [din, "train", "--data", f"events:{log}", "--model", "din", "--epochs", "1", "--out", str(root / "bundles"),
         "--json"],
    ):  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
        assert result.returncode == 0, f"{cmd[1]} failed:\n{result.stderr[-3000:]}"
    return log, Path(json.loads(result.stdout)["bundle"])


@needs_service
def test_locust_headless_against_a_live_service(tiny_bundle, redis_url, tmp_path):
    from loadtest.run import run_loadtest

    log, bundle = tiny_bundle
    out = tmp_path / "report"
    # Paced at 10 requests/s per user (40/s, 80/s in the spike): well inside what this 2-core
    # machine serves, so a failure here is a wrong answer, not an overloaded box.
    config = LoadTestConfig(
        duration_s=10, users=4, spawn_rate=20, user_rps=10, candidates=30, out_dir=out, bundle=bundle,
        data=f"events:{log}", redis_url=redis_url, max_failure_rate=0.0, max_p99_ms=None,
    )  # fmt: skip
    report = run_loadtest(config)

    failures = (out / "locust_failures.csv").read_text()
    assert report.summary.failures == 0, f"failed requests:\n{failures}"
    assert report.passed and report.problems == []
    assert report.summary.requests > 0
    # only the `rank` tag ran; store timeouts (if any) are counted apart, not as failures
    assert {e.name for e in report.summary.endpoints} <= {"/rank", "/rank [degraded]"}
    assert sum(e.requests for e in report.summary.endpoints) == report.summary.requests
    assert report.summary.degraded < report.summary.requests / 10
    assert 0 < report.summary.p50_ms <= report.summary.p95_ms <= report.summary.p99_ms
    # the CSV the summary parsed holds the run's final totals (the last second is not lost)
    history = S.read_history(out / "locust_stats_history.csv")
    assert history.users.max() == 8  # the spike: 2 x 4 users
    last_total = int(
        [row.split(",") for row in (out / "locust_stats_history.csv").read_text().splitlines() if ",Aggregated," in row][
            -1
        ][17]
    )
    assert last_total == report.summary.requests
    written = json.loads((out / "summary.json").read_text())
    assert written["requests"] == report.summary.requests and written["passed"] is True
    assert (out / "report.html").stat().st_size > 10_000
    assert (out / "loadtest.png").read_bytes()[:4] == b"\x89PNG"
    # the same measured run fails a latency gate it cannot meet, so CI gating works on real data
    assert S.check(report.summary, S.Thresholds(max_failure_rate=0.0, max_p99_ms=0.001))


# --- the driver's CLI: bad input, its own Redis, the admin token, the plot title ----------------


def _loadtest_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "loadtest", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)  # fmt: skip


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--users", "0"], "--users"),
        (["--duration", "-1"], "--duration"),
        (["--candidates", "0", "--host", "http://127.0.0.1:1"], "--candidates"),
        (["--max-failure-rate", "5", "--host", "http://127.0.0.1:1"], "--max-failure-rate"),
        (["--spawn-rate", "0"], "--spawn-rate"),
        (["--bundle", "/nonexistent/bundle", "--duration", "3"], "--bundle"),
        (["--data", "bogus", "--host", "http://127.0.0.1:1"], "--data"),
        (["--host", "127.0.0.1:8000"], "http://HOST:PORT"),  # no scheme: urllib would poll it for 30 s
        (["--host", "http://127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0"], "--redis-url is for a local run"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(args, flag, tmp_path, capsys):
    """Exit 1 is a broken threshold; input that cannot make a run is exit 2 with one line, before anything starts."""
    from loadtest.run import main

    started = time.monotonic()
    assert main(["run", *args, "--out", str(tmp_path / "out")]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and flag in err, err


def test_bad_input_through_din_loadtest_and_population(tmp_path):
    """The same through the real `din loadtest` entry point, for `run` and `population`."""
    for args in (["--users", "0"], ["population", "--data", "bogus", "--out", str(tmp_path / "pop.json")]):
        result = _loadtest_cli(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_din_loadtest_help_names_the_population_subcommand():
    """`din loadtest --help` shows the run options (run is the default) and the other subcommand."""
    result = _loadtest_cli("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: din loadtest [") and "--duration" in result.stdout
    assert "din loadtest population --data SPEC --out FILE" in result.stdout
    assert "`run` is the default subcommand" in result.stdout


def test_an_explicit_run_is_the_default_subcommand(tmp_path):
    """`din loadtest run ...` is `din loadtest ...` (din inserts `run` only when no subcommand is named)."""
    result = _loadtest_cli("run", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: din loadtest [") and "--duration" in result.stdout
    # the options after an explicit `run` are parsed as run's own: a bad value is the usual one error line
    result = _loadtest_cli("run", "--users", "0", "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == "error: --users must be >= 1, got 0\n"


def test_a_failed_run_leaves_no_result_of_the_previous_run(tmp_path, capsys):
    """A run's files replace the previous run's as a whole: after a run that could not be made,
    summary.json says it failed and why, and no earlier report, plot or CSV is left to be read as its result."""
    from loadtest.run import main

    out = tmp_path / "out"
    write_run(out / "locust")  # a previous, passing run's files
    S.plot(S.read_history(out / "locust_stats_history.csv"), out / "loadtest.png")
    (out / "report.html").write_text("<html>the previous run</html>")
    (out / "summary.json").write_text(json.dumps({"passed": True, "problems": [], "requests": 1000}))
    (out / "population.json").write_text("{}")
    (out / "locust.log").write_text("the previous run\n")

    assert main(["run", "--host", "http://127.0.0.1:1", "--data", "bogus", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--data" in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is False and "--data" in summary["error"]
    assert summary["host"] == "http://127.0.0.1:1" and summary["config"]["data"] == "bogus"
    left = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != ".loadtest.lock")  # the run lock stays
    assert left == ["service.log", "summary.json"], left  # service.log: this run's, empty


LOCAL_RUN = dict(duration_s=8, users=2, spawn_rate=20, user_rps=10, candidates=30)


@pytest.fixture(scope="module")
def local_run_next_to_a_live_redis(tiny_bundle, tmp_path_factory):
    """One local `din loadtest --tags rank events` run, with REDIS_URL naming a Redis that holds
    someone's data and ADMIN_TOKEN unset, as a user's shell after the README's setup would be.

    Yields (the run's exit status, its output dir, the live Redis's keys before, and after)."""
    from feature_store.embedded import EmbeddedRedis, find_redis_server

    log, bundle = tiny_bundle
    root = tmp_path_factory.mktemp("local-run")
    live = EmbeddedRedis(root / "live-redis", binary=find_redis_server(), persist=False)
    live.start()
    try:
        loaded = subprocess.run(
            [str(VENV_BIN / "din"), "load", "--bundle", str(bundle), "--data", f"events:{log}", "--redis-url", live.url],
            capture_output=True, text=True, timeout=300, cwd=root,
        )  # fmt: skip
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        client = redis.Redis.from_url(live.url)

        def snapshot() -> dict:
            return {key: client.dump(key) for key in client.scan_iter(count=1000)}

        before = snapshot()
        env = {k: v for k, v in os.environ.items() if k != "ADMIN_TOKEN"}
        env.update(REDIS_URL=live.url, LOADTEST_EVENTS_WEIGHT="20")  # half the requests are POST /events
        # a shell that protects its services: the locally started one inherits API_KEYS (so /rank needs a key)
        # and REDIS_CLUSTER (which the run's own plain Redis is not)
        env.update(API_KEYS="load-test-key-1,other-key-22", REDIS_CLUSTER="true")
        c = LOCAL_RUN
        run = _loadtest_cli(
            "--bundle", str(bundle), "--data", f"events:{log}", "--tags", "rank", "events",
            "--duration", str(c["duration_s"]), "--users", str(c["users"]), "--spawn-rate", str(c["spawn_rate"]),
            "--user-rps", str(c["user_rps"]), "--candidates", str(c["candidates"]), "--out", str(root / "report"),
            env=env, timeout=400,
        )  # fmt: skip
        yield run, root / "report", before, snapshot()
        client.close()
    finally:
        live.stop(save=False)


@needs_service
def test_local_run_starts_its_own_redis_and_leaves_redis_url_alone(local_run_next_to_a_live_redis):
    """`din load` replaces a Redis's data, so an exported REDIS_URL (a live service's) must not be used."""
    run, out, before, after = local_run_next_to_a_live_redis
    assert run.returncode in (0, 1), run.stderr[-3000:]  # a verdict, so the run was made
    assert before and after == before  # not one key written, replaced or deleted
    assert json.loads((out / "summary.json").read_text())["config"]["redis_url"] is None


@needs_service
def test_local_run_posts_events_without_admin_token_exported(local_run_next_to_a_live_redis):
    """The documented `--tags rank events` passes locally: the service it starts and locust share a token,
    and /rank sends the first of the inherited API_KEYS."""
    run, out, _, _ = local_run_next_to_a_live_redis
    summary = json.loads((out / "summary.json").read_text())
    events = [e for e in summary["endpoints"] if e["name"] == "/events"]
    assert events and events[0]["requests"] > 0, summary
    failures = (out / "locust_failures.csv").read_text()
    assert summary["failures"] == 0 and run.returncode == 0, f"{run.stdout[-2000:]}\nfailures:\n{failures}"


def test_plot_title_says_how_many_users_the_run_reached(monkeypatch):
    """The spike runs LOADTEST_SPIKE_FACTOR x users; a title saying "up to N users" under-reported it."""
    from loadtest.run import plot_title

    monkeypatch.delenv("LOADTEST_SPIKE_FACTOR", raising=False)
    assert plot_title(LoadTestConfig(users=10)) == "POST /rank, 200 candidates, 10 users, spike to 20"
    assert plot_title(LoadTestConfig(users=10, shape="steady", tags=("rank", "events"), candidates=50)) == (
        "POST /rank + /events, 50 candidates, 10 users (steady)"
    )
    monkeypatch.setenv("LOADTEST_SPIKE_FACTOR", "2.5")
    assert plot_title(LoadTestConfig(users=3)).endswith("3 users, spike to 8")  # ceil, as the load shape does


@needs_service
def test_plot_title_matches_the_users_of_a_real_run(local_run_next_to_a_live_redis, monkeypatch):
    """The peak the title names is the one locust's history recorded."""
    from loadtest.run import plot_title

    _, out, _, _ = local_run_next_to_a_live_redis
    monkeypatch.delenv("LOADTEST_SPIKE_FACTOR", raising=False)
    peak = int(S.read_history(out / "locust_stats_history.csv").users.max())
    assert peak == 2 * LOCAL_RUN["users"]
    title = plot_title(LoadTestConfig(tags=("rank", "events"), **LOCAL_RUN))
    assert title == f"POST /rank + /events, {LOCAL_RUN['candidates']} candidates, 2 users, spike to {peak}"


# --- where a run cannot start: the --out path, an unreachable --host, a refused connection --------


def test_an_out_path_that_cannot_be_a_directory_is_one_error_line(tmp_path):
    """`--out report.json` (an existing file) or a path under a file: one `error:` line, exit 2, no traceback."""
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,cate_id,timestamp\n7,100,1,1\n3,100,1,3\n")
    taken = tmp_path / "report.json"
    taken.write_text("someone's file\n")
    cases = [
        (["--out", str(taken), "--host", "http://127.0.0.1:1", "--data", f"events:{events}"], "--out"),
        (["--out", str(taken / "sub"), "--host", "http://127.0.0.1:1", "--data", f"events:{events}"], "--out"),
        (["population", "--data", f"events:{events}", "--out", str(taken / "pop.json")], "population file"),
    ]
    for args, says in cases:
        result = _loadtest_cli(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert says in result.stderr and f"{taken} is a file, not a directory" in result.stderr, result.stderr
    assert taken.read_text() == "someone's file\n"


def test_a_second_run_into_the_same_out_and_an_empty_log_are_one_error_line(tmp_path):
    """Two `make loadtest` at once: the second deleted the first's files, then died with a
    traceback; a header-only CSV (an empty log) was a traceback too."""
    import fcntl

    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,cate_id,timestamp\n7,100,1,1\n3,100,1,3\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("user_id,item_id,cate_id,timestamp\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"passed": true}')  # the running run's
    fd = os.open(out / ".loadtest.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running `din loadtest --out out` holds it
    try:
        running = _loadtest_cli("--out", str(out), "--host", "http://127.0.0.1:1", "--data", f"events:{events}")
    finally:
        os.close(fd)
    cases = [
        (running, "another din loadtest"),
        (_loadtest_cli("population", "--data", f"events:{empty}", "--out", str(tmp_path / "pop.json")), "the behaviour log is empty"),
    ]
    for result, says in cases:
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.startswith("error: ") and says in result.stderr, result.stderr
    assert (out / "summary.json").read_text() == '{"passed": true}'


def test_a_host_that_is_not_ready_says_why(tmp_path):
    """The readiness wait names the last connection error or answer, not only "did not answer 200"."""
    import http.server
    import threading

    from feature_store.embedded import free_port
    from loadtest.run import LoadTestError, wait_ready

    with pytest.raises(LoadTestError, match=r"did not answer 200 within 0.3 s \(last: connection refused\)"):
        wait_ready(f"http://127.0.0.1:{free_port()}", None, timeout_s=0.3)
    with pytest.raises(LoadTestError, match=r"\(last: the host name does not resolve"):
        wait_ready("http://no-such-host.invalid:8000", None, timeout_s=0.3)

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(LoadTestError, match=r"\(last: HTTP 503\)"):
            wait_ready(f"http://127.0.0.1:{server.server_address[1]}", None, timeout_s=0.3)
    finally:
        server.shutdown()
        server.server_close()


def test_a_refused_connection_is_recorded_with_its_cause(tmp_path):
    """locust_failures.csv names the connection error, not an empty `HTTP 0: `."""
    from feature_store.embedded import free_port
    from loadtest.run import run_locust

    config = LoadTestConfig(duration_s=2, users=1, spawn_rate=10, user_rps=5, candidates=5, shape="steady", out_dir=tmp_path)
    run_locust(config, f"http://127.0.0.1:{free_port()}", tmp_path, None)  # nothing listens there
    failures = (tmp_path / "locust_failures.csv").read_text()
    assert "Connection refused" in failures and "HTTP 0: '" not in failures, failures


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_loadtest_targets_host_when_given():
    def din_line(*args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(["make", "-n", "loadtest", *args], capture_output=True, text=True, cwd=ROOT, timeout=30,
                             env={**os.environ, **(env or {})}, check=True).stdout  # fmt: skip
        (line,) = [line for line in out.splitlines() if "din loadtest" in line]
        return line

    assert din_line("HOST=http://10.0.0.5:8000", "LOADTEST_ARGS=--users 3").split()[-5:] == [
        "loadtest", "--host", "http://10.0.0.5:8000", "--users", "3"
    ]  # fmt: skip
    assert "--host" not in din_line()
    assert "--host" not in din_line(env={"HOST": "0.0.0.0"})  # din serve's bind address, not a target


def test_din_loadtest_usage_is_the_command_the_user_typed():
    """A mistyped option is refused with the usage of `din loadtest` (which inserts `run` itself), not `{run,population}`."""
    bogus = _loadtest_cli("--bogus")
    assert bogus.returncode == 2 and "unrecognized arguments: --bogus" in bogus.stderr, bogus.stderr
    assert bogus.stderr.startswith("usage: din loadtest [-h] [--host HOST]") and "{run,population}" not in bogus.stderr
    pop = _loadtest_cli("population", "--out", "x.json", "--bogus")
    assert pop.returncode == 2 and pop.stderr.startswith("usage: din loadtest population [-h]"), pop.stderr
