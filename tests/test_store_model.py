"""A hypothesis state machine: random loads, appends and reads against the real Redis store
and the plain in-memory model (feature_store/memory_store.py); every read must agree."""

from __future__ import annotations

import asyncio

import numpy as np
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from feature_store.events import EventBatch
from feature_store.memory_store import InMemoryHistoryStore
from feature_store.redis_store import RedisHistoryStore
from model.data.log import BehaviourLog

USERS = st.integers(1, 5)
MAX_HISTORY = 4
ID_WINDOW = 6  # small, so the model's id window is exercised too

event = st.tuples(
    USERS,
    st.integers(1, 30),  # item
    st.integers(1, 3),  # category
    st.integers(0, 6),  # timestamp: few values, many ties
    st.sampled_from([f"e{i}" for i in range(12)]),  # event id: repeats on purpose
)


def as_tuples(h) -> list[tuple[int, int, int]] | None:
    if h is None:
        return None
    r = h.records
    return list(zip(r["item_id"].tolist(), r["cate_id"].tolist(), r["timestamp"].tolist()))


class StoreVersusModel(RuleBasedStateMachine):
    url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.real = RedisHistoryStore.from_url(self.url, version_refresh_s=0.0)
        self.model = InMemoryHistoryStore(max_history=MAX_HISTORY, id_window=ID_WINDOW)

    @initialize(rows=st.lists(st.tuples(USERS, st.integers(1, 30), st.integers(1, 3), st.integers(0, 6)), min_size=1, max_size=12))
    def load(self, rows) -> None:
        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()
        cols = np.array(rows, dtype=np.int64).T
        log = BehaviourLog(user_id=cols[0], item_id=cols[1], cate_id=cols[2], timestamp=cols[3], name="random")
        self.real.bulk_load(log, max_history=MAX_HISTORY, id_window=ID_WINDOW)
        self.model.bulk_load(log, max_history=MAX_HISTORY)

    @rule(batch=st.lists(event, min_size=0, max_size=8))
    def append(self, batch) -> None:
        cols = list(zip(*batch)) if batch else [()] * 5
        events = EventBatch.from_columns(*cols)
        got = self.loop.run_until_complete(self.real.append_events(events))
        want = self.loop.run_until_complete(self.model.append_events(events))
        assert (got.applied, got.duplicates, got.users) == (want.applied, want.duplicates, want.users)

    @rule(users=st.lists(st.integers(0, 6), min_size=1, max_size=6))
    def read(self, users) -> None:
        got = self.loop.run_until_complete(self.real.get_histories(users))
        want = self.loop.run_until_complete(self.model.get_histories(users))
        assert [as_tuples(h) for h in got] == [as_tuples(h) for h in want]

    def teardown(self) -> None:
        self.loop.run_until_complete(self.real.close())
        self.loop.close()


def test_redis_store_behaves_like_the_model(redis_url):
    StoreVersusModel.url = redis_url
    run_state_machine_as_test(
        StoreVersusModel,
        settings=settings(
            max_examples=25, stateful_step_count=15, deadline=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
