"""GET /metrics, request ids, structured JSON logs, and the last-resort 500, through the real app."""

from __future__ import annotations

import io
import logging
import re

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.structured_logging import configure_logging
from test_api import loaded_redis, rank_body, serving, settings_for, some_candidates, trained  # noqa: F401  (fixtures)

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def log_lines():
    """JSON logs of the test, captured as parsed lines; the root logger is restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    try:
        yield lambda: [orjson.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_metrics_count_exactly_what_was_served(trained, loaded_redis):
    user = int(trained.log.user_id[0])
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
        for n in (5, 7, 9):
            assert (await client.post("/rank", json=rank_body(user, some_candidates(trained.log, n)))).status_code == 200
        assert (await client.post("/rank", json={"user_id": "x"})).status_code == 422
        assert (await client.get("/no/such/route/4711")).status_code == 404
        r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    dur = "din_http_request_duration_seconds_count"
    assert value(m, dur, route="/rank", method="POST", status="200") == 3
    assert value(m, dur, route="/rank", method="POST", status="422") == 1
    assert value(m, dur, route="unmatched", method="GET", status="404") == 1  # never the raw path
    assert "/no/such/route/4711" not in r.text
    assert value(m, "din_rank_candidates_count") == 3 and value(m, "din_rank_candidates_sum") == 21
    assert value(m, "din_rank_candidates_bucket", le="5.0") == 0 and value(m, "din_rank_candidates_bucket", le="10.0") == 3
    assert value(m, "din_scoring_batch_requests_sum") == 3 and value(m, "din_scoring_batch_candidates_sum") == 21
    assert value(m, "din_store_request_duration_seconds_count", op="get_histories") == 3
    assert value(m, "din_degraded_responses_total", reason="unavailable") == 0
    assert value(m, "din_model_info", version=trained.bundle.model_version, type="din") == 1
    assert value(m, "din_model_load_duration_seconds") > 0
    assert value(m, "din_store_circuit_state") == 0 and value(m, "din_scoring_queue_depth") == 0
    assert value(m, "din_http_requests_in_flight") == 1  # the /metrics request itself
    assert value(m, "process_resident_memory_bytes") > 0


async def test_two_apps_in_one_process_keep_separate_metrics(trained):
    settings = settings_for(trained.bundle.path, None)
    async with serving(settings) as a, serving(settings) as b:
        await a.post("/rank", json=rank_body(1, some_candidates(trained.log, 4)))
        ma, mb = samples((await a.get("/metrics")).text), samples((await b.get("/metrics")).text)
    assert value(ma, "din_rank_candidates_sum") == 4 and value(mb, "din_rank_candidates_sum") == 0
    assert value(ma, "din_degraded_responses_total", reason="no_store") == 1


async def test_request_id_is_honoured_echoed_or_generated(trained):
    async with serving(settings_for(trained.bundle.path, None)) as client:
        given = await client.get("/healthz", headers={"X-Request-ID": "lb-7f3a:42"})
        fresh = [await client.get("/healthz") for _ in range(2)]
        forged = await client.get("/healthz", headers={"X-Request-ID": "x\tlevel=error msg=forged"})
        too_long = await client.get("/healthz", headers={"X-Request-ID": "a" * 129})
    assert given.headers["x-request-id"] == "lb-7f3a:42"
    ids = [r.headers["x-request-id"] for r in fresh]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    for r in (forged, too_long):
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])  # replaced, not echoed


async def test_json_logs_carry_the_request_id(trained, log_lines):
    async with serving(settings_for(trained.bundle.path, "redis://127.0.0.1:1/0")) as client:  # closed port
        r = await client.post("/rank", json=rank_body(1, some_candidates(trained.log, 4)), headers={"X-Request-ID": "req-42"})
    assert r.json()["degraded"] is True
    lines = log_lines()
    access = [x for x in lines if x["logger"] == "din.access"]
    assert len(access) == 1
    (a,) = access
    assert a["request_id"] == "req-42" and a["route"] == "/rank" and a["status"] == 200 and a["level"] == "info"
    assert a["msg"] == "POST /rank 200" and a["duration_ms"] > 0
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
    startup = [x for x in lines if x["msg"].startswith("ready: model")]
    assert len(startup) == 1 and "request_id" not in startup[0]  # outside any request


async def test_an_unhandled_error_is_a_generic_500_with_the_request_id(trained, log_lines):
    app = create_app(settings_for(trained.bundle.path, None))

    @app.get("/boom")
    async def boom():  # a bug in a route, with a secret and a server path in its message
        raise RuntimeError("password=hunter2 in /work/secret/config.py")

    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            r = await client.get("/boom", headers={"X-Request-ID": "bug-1"})
            m = samples((await client.get("/metrics")).text)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == "bug-1"
    assert r.json() == {"detail": "internal server error; quote the request id when reporting it", "request_id": "bug-1"}
    for leak in ("hunter2", "/work", "Traceback", "RuntimeError"):
        assert leak not in r.text
    assert value(m, "din_http_request_duration_seconds_count", route="/boom", method="GET", status="500") == 1
    (err,) = [x for x in log_lines() if x["level"] == "error"]
    assert err["request_id"] == "bug-1" and "RuntimeError: password=hunter2" in err["exc"]  # the log has it all


async def test_readyz_reports_model_store_and_circuit(trained, loaded_redis):
    async with serving(settings_for(trained.bundle.path, loaded_redis)) as client:
        r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json() | {"providers": None} == {
        "ready": True, "model": "ok", "store": "ok", "degraded": False, "store_url": loaded_redis,
        "store_circuit": "closed", "model_version": trained.bundle.model_version, "providers": None,
        "store_data": "loaded",
    }


async def test_corrupt_values_and_events_are_counted_in_metrics(trained, loaded_redis):
    """din_store_corrupt_values_total{kind} and din_events_total{outcome}, as the README names them."""
    import redis

    from feature_store.keys import KeySpace, current_key

    token = "s3cret-token"
    auth = {"Authorization": f"Bearer {token}"}
    user = int(trained.log.user_id[0])
    c = redis.Redis.from_url(loaded_redis)
    keys = KeySpace(version=c.get(current_key()).decode())
    c.set(keys.user(user), b"DINU\x01\x00\x00\x00garbage")  # a corrupt stored value
    one = {"events": [{"user_id": 5, "item_id": 1, "cate_id": 1, "timestamp": 1, "event_id": "a"}]}
    async with serving(settings_for(trained.bundle.path, loaded_redis, admin_token=token)) as client:
        m0 = samples((await client.get("/metrics")).text)
        ranked = await client.post("/rank", json=rank_body(user, some_candidates(trained.log, 3)))
        assert (await client.post("/events", json=one, headers=auth)).status_code == 200
        assert (await client.post("/events", json=one, headers=auth)).status_code == 200  # a retry: duplicate
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", 1)  # Redis refuses writes
        try:
            two = {"events": [dict(one["events"][0], event_id=e) for e in ("b", "c")]}
            assert (await client.post("/events", json=two, headers=auth)).status_code == 503
        finally:
            c.config_set("maxmemory", 0)
            c.close()
        m = samples((await client.get("/metrics")).text)
    assert ranked.json()["history_length"] == 0  # served as unknown
    # process-wide (other tests' stores count too): the change is what this test did
    corrupt = "din_store_corrupt_values_total"
    assert value(m, corrupt, kind="user") - value(m0, corrupt, kind="user") == 1
    assert ("din_events_total", (("outcome", "refused"),)) in m0  # every outcome exported from the start, at 0
    assert [value(m, "din_events_total", outcome=o) for o in ("stored", "duplicate", "refused")] == [1, 1, 2]


async def test_a_request_path_cannot_forge_lines_in_a_text_log(trained):
    """ASGI hands the path over percent-decoded: `%0A` would be a real newline in the access line."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buf = io.StringIO()
    configure_logging("info", "text", stream=buf)
    try:
        async with serving(settings_for(trained.bundle.path, None)) as client:
            r = await client.get("/nothing%0A2099-01-01 00:00:00,000 INFO din.access forged%0D")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert r.status_code == 404
    lines = buf.getvalue().splitlines()
    assert not any(line.startswith("2099-01-01") for line in lines), lines
    (access,) = [line for line in lines if "GET /nothing" in line]
    assert "/nothing\\x0a2099-01-01 00:00:00,000 INFO din.access forged\\x0d 404" in access


async def test_routes_that_are_not_api_routes_keep_their_own_label(trained):
    """/docs, /openapi.json and the page's static files are labelled by their path (a mount by
    its prefix), not `unmatched`, which is the 404s' label."""
    async with serving(settings_for(trained.bundle.path, None)) as client:
        for path in ("/docs", "/openapi.json", "/static/app.js", "/no-such-page"):
            await client.get(path)
        m = samples((await client.get("/metrics")).text)
    count = lambda route, status: value(m, "din_http_request_duration_seconds_count", route=route, method="GET", status=status)  # noqa: E731
    assert count("/docs", "200") == count("/openapi.json", "200") == count("/static", "200") == 1
    assert count("unmatched", "404") == 1 and count("unmatched", "200") == 0


# A JSON `\ud800` escape is a lone UTF-16 surrogate: pydantic rejects it (string_unicode), and
# the 422 must name the field without echoing it (it cannot be encoded: that was a 500).
SURROGATE_BODIES = [
    pytest.param("/events", rb'{"events":[{"\ud800":1}]}', ["body", "events", 0], id="events-key"),
    pytest.param("/events", rb'{"events":[{"user_id":1,"item_id":2,"cate_id":3,"timestamp":4,"event_id":"\ud800"}]}',
                 ["body", "events", 0, "event_id"], id="events-event_id"),
    pytest.param("/events",
                 rb'{"events":[{"user_id":"\udfff","item_id":2,"cate_id":3,"timestamp":4,"event_id":"x"}]}',
                 ["body", "events", 0, "user_id"], id="events-user_id"),
    pytest.param("/admin/reload", rb'{"bundle":"\ud800"}', ["body", "bundle"], id="reload-bundle"),
]


@pytest.mark.parametrize("path,body,loc", SURROGATE_BODIES)
async def test_a_lone_surrogate_in_a_validated_body_is_a_422_naming_the_field(trained, loaded_redis, path, body, loc):
    token = "s3cret-token"
    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
    async with serving(settings_for(trained.bundle.path, loaded_redis, admin_token=token)) as client:
        r = await client.post(path, content=body, headers=headers)
        ok = await client.post("/events", json={"events": []}, headers=headers)  # an ordinary 422 keeps its shape
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail and all({"loc", "msg", "type"} <= set(e) and "input" not in e for e in detail), detail
    assert any(e["loc"][: len(loc)] == loc for e in detail), detail
    assert ok.status_code == 422
    (err,) = ok.json()["detail"]
    assert err["loc"] == ["body", "events"] and err["type"] == "too_short" and err["ctx"]["min_length"] == 1


@pytest.mark.parametrize("pointer", [b"\xff\xfe", b"a:b"], ids=["not-utf8", "not-a-version"])
async def test_readyz_reports_an_unusable_data_version_pointer_as_an_error_not_unreachable(
    trained, redis_client, redis_url, pointer
):
    from feature_store.keys import current_key

    redis_client.set(current_key("din"), pointer)  # Redis answers; its pointer is garbage
    async with serving(settings_for(trained.bundle.path, redis_url)) as client:
        r = await client.get("/readyz")
    body = r.json()
    assert r.status_code == 200 and body["ready"] is True, body
    assert body["store"].startswith("error: ") and "unreachable" not in body["store"], body
    assert "din:current" in body["store"] and "run `din load`" in body["store"], body  # the store's own message
    assert body["degraded"] is True and body["store_data"] is None
