"""The service's own Redis connection pool running out is congestion, not a Redis outage.

Real parts: the tests' redis-server (and 3-node cluster), the real store and StoreGuard.
A pool of one connection stands for a burst of /rank requests larger than STORE_MAX_CONNECTIONS.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from feature_store.redis_store import RedisHistoryStore
from service.metrics import ServiceMetrics
from service.store_guard import StoreCallFailed, StoreGuard
from test_observability import samples, value

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("where", ["standalone", "cluster"])
async def test_calls_past_the_pool_size_queue_for_a_connection_instead_of_failing(where, request, tmp_log):
    """redis-py raises MaxConnectionsError (a ConnectionError) at once when the pool is used up; counted
    as an outage, 40 concurrent reads on a pool of one opened the breaker while Redis was healthy."""
    url = request.getfixturevalue("redis_url" if where == "standalone" else "redis_cluster_url")
    RedisHistoryStore.from_url(url).bulk_load(tmp_log, max_history=4)
    store = RedisHistoryStore.from_url(url, max_connections=1)
    guard = StoreGuard.build(failure_threshold=1, reset_s=60.0, timeout_s=5.0, metrics=ServiceMetrics())
    try:
        ads = [guard.call("get_ad_features", lambda: store.get_ad_features(np.array([101, 404]))) for _ in range(30)]
        reads = [guard.call("get_histories", lambda: store.get_histories([1, 2, 3])) for _ in range(10)]
        out = await asyncio.gather(*ads, *reads, return_exceptions=True)
    finally:
        await store.close()
    errors = [f"{e.reason}: {e}" for e in out if isinstance(e, StoreCallFailed)]
    assert errors == [] and guard.state.value == "closed"
    assert all(a.found.tolist() == [True, False] for a in out[:30])
    assert all([len(h) for h in hs] == [4, 2, 1] for hs in out[30:])  # every history read got its histories


async def test_a_deadline_spent_waiting_for_a_connection_is_busy_and_not_counted_by_the_breaker(redis_url):
    """The one connection is held by a call Redis does not answer yet (CLIENT PAUSE): the next call
    waits for it past its deadline. That is 'busy' (Redis was not asked), not a timeout of Redis."""
    store = RedisHistoryStore.from_url(redis_url, max_connections=1, socket_timeout=5.0)
    guard = StoreGuard.build(failure_threshold=1, reset_s=60.0, timeout_s=0.05, metrics=ServiceMetrics())
    admin = redis.Redis.from_url(redis_url)
    try:
        await store.ping()  # connected, version read
        admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
        holder = asyncio.ensure_future(store.ping())  # holds the connection until the pause ends
        await asyncio.sleep(0.02)
        with pytest.raises(StoreCallFailed) as e:
            await guard.call("get_ad_features", lambda: store.get_ad_features(np.array([1, 2])))
        busy_state = guard.state.value
        await holder
        after = await guard.call("get_ad_features", lambda: store.get_ad_features(np.array([1, 2])))
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
        await store.close()
    assert e.value.reason == "busy" and "no free Redis connection" in str(e.value)
    assert busy_state == "closed" and guard.breaker.consecutive_failures == 0
    assert after.found.tolist() == [False, False]
    m = samples(guard.metrics.render().decode())
    assert value(m, "din_store_errors_total", op="get_ad_features", reason="busy") == 1
    assert value(m, "din_store_errors_total", op="get_ad_features", reason="timeout") == 0
