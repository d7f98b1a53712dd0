"""Who may call what, how much they may send, and what error bodies never show."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio.connection import SSLConnection

from feature_store.redis_store import RedisHistoryStore
from service.structured_logging import configure_logging
from test_api import (  # noqa: F401  (fixtures)
    loaded_redis,
    rank_body,
    serving,
    settings_for,
    some_candidates,
    trained,
)

pytestmark = pytest.mark.anyio

TOKEN = "admin-token-0123456789"
KEYS = "rank-key-aaaaaaaa,rank-key-bbbbbbbb"


async def test_admin_route_is_disabled_without_a_configured_token(trained):
    async with serving(settings_for(trained.bundle.path, None)) as client:
        for headers in ({}, {"Authorization": "Bearer anything-at-all"}):
            r = await client.post("/admin/reload", headers=headers)
            assert r.status_code == 403 and "no ADMIN_TOKEN configured" in r.json()["detail"]


@pytest.mark.parametrize(
    "headers, status, says",
    [
        ({}, 401, "missing bearer token"),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, 401, "missing bearer token"),
        ({"Authorization": "Bearer admin-token-0123456788"}, 403, "wrong bearer token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, 403, "wrong bearer token"),
        ({"Authorization": f"Bearer {TOKEN}"}, 200, None),
    ],
    ids=["none", "basic", "wrong", "longer", "right"],
)
async def test_admin_route_needs_the_bearer_token(trained, headers, status, says):
    async with serving(settings_for(trained.bundle.path, None, admin_token=TOKEN)) as client:
        r = await client.post("/admin/reload", headers=headers)
    assert r.status_code == status, r.text
    if says:
        assert says in r.json()["detail"]
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
    else:
        assert r.json()["model_version"] == trained.bundle.model_version and r.json()["changed"] is False


@pytest.mark.parametrize(
    "headers, status",
    [({}, 401), ({"X-API-Key": "rank-key-cccccccc"}, 403), ({"X-API-Key": ""}, 401),
     ({"X-API-Key": "rank-key-aaaaaaaa"}, 200), ({"X-API-Key": "rank-key-bbbbbbbb"}, 200)],
    ids=["none", "wrong", "empty", "first", "second"],
)
async def test_rank_needs_an_api_key_when_keys_are_configured(trained, headers, status):
    body = rank_body(1, some_candidates(trained.log, 4))
    async with serving(settings_for(trained.bundle.path, None, api_keys=KEYS)) as client:
        r = await client.post("/rank", json=body, headers=headers)
        sample = (await client.get("/api/sample?n=2", headers=headers)).status_code
        open_routes = [(await client.get(p)).status_code for p in ("/healthz", "/readyz", "/metrics")]
    assert r.status_code == status, r.text
    assert sample == (status if status in (401, 403) else 503)  # the population needs a key too (503: no store here)
    if status == 401:
        assert r.json() == {"detail": "missing API key (header X-API-Key)"}
    if status == 403:
        assert r.json() == {"detail": "unknown API key"}
    assert open_routes == [200, 200, 200]


async def test_rank_is_open_without_api_keys(trained):
    async with serving(settings_for(trained.bundle.path, None)) as client:
        r = await client.post("/rank", json=rank_body(1, some_candidates(trained.log, 4)))
    assert r.status_code == 200


# ---------------------------------------------------------------------------------------
LIMIT = 2048


async def chunks(total: int, size: int = 256) -> AsyncIterator[bytes]:
    """A JSON-ish body streamed in chunks; httpx sends it chunked, without Content-Length."""
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        yield b" " * piece
        sent += piece


async def test_chunked_upload_over_the_limit_is_413_without_content_length(trained):
    async with serving(settings_for(trained.bundle.path, None, max_body_bytes=LIMIT)) as client:
        r = await client.post("/rank", content=chunks(LIMIT * 4), headers={"content-type": "application/json"})
        ok = await client.post(
            "/rank", content=_chunked_json(rank_body(1, some_candidates(trained.log, 8))),
            headers={"content-type": "application/json"},
        )
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413
    assert r.json() == {"detail": f"request body is larger than MAX_BODY_BYTES={LIMIT} bytes"}
    assert ok.status_code == 200 and len(ok.json()["ranked"]) == 8  # a chunked body under the limit is fine


async def _chunked_json(body: dict) -> AsyncIterator[bytes]:
    import orjson

    raw = orjson.dumps(body)
    for i in range(0, len(raw), 100):
        yield raw[i : i + 100]


async def test_declared_content_length_over_the_limit_is_413(trained):
    body = rank_body(1, some_candidates(trained.log, 40))
    limit = 1024
    async with serving(settings_for(trained.bundle.path, None, max_body_bytes=limit, admin_token=TOKEN)) as client:
        r = await client.post("/rank", json=body)
        admin = await client.post(
            "/admin/reload", json={"bundle": "x" * limit}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert int(r.request.headers["content-length"]) > limit
    assert r.status_code == 413 and r.json() == {"detail": "request body is larger than MAX_BODY_BYTES=1024 bytes"}
    assert admin.status_code == 413 and "MAX_BODY_BYTES=1024" in admin.json()["detail"]  # FastAPI-parsed bodies too


async def _stalled(first: bytes, rest: bytes, stall_s: float) -> AsyncIterator[bytes]:
    import anyio

    yield first
    await anyio.sleep(stall_s)
    yield rest


async def test_a_body_that_stalls_past_the_read_deadline_is_408(trained):
    """A slow-loris body used to hold the request (and its connection) as long as the client
    liked; now it has BODY_READ_TIMEOUT_S, on routes that read the body by hand (/rank) and on
    those FastAPI parses (/admin/reload) alike."""
    import orjson

    rank = orjson.dumps(rank_body(1, some_candidates(trained.log, 4)))
    reload = orjson.dumps({"bundle": "/nowhere"})
    auth = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    settings = settings_for(trained.bundle.path, None, admin_token=TOKEN, body_read_timeout_s=0.2)
    async with serving(settings) as client:
        r = await client.post("/rank", content=_stalled(rank[:10], rank[10:], 2.0), headers=auth)
        admin = await client.post("/admin/reload", content=_stalled(reload[:5], reload[5:], 2.0), headers=auth)
        ok = await client.post("/rank", content=_stalled(rank[:10], rank[10:], 0.05), headers=auth)
    detail = {"detail": "request body not received within BODY_READ_TIMEOUT_S=0.2 seconds"}
    assert (r.status_code, r.json(), r.headers.get("connection")) == (408, detail, "close")
    assert (admin.status_code, admin.json()) == (408, detail)
    assert ok.status_code == 200 and len(ok.json()["ranked"]) == 4  # in pieces within the deadline: served


async def test_error_bodies_show_no_traceback_or_server_path(trained, tmp_path):
    async with serving(settings_for(trained.bundle.path, None, admin_token=TOKEN)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answers = [
            await client.post("/admin/reload", json={"bundle": "nope\x00"}, headers=auth),
            await client.post("/admin/reload", json={"bundle": 5}, headers=auth),
            await client.post("/admin/reload", content=b"{", headers=auth | {"content-type": "application/json"}),
            await client.post("/rank", content=b"\xff\xfe", headers={"content-type": "application/json"}),
            await client.get("/rank"),
        ]
    assert [r.status_code for r in answers] == [422, 422, 422, 422, 405]  # a NUL in the path: refused as the field's
    for r in answers:
        assert "Traceback" not in r.text and str(trained.bundle.path.parent) not in r.text and "site-packages" not in r.text


# ---------------------------------------------------------------------------------------
@pytest.fixture
def password_redis(loaded_redis: str):
    """The tests' redis-server, with `requirepass` set for the test (unset after)."""
    password = "s3cret-p4ss"
    client = redis.Redis.from_url(loaded_redis)
    client.config_set("requirepass", password)
    try:
        yield loaded_redis, password
    finally:
        authed = redis.Redis.from_url(loaded_redis, password=password)
        authed.config_set("requirepass", "")
        authed.close()
        client.close()


async def test_password_in_the_url_works_and_is_never_shown(trained, password_redis):
    url, password = password_redis
    with_pw = url.replace("redis://", f"redis://:{password}@")
    wrong_pw = url.replace("redis://", "redis://:not-the-password@")
    user = int(trained.log.user_id[0])
    buf = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("info", "json", stream=buf)
    try:
        async with serving(settings_for(trained.bundle.path, with_pw)) as client:
            good = await client.post("/rank", json=rank_body(user, some_candidates(trained.log, 5)))
            ready = await client.get("/readyz")
        async with serving(settings_for(trained.bundle.path, wrong_pw)) as client:
            bad = await client.post("/rank", json=rank_body(user, some_candidates(trained.log, 5)))
            bad_ready = await client.get("/readyz")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert good.json()["degraded"] is False and good.json()["history_length"] > 0
    assert ready.json()["store"] == "ok" and ready.json()["store_url"] == url.replace("redis://", "redis://:***@")
    assert bad.status_code == 200 and bad.json()["degraded"] is True
    assert bad_ready.json()["store"] != "ok"
    for text in (ready.text, bad_ready.text, buf.getvalue()):
        assert password not in text and "not-the-password" not in text
    assert "redis://:***@" in buf.getvalue()  # the store's URL is logged, redacted


def test_rediss_urls_use_tls_connections():
    store = RedisHistoryStore.from_url("rediss://:pw-secret@cache.example:6380/0")
    pool = store._redis.connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["password"] == "pw-secret" and pool.connection_kwargs["port"] == 6380
    assert store.url == "rediss://:***@cache.example:6380/0"


@pytest.mark.parametrize(
    "url,shown",
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://app:s3/cr:et@cache:6379/0", "redis://app:***@cache:6379/0"),  # '/' and ':' in the password
        ("redis://cache:6379/0?%70assword=s3cret&db=1", "redis://cache:6379/0?%70assword=***&db=1"),  # redis-py decodes the name
        ("rediss://:s3cret@[::1]:6380/0", "rediss://:***@[::1]:6380/0"),  # IPv6 brackets kept
        ("unix:///run/redis.sock?password=s3cret", "unix:///run/redis.sock?password=***"),
        ("redis://cache:6379/0?client_name=ranker", "redis://cache:6379/0?client_name=ranker"),  # nothing to hide
    ],
)
def test_redis_urls_are_shown_without_their_password(url, shown):
    from feature_store.connection import redacted_url

    assert redacted_url(url) == shown


async def test_a_reload_path_with_control_characters_is_refused_before_it_reaches_a_log(trained, caplog):
    """A newline in the bundle path would write a forged line into a text log (the refusal is
    logged with the path); no real path holds one, so the request is a 422 naming the field."""
    forged = "/x\n2026-11-29 05:00:00 ERROR service.app forged line"
    async with serving(settings_for(trained.bundle.path, None, admin_token=TOKEN)) as client:
        with caplog.at_level("INFO"):
            r = await client.post("/admin/reload", json={"bundle": forged}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "bundle"]
    assert "forged line" not in r.text and not any("forged line" in rec.getMessage() for rec in caplog.records)
