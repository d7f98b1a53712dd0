"""Locust traffic for the ranking service: the matching stage calling POST /rank.

Run it through `din loadtest` / `make loadtest` (headless, report under reports/loadtest/),
or by hand: `locust -f loadtest/locustfile.py --host http://127.0.0.1:8000` (web UI on 8089).

Traffic model (every knob is an environment variable, defaults in brackets):
- users: Zipf-like over the loaded population, ranked by activity, so a few hot users
  get most requests and a long tail of cold users gets some (LOADTEST_ZIPF_S [1.0]);
  a small share of requests is for users the store has never seen
  (LOADTEST_UNKNOWN_USER_RATE [0.02]);
- candidates: LOADTEST_CANDIDATES [200] distinct ads per request, drawn by popularity
  from the ad catalogue; LOADTEST_TOP_K [0 = rank all];
- pacing: LOADTEST_USER_RPS [0 = back to back] requests per second per locust user;
- the population comes from LOADTEST_POPULATION (a JSON file that
  `din loadtest population` writes from the same data the store was loaded with);
  without it, user ids 1..LOADTEST_USERS and item ids 1..LOADTEST_ITEMS in categories
  1..LOADTEST_CATEGORIES, each defaulting to the default synthetic data's (`--data
  synthetic`, what `make demo` serves: 5000 users, 3000 items, 60 categories), read from
  model.data.synthetic.DEFAULT_SYNTHETIC so the two cannot drift apart. Only the id
  ranges match: items get categories round-robin and Zipf popularity by id, not the
  generator's own, so a population file is the faithful choice.

Every /rank response is checked: the user echoed, every candidate back exactly once with
its category (or exactly top_k of them), CTRs in [0, 1] sorted descending, an unknown
user ranked with an empty history. Anything else is a failure in locust's statistics,
with the reason as the error message. A `degraded` answer (the history store timed out,
the user was ranked without history) is correct but worse: it is counted under its own
name, "/rank [degraded]", so the report shows how many there were and how slow they were;
LOADTEST_DEGRADED_IS_FAILURE=1 makes it a failure instead.

Tasks are tagged: `rank` (POST /rank) and `events` (POST /events, a batch of
LOADTEST_EVENTS_BATCH [10] new behaviours with `Authorization: Bearer $ADMIN_TOKEN`,
weight LOADTEST_EVENTS_WEIGHT [1] against /rank's 20). Pick with `--tags rank events`.

The load shape (RankingLoadShape) uses locust's own -u / -r / -t: it ramps to -u users
over the first 20% of the run, holds, spikes to LOADTEST_SPIKE_FACTOR [2.0] x users from
60% to 75% of the run (at -r users/s), and holds again until -t. LOADTEST_SHAPE=steady
drops the spike. So `-t 6s` runs the whole shape in six seconds.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from locust import FastHttpUser, LoadTestShape, constant, constant_throughput, events, tag, task
from locust.runners import WorkerRunner

POPULATION_FORMAT = 1
RANK_TASK_WEIGHT = 20
DEGRADED_NAME = "/rank [degraded]"


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number") from None


def synthetic_defaults() -> tuple[int, int, int]:
    """(users, items, categories) of the default synthetic data, from the generator itself.

    Imported only when the traffic has no population file: model.data.synthetic needs numpy
    and pyarrow (no torch), which the project's install (and the locust image) has.
    """
    try:
        from model.data.synthetic import DEFAULT_SYNTHETIC
    except ImportError as e:
        raise SystemExit(
            f"without LOADTEST_POPULATION the traffic uses the default synthetic data's id ranges, read from "
            f"model.data.synthetic, which cannot be imported here ({e}); set LOADTEST_POPULATION, or "
            "LOADTEST_USERS, LOADTEST_ITEMS and LOADTEST_CATEGORIES"
        ) from None
    return DEFAULT_SYNTHETIC.users, DEFAULT_SYNTHETIC.items, DEFAULT_SYNTHETIC.categories


@dataclass(frozen=True)
class TrafficConfig:
    """The traffic knobs, read once from the environment (see the module docstring)."""

    population: str | None = None
    # without a population file: ids 1..users, 1..items, categories 1..categories;
    # None: the default synthetic data's (see id_ranges)
    users: int | None = None
    items: int | None = None
    categories: int | None = None
    candidates: int = 200
    top_k: int = 0
    zipf_s: float = 1.0
    unknown_user_rate: float = 0.02
    candidate_pool: int = 512
    events_batch: int = 10
    events_weight: int = 1
    user_rps: float = 0.0
    degraded_is_failure: bool = False
    admin_token: str = ""
    api_key: str = ""  # X-API-Key of POST /rank: $LOADTEST_API_KEY, else the first of $API_KEYS
    seed: int = 0

    @classmethod
    def from_env(cls) -> "TrafficConfig":
        d = cls()
        return cls(
            population=os.environ.get("LOADTEST_POPULATION") or None,
            users=_env_int("LOADTEST_USERS", d.users),
            items=_env_int("LOADTEST_ITEMS", d.items),
            categories=_env_int("LOADTEST_CATEGORIES", d.categories),
            candidates=_env_int("LOADTEST_CANDIDATES", d.candidates),
            top_k=_env_int("LOADTEST_TOP_K", d.top_k),
            zipf_s=_env_float("LOADTEST_ZIPF_S", d.zipf_s),
            unknown_user_rate=_env_float("LOADTEST_UNKNOWN_USER_RATE", d.unknown_user_rate),
            candidate_pool=_env_int("LOADTEST_CANDIDATE_POOL", d.candidate_pool),
            events_batch=_env_int("LOADTEST_EVENTS_BATCH", d.events_batch),
            events_weight=_env_int("LOADTEST_EVENTS_WEIGHT", d.events_weight),
            user_rps=_env_float("LOADTEST_USER_RPS", d.user_rps),
            degraded_is_failure=os.environ.get("LOADTEST_DEGRADED_IS_FAILURE", "0").strip().lower()
            in ("1", "true", "yes"),
            admin_token=os.environ.get("ADMIN_TOKEN", ""),
            api_key=os.environ.get("LOADTEST_API_KEY") or os.environ.get("API_KEYS", "").split(",")[0].strip(),
            seed=_env_int("LOADTEST_SEED", d.seed),
        )

    def id_ranges(self) -> tuple[int, int, int]:
        """(users, items, categories) of the traffic without a population file; an unset one
        is the default synthetic data's (model.data.synthetic.DEFAULT_SYNTHETIC)."""
        given = (self.users, self.items, self.categories)
        if None in given:
            given = tuple(d if g is None else g for g, d in zip(given, synthetic_defaults()))
        return given


@dataclass(frozen=True)
class Population:
    """Known users (most active first) and the ad catalogue (item -> category, popularity)."""

    user_ids: np.ndarray  # int64 [U], most active first
    item_ids: np.ndarray  # int64 [I], distinct
    item_cates: np.ndarray  # int64 [I]
    item_weight: np.ndarray  # float64 [I], popularity (behaviour count)

    @classmethod
    def from_file(cls, path: str | Path) -> "Population":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"LOADTEST_POPULATION={path}: cannot read the population file: {e}") from None
        if raw.get("format") != POPULATION_FORMAT:
            raise SystemExit(
                f"LOADTEST_POPULATION={path}: format {raw.get('format')!r}, expected {POPULATION_FORMAT}; "
                "rewrite it with `python -m loadtest.run population`"
            )
        pop = cls(
            user_ids=np.asarray(raw["users"], dtype=np.int64),
            item_ids=np.asarray(raw["items"], dtype=np.int64),
            item_cates=np.asarray(raw["item_cates"], dtype=np.int64),
            item_weight=np.asarray(raw["item_events"], dtype=np.float64),
        )
        if pop.user_ids.size == 0 or pop.item_ids.size == 0:
            raise SystemExit(f"LOADTEST_POPULATION={path}: no users or no items")
        return pop

    @classmethod
    def from_ranges(cls, users: int, items: int, categories: int) -> "Population":
        """Ids 1..N as the synthetic generator writes them (user, item and category ids start at 1);
        categories assigned round-robin and popularity Zipf by id, not the generator's own."""
        item_ids = np.arange(1, items + 1, dtype=np.int64)
        return cls(
            user_ids=np.arange(1, users + 1, dtype=np.int64),
            item_ids=item_ids,
            item_cates=(item_ids - 1) % categories + 1,
            item_weight=1.0 / np.arange(1, items + 1, dtype=np.float64),
        )


@dataclass(frozen=True)
class CandidateSet:
    body_fragment: bytes  # the JSON array of {"item_id", "cate_id"}, serialised once
    cate_of: dict[int, int]  # item id -> category id, what a complete response must echo


class Traffic:
    """Draws users and candidate sets; cheap per request (bisect + a pooled JSON fragment)."""

    def __init__(self, config: TrafficConfig, population: Population):
        self.config = config
        self.population = population
        # per process, so locust workers do not replay one another's request sequence
        self.rng = random.Random(f"{config.seed}-{os.getpid()}")
        n = population.user_ids.size
        weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** config.zipf_s
        self._user_cdf = np.cumsum(weights / weights.sum()).tolist()
        self._user_cdf[-1] = 1.0
        self._users = population.user_ids.tolist()
        self.first_unknown_user = int(population.user_ids.max()) + 1
        self.pool = self._build_pool()

    def _build_pool(self) -> list[CandidateSet]:
        pop, cfg = self.population, self.config
        k = min(cfg.candidates, pop.item_ids.size)
        np_rng = np.random.default_rng(cfg.seed)
        p = pop.item_weight / pop.item_weight.sum()
        pool = []
        for _ in range(max(1, cfg.candidate_pool)):
            idx = np_rng.choice(pop.item_ids.size, size=k, replace=False, p=p)
            items, cates = pop.item_ids[idx].tolist(), pop.item_cates[idx].tolist()
            fragment = json.dumps(
                [{"item_id": i, "cate_id": c} for i, c in zip(items, cates)], separators=(",", ":")
            ).encode()
            pool.append(CandidateSet(fragment, dict(zip(items, cates))))
        return pool

    def user(self) -> tuple[int, bool]:
        """(user id, known): Zipf over the population by activity rank, or an unseen id."""
        if self.rng.random() < self.config.unknown_user_rate:
            return self.first_unknown_user + self.rng.randrange(1_000_000), False
        r = bisect.bisect_left(self._user_cdf, self.rng.random())
        return self._users[min(r, len(self._users) - 1)], True

    def rank_body(self, user_id: int, candidates: CandidateSet) -> bytes:
        top_k = b',"top_k":%d' % self.config.top_k if self.config.top_k > 0 else b""
        return b'{"user_id":%d,"candidates":%s%s}' % (user_id, candidates.body_fragment, top_k)

    def events_body(self, user_id: int, now: int) -> bytes:
        idx = [self.rng.randrange(self.population.item_ids.size) for _ in range(self.config.events_batch)]
        batch = [
            {
                "user_id": user_id,
                "item_id": int(self.population.item_ids[i]),
                "cate_id": int(self.population.item_cates[i]),
                "timestamp": now,
                "event_id": uuid.uuid4().hex,
            }
            for i in idx
        ]
        return json.dumps({"events": batch}, separators=(",", ":")).encode()


def check_rank_response(
    payload: object, user_id: int, known_user: bool, candidates: CandidateSet, top_k: int, degraded_is_failure: bool
) -> str | None:
    """Why a /rank response is wrong, or None when it is sorted, complete and consistent."""
    if not isinstance(payload, dict):
        return "response is not a JSON object"
    for key in ("model_version", "user_id", "history_length", "degraded", "ranked"):
        if key not in payload:
            return f"response has no {key!r}"
    if payload["user_id"] != user_id:
        return f"user_id {payload['user_id']!r} in the response, {user_id} in the request"
    if not payload["model_version"]:
        return "empty model_version"
    if payload["degraded"] and degraded_is_failure:
        return "degraded response (the history store failed or timed out)"
    if not known_user and payload["history_length"] != 0:
        return f"unknown user {user_id} ranked with history_length {payload['history_length']}"
    ranked = payload["ranked"]
    n = len(candidates.cate_of)
    expected = min(top_k, n) if top_k > 0 else n
    if not isinstance(ranked, list) or len(ranked) != expected:
        return f"{len(ranked) if isinstance(ranked, list) else 'no'} ranked items, expected {expected}"
    seen = set()
    previous = math.inf
    for pos, entry in enumerate(ranked):
        item, ctr = entry.get("item_id"), entry.get("ctr")
        if item not in candidates.cate_of:
            return f"ranked[{pos}] item_id {item!r} was not a candidate"
        if item in seen:
            return f"ranked[{pos}] item_id {item} appears twice"
        seen.add(item)
        if entry.get("cate_id") != candidates.cate_of[item]:
            return f"ranked[{pos}] item {item} has cate_id {entry.get('cate_id')!r}, sent {candidates.cate_of[item]}"
        if not isinstance(ctr, (int, float)) or not 0.0 <= ctr <= 1.0:
            return f"ranked[{pos}] ctr {ctr!r} is not in [0, 1]"
        if ctr > previous:
            return f"not sorted: ranked[{pos}] ctr {ctr} > ranked[{pos - 1}] ctr {previous}"
        previous = ctr
    return None


def http_failure(response) -> str:
    """Why a non-2xx answer failed: its status and body, or, when nothing came back (locust's
    status 0), the connection error itself (refused, reset, timed out, a name that does not resolve)."""
    error = getattr(response, "error", None)
    status = response.status_code
    if not status:
        what = f"{type(error).__name__}: {error}" if error is not None and str(error) else repr(error)
        return f"no HTTP response: {what}"[:300]
    body = (response.text or "")[:200]
    if not body and error is not None:
        body = f"{type(error).__name__}: {error}"[:200]
    return f"HTTP {status}: {body}"


_traffic: Traffic | None = None


def traffic() -> Traffic:
    """Built once per process (the pool costs ~0.1 s), on first use."""
    global _traffic
    if _traffic is None:
        cfg = TrafficConfig.from_env()
        pop = (
            Population.from_file(cfg.population)
            if cfg.population
            else Population.from_ranges(*cfg.id_ranges())
        )
        _traffic = Traffic(cfg, pop)
    return _traffic


def _wait_time():
    rps = TrafficConfig.from_env().user_rps
    return constant_throughput(rps) if rps > 0 else constant(0)


class MatchingStage(FastHttpUser):
    """One caller of the ranking service, as the matching stage of an ad system would be."""

    wait_time = _wait_time()
    json_headers = {"content-type": "application/json"}

    @staticmethod
    @functools.cache
    def rank_headers(config: TrafficConfig) -> dict[str, str]:
        """With API_KEYS set on the service, /rank needs a key (the service would answer 401)."""
        return {"content-type": "application/json", **({"x-api-key": config.api_key} if config.api_key else {})}

    @tag("rank")
    @task(RANK_TASK_WEIGHT)
    def rank(self) -> None:
        t = traffic()
        user_id, known = t.user()
        candidates = t.pool[t.rng.randrange(len(t.pool))]
        with self.client.post(
            "/rank", data=t.rank_body(user_id, candidates), headers=self.rank_headers(t.config),
            name="/rank", catch_response=True,
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(http_failure(response))
                return
            try:
                payload = response.json()
            except ValueError:
                response.failure("response is not JSON")
                return
            problem = check_rank_response(
                payload, user_id, known, candidates, t.config.top_k, t.config.degraded_is_failure
            )
            if problem:
                response.failure(problem)
            elif payload["degraded"]:
                response.request_meta["name"] = DEGRADED_NAME

    @tag("events")
    @task(max(1, TrafficConfig.from_env().events_weight))
    def post_events(self) -> None:
        t = traffic()
        user_id, _ = t.user()
        headers = dict(self.json_headers)
        if t.config.admin_token:
            headers["authorization"] = f"Bearer {t.config.admin_token}"
        with self.client.post(
            "/events", data=t.events_body(user_id, int(time.time())), headers=headers,
            name="/events", catch_response=True,
        ) as response:  # fmt: skip
            if not 200 <= response.status_code < 300:
                response.failure(http_failure(response))


class RankingLoadShape(LoadTestShape):
    """Ramp (0-20% of -t), steady, spike (60-75%: LOADTEST_SPIKE_FACTOR x -u), steady to -t."""

    use_common_options = True
    ramp_end, spike_start, spike_end = 0.20, 0.60, 0.75

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        users = int(getattr(options, "num_users", None) or 10)
        spawn_rate = float(getattr(options, "spawn_rate", None) or users)
        total = float(getattr(options, "run_time", None) or _env_float("LOADTEST_DURATION_S", 300.0))
        spike = os.environ.get("LOADTEST_SHAPE", "spike").strip().lower() != "steady"
        factor = _env_float("LOADTEST_SPIKE_FACTOR", 2.0)
        t = self.get_run_time() / total
        if t >= 1.0:
            return None
        if t < self.ramp_end:
            return users, max(users / (self.ramp_end * total), 1.0)
        if spike and self.spike_start <= t < self.spike_end:
            return max(users, math.ceil(users * factor)), max(spawn_rate, 1.0)
        return users, max(spawn_rate, 1.0)


@events.test_stop.add_listener
def _final_csv_tick(environment, **_kwargs) -> None:
    """Let locust's CSV writer (a 1 s loop) record the final totals before the process exits.

    Without this the last second of a headless run is missing from `*_stats.csv`, which the
    summary reads; a 6 s test would lose a sixth of its requests.
    """
    options = environment.parsed_options
    writes_csv = options is not None and getattr(options, "csv_prefix", None)
    if writes_csv and not isinstance(environment.runner, WorkerRunner):
        time.sleep(1.2)
