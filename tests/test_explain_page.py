"""The explain page in a real headless Chromium, against a live service the test starts.

Real parts only: a tiny behaviour log -> `din train` (DIN, and BaseModel for the
no-attention case) -> `din load` into a redis-server this module starts -> `din serve`
under uvicorn on a free port -> Chromium (Debian's `chromium`, driven by Playwright with
the system executable; `playwright install` is never needed) loads `GET /` and ranks.

The DOM is checked against two independent sources: the behaviour log the test wrote
(how many behaviours, their order and categories, which cells are a category match) and
the same request sent to the API directly (the order, the CTRs, every attention weight).

Skips, with the reason, only where no browser can be had. A screenshot is saved under
reports/screenshots/ (gitignored) as the test's artifact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from feature_store.embedded import EmbeddedRedis, free_port
from model.data.log import BehaviourLog, write_log

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "reports" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root in a container
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MAX_CANDIDATES = 10  # the served limit (MAX_CANDIDATES setting), small so a 4xx is easy to provoke
BIG = 2**53 + 1  # item ids above 2**53: a JS number cannot hold them, the page must keep them exact
STARTUP_S = 120.0
API_KEY = "explain-page-key-1"  # the keyed service's one key (API_KEYS needs 8+ characters)


# ---------------------------------------------------------------------------------------
# The world: a log with planted interests, small enough to train in seconds.
def _make_log() -> BehaviourLog:
    """60 users with two interest categories each; 8..20 behaviours, unique timestamps.

    Items of category c are c*100 + k; category 1's items are BIG + k instead, so ids above
    2**53 go through the whole path (log, Redis, ONNX, JSON, the page) and back.
    """
    rng = np.random.default_rng(7)
    rows = []
    for u in range(60):
        user = 10**12 + u  # above 2**32
        interests = (u % 6 + 1, (u + 2) % 6 + 1)
        for j in range(int(rng.integers(8, 21))):
            cate = int(rng.choice(interests)) if rng.random() < 0.8 else int(rng.integers(1, 7))
            rows.append((user, _item(cate, int(rng.integers(0, 10))), cate, 1_700_000_000 + u * 100_000 + j * 60))
    cols = np.array(rows, dtype=np.int64).T
    return BehaviourLog(user_id=cols[0], item_id=cols[1], cate_id=cols[2], timestamp=cols[3], name="explain")


def _item(cate: int, k: int) -> int:
    return BIG + k if cate == 1 else cate * 100 + k


@dataclass(frozen=True)
class Behaviour:
    item_id: int
    cate_id: int


def _history(log: BehaviourLog, user: int) -> list[Behaviour]:
    """The user's behaviours newest first: what the heatmap's columns must be."""
    mine = log.user_id == user
    order = np.argsort(-log.timestamp[mine], kind="stable")
    return [Behaviour(int(i), int(c)) for i, c in zip(log.item_id[mine][order], log.cate_id[mine][order])]


@dataclass
class Service:
    base_url: str
    bundle: Path
    model_version: str
    log: BehaviourLog
    redis_url: str


def _din() -> str:
    exe = Path(sys.executable).with_name("din")
    found = str(exe) if exe.is_file() else shutil.which("din")
    assert found, "the `din` console script is not installed: run `pip install -e .` (make install)"
    return found


def _run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run([_din(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"din {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}", pytrace=False)
    return proc.stdout


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        DIN_HOME=str(tmp / "din_home"),
        MAX_CANDIDATES=str(MAX_CANDIDATES),
        STORE_TIMEOUT_MS="10000",  # a slow CI box must not turn a history read into "degraded"
        STORE_READ_TIMEOUT_MS="10000",
        STORE_CONNECT_TIMEOUT_MS="10000",
        DEVICE="cpu",
        INTRA_OP_THREADS="1",
    )
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BehaviourLog, str]:
    """A work directory, the log, and its `--data` spec."""
    tmp = tmp_path_factory.mktemp("explain")
    log = _make_log()
    return tmp, log, f"events:{write_log(log, tmp / 'events.parquet')}"


def _serve(world: tuple[Path, BehaviourLog, str], model: str) -> Iterator[Service]:
    """Train `model` on the log, load the histories into a redis-server of its own (other
    tests flush the shared one), serve; stop both at the end."""
    tmp, log, data = world
    env = _env(tmp)
    out = json.loads(_run(["train", "--data", data, "--model", model, "--epochs", "1", "--seed", "0",
                           "--out", str(tmp / "bundles" / model), "--json"], env, tmp))
    bundle = Path(out["bundle"])
    manifest = json.loads((bundle / "bundle.json").read_text())
    with EmbeddedRedis(tmp / f"redis-{model}", persist=False) as redis:
        _run(["load", "--bundle", str(bundle), "--data", data, "--redis-url", redis.url], env, tmp)
        yield from _run_service(tmp, log, bundle, manifest["model_version"], model, redis.url, env)


def _run_service(tmp: Path, log: BehaviourLog, bundle: Path, model_version: str, model: str,
                 redis_url: str, env: dict[str, str], api_key: str | None = None) -> Iterator[Service]:
    """`din serve` under uvicorn on a free port, up until /readyz says 200 (`api_key`: one of
    the API_KEYS in `env`, for the wiring check)."""
    port = free_port()
    log_file = (tmp / f"serve-{model}.log").open("w")
    proc = subprocess.Popen(
        [_din(), "serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port),
         "--redis-url", redis_url],
        env=env, cwd=tmp, stdout=log_file, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"din serve exited ({proc.returncode}):\n{_tail(tmp / f'serve-{model}.log')}"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"din serve not ready in {STARTUP_S}s:\n{_tail(tmp / f'serve-{model}.log')}"
            time.sleep(0.2)
        _check_explain_is_served(base, log, api_key)
        yield Service(base_url=base, bundle=bundle, model_version=model_version, log=log, redis_url=redis_url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _check_explain_is_served(base: str, log: BehaviourLog, api_key: str | None = None) -> None:
    """The wiring the page needs, checked without a browser (a failure here is the service's)."""
    page = httpx.get(f"{base}/", timeout=10)
    assert page.status_code == 200 and 'id="heatmap"' in page.text, f"GET / does not serve the page: {page.status_code}"
    r = httpx.post(f"{base}/rank", timeout=30, headers={"X-API-Key": api_key} if api_key else {}, json={
        "user_id": int(log.user_id[0]), "candidates": [{"item_id": 101, "cate_id": 1}], "explain": True})
    assert r.status_code == 200 and "attention_available" in r.json(), f"POST /rank explain: {r.status_code} {r.text}"


@pytest.fixture(scope="module")
def din_service(world) -> Iterator[Service]:
    yield from _serve(world, "din")


@pytest.fixture(scope="module")
def base_service(world) -> Iterator[Service]:
    yield from _serve(world, "base")


@pytest.fixture(scope="module")
def keyed_service(world, din_service: Service) -> Iterator[Service]:
    """The DIN bundle and histories of `din_service`, served again with API_KEYS set."""
    tmp, log, _ = world
    env = _env(tmp) | {"API_KEYS": f"{API_KEY},another-key-2"}
    yield from _run_service(tmp, log, din_service.bundle, din_service.model_version, "din-keyed",
                            din_service.redis_url, env, api_key=API_KEY)


# ---------------------------------------------------------------------------------------
# The browser.
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the system; a skip naming the missing piece where there is none."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser driver: `pip install playwright` (the system Chromium is used; no `playwright install`)")
    exe = os.environ.get("DIN_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if not exe:
        pytest.skip("no Chromium: `apt-get install chromium` (Debian), or set DIN_CHROMIUM to a Chrome/Chromium binary")
    with sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        except PlaywrightError as e:
            pytest.skip(f"Chromium at {exe} cannot start here: {str(e).splitlines()[0]}")
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _open(page, service: Service) -> None:
    page.goto(f"{service.base_url}/")
    page.wait_for_selector("body[data-ready]")


def _filled_or_error(page, field: str) -> None:
    """Wait until the sample fills `#field` or the page shows an error, and fail with that error."""
    page.wait_for_function(
        f"document.getElementById('{field}').value !== '' || "
        "(!document.getElementById('message').hidden && document.getElementById('message').classList.contains('msg-error'))"
    )
    assert page.input_value(f"#{field}") != "", f"the page shows an error: {page.inner_text('#message')}"


def _rank(page, user: int, candidates: list[tuple[int, int]]) -> None:
    page.fill("#user-id", str(user))
    page.fill("#candidates", ", ".join(f"{i}:{c}" for i, c in candidates))
    page.fill("#top-k", "")
    page.click("#rank-btn")
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)")
    state = page.evaluate("document.body.dataset.state")
    assert state == "done", f"the page shows an error: {page.inner_text('#message')}"


def _attrs(page, selector: str, name: str) -> list[str]:
    return page.eval_on_selector_all(selector, f"els => els.map(e => e.getAttribute('{name}'))")


def _pick(log: BehaviourLog) -> tuple[int, list[Behaviour], list[tuple[int, int]]]:
    """The user with the longest history, and 8 candidates: 4 of their two interest
    categories, 3 of other categories and one item no model has seen."""
    users, counts = np.unique(log.user_id, return_counts=True)
    user = int(users[np.argmax(counts)])
    hist = _history(log, user)
    u = user - 10**12
    a, b = u % 6 + 1, (u + 2) % 6 + 1
    others = [c for c in range(1, 7) if c not in (a, b)][:3]
    cands = [(_item(a, 8), a), (_item(b, 9), b), (_item(a, 3), a), (_item(b, 4), b)]
    cands += [(_item(c, 5), c) for c in others] + [(999_999, a)]
    return user, hist, cands


# ---------------------------------------------------------------------------------------
def test_page_ranks_a_user_and_draws_the_attention_heatmap(browser, din_service: Service, page):
    log = din_service.log
    user, hist, cands = _pick(log)
    assert 8 <= len(hist) <= 50  # all of it fits max_history: every behaviour is a column

    _open(page, din_service)
    _rank(page, user, cands)
    api = httpx.post(f"{din_service.base_url}/rank", timeout=30, json={
        "user_id": user, "candidates": [{"item_id": i, "cate_id": c} for i, c in cands], "explain": True}).json()

    # Without API_KEYS the page never asks for a key.
    assert page.locator("#api-key-form").is_hidden()

    # Header: the model that answered, not degraded.
    assert page.inner_text("#model-version") == din_service.model_version == api["model_version"]
    assert page.inner_text("#meta-user") == str(user)
    assert page.inner_text("#degraded") == "ok"
    assert api["history_length"] == len(hist)

    # Ranked bars: every candidate once, in the API's order, CTRs descending.
    ranked = [(int(r["item_id"]), int(r["cate_id"]), r["ctr"]) for r in api["ranked"]]
    bar_items = [int(x) for x in _attrs(page, "#ranked .bar", "data-item-id")]
    bar_cates = [int(x) for x in _attrs(page, "#ranked .bar", "data-cate-id")]
    bar_ctrs = [float(x) for x in _attrs(page, "#ranked .bar", "data-ctr")]
    assert sorted(zip(bar_items, bar_cates)) == sorted(cands)  # BIG ids arrive exact
    assert bar_items == [i for i, _, _ in ranked]
    assert bar_ctrs == pytest.approx([c for _, _, c in ranked], abs=1e-9)
    assert bar_ctrs == sorted(bar_ctrs, reverse=True)

    # Heatmap: one row per candidate, the top one the highest CTR; one cell per behaviour.
    rows = page.locator("#heatmap tr.hm-row")
    assert rows.count() == len(cands)
    row_ctrs = [float(x) for x in _attrs(page, "#heatmap tr.hm-row", "data-ctr")]
    assert row_ctrs[0] == pytest.approx(max(c for _, _, c in ranked), abs=1e-9) == max(row_ctrs)
    assert [int(x) for x in _attrs(page, "#heatmap tr.hm-row", "data-item-id")] == bar_items
    # Columns: the log's behaviours, newest first (item and category of each).
    assert [int(x) for x in _attrs(page, "#heatmap th.hm-col", "data-item-id")] == [b.item_id for b in hist]
    assert [int(x) for x in _attrs(page, "#heatmap th.hm-col", "data-cate-id")] == [b.cate_id for b in hist]
    hist_cates = np.array([b.cate_id for b in hist])
    for r, (item, cate, _) in enumerate(ranked):
        row = rows.nth(r)
        cells = row.locator("td.hm-cell")
        assert cells.count() == len(hist), f"row {r}: {cells.count()} cells for {len(hist)} behaviours"
        weights = [float(x) for x in row.evaluate("tr => [...tr.querySelectorAll('td.hm-cell')].map(td => td.dataset.weight)")]
        assert weights == pytest.approx(api["ranked"][r]["attention"], abs=1e-9)
        assert np.isfinite(weights).all()
        matched = row.evaluate("tr => [...tr.querySelectorAll('td.hm-cell')].map(td => td.classList.contains('hm-match'))")
        assert matched == list(hist_cates == cate), f"row {r}: category-match outline on the wrong cells"

    # Hover: the exact value, the behaviour and the candidate of the cell under the mouse.
    r0_item, r0_cate, _ = ranked[0]
    j = int(np.argmax(hist_cates == r0_cate)) if (hist_cates == r0_cate).any() else 0
    rows.nth(0).locator("td.hm-cell").nth(j).hover()
    tip = page.locator("#hm-tooltip")
    tip.wait_for(state="visible")
    text = tip.inner_text()
    shown = float(re.search(r"weight (\S+)", text).group(1))
    assert shown == pytest.approx(api["ranked"][0]["attention"][j], abs=1e-12)
    assert f"item {hist[j].item_id}" in text and f"item {r0_item}" in text
    assert ("same category" in text) == (hist[j].cate_id == r0_cate)

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "explain-hover.png"), full_page=True)
    page.mouse.move(0, 0)
    tip.wait_for(state="hidden")
    shot = page.screenshot(path=str(SCREENSHOTS / "explain.png"), full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_reports_bad_input_and_http_errors(browser, din_service: Service, page):
    user, _, cands = _pick(din_service.log)
    _open(page, din_service)
    sent: list[str] = []
    page.on("request", lambda req: sent.append(req.url) if req.url.endswith("/rank") else None)

    # Malformed candidates: named in the message, and nothing is sent.
    page.fill("#user-id", str(user))
    page.fill("#candidates", "101:1, 12:x")
    page.click("#rank-btn")
    page.wait_for_function("document.body.dataset.state === 'error'")
    assert '"12:x"' in page.inner_text("#message.msg-error")
    assert sent == []

    # Above the served limit: the service's 4xx, naming the field and the limit.
    too_many = [(_item(2, k % 10) + 1000 * k, 2) for k in range(MAX_CANDIDATES + 1)]
    page.fill("#candidates", ", ".join(f"{i}:{c}" for i, c in too_many))
    page.click("#rank-btn")
    page.wait_for_function("document.body.dataset.state === 'error'")
    message = page.inner_text("#message.msg-error")
    assert message.startswith("HTTP 422") and "candidates" in message and str(MAX_CANDIDATES) in message
    assert len(sent) == 1

    # A good request afterwards clears the error.
    _rank(page, user, cands)
    assert page.locator("#message").is_hidden()
    assert page.locator("#heatmap tr.hm-row").count() == len(cands)


def test_page_says_when_the_model_has_no_attention(browser, base_service: Service, page):
    user, _, cands = _pick(base_service.log)
    _open(page, base_service)
    _rank(page, user, cands)
    assert page.inner_text("#model-version") == base_service.model_version
    assert page.locator("#ranked .bar").count() == len(cands)
    note = page.locator("#attention-note")
    assert note.is_visible() and "no attention" in note.inner_text()
    assert page.locator("#heatmap tr.hm-row").count() == 0
    assert page.locator("#heatmap-block").is_hidden()


def test_sample_buttons_fill_the_form_from_the_service(browser, din_service: Service, page):
    log = din_service.log
    _open(page, din_service)

    page.fill("#user-id", "")
    page.click("#random-user")
    _filled_or_error(page, "user-id")
    assert int(page.input_value("#user-id")) in set(log.user_id.tolist())

    page.fill("#candidates", "")
    page.fill("#sample-n", "7")
    page.click("#sample-candidates")
    _filled_or_error(page, "candidates")
    pairs = [tuple(map(int, tok.split(":"))) for tok in re.split(r"[,\s]+", page.input_value("#candidates").strip())]
    catalogue = set(zip(log.item_id.tolist(), log.cate_id.tolist()))
    assert len(pairs) == 7 and set(pairs) <= catalogue

    page.click("#rank-btn")
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)")
    assert page.evaluate("document.body.dataset.state") == "done", page.inner_text("#message")
    assert page.locator("#heatmap tr.hm-row").count() == 7

    page.fill("#candidates", "")
    page.fill("#sample-n", "2.5")  # the API takes whole numbers: the page rounds instead of sending 2.5 (a 422)
    page.click("#sample-candidates")
    _filled_or_error(page, "candidates")
    assert len(re.split(r"[,\s]+", page.input_value("#candidates").strip())) == 3


def test_page_tells_a_degraded_answer_from_a_user_without_history(browser, din_service: Service, page):
    """A store that failed gives history_length 0 with degraded: true; the page must not call
    that user unknown. The real answer is turned into the degraded one the service sends then."""
    user, _, cands = _pick(din_service.log)

    def as_degraded(route):
        body = route.fetch().json()
        body.update(degraded=True, history_length=0, history=[])
        for r in body["ranked"]:
            r["attention"] = []
        route.fulfill(json=body)

    _open(page, din_service)
    page.route("**/rank", as_degraded)
    _rank(page, user, cands)
    note = page.locator("#attention-note")
    assert note.is_visible() and "history store failed or timed out" in note.inner_text()
    assert "unknown user" not in note.inner_text()




@dataclass
class Demo:
    proc: subprocess.Popen
    url: str  # the explain page, http://127.0.0.1:PORT/
    err_path: Path  # the demo's stderr
    deadline: float

    def get(self, path: str = "", timeout: float = 2.0) -> httpx.Response:
        """GET once the server answers (it prints the page's URL before uvicorn binds)."""
        while True:
            try:
                return httpx.get(f"{self.url}{path}", timeout=timeout)
            except httpx.TransportError:
                assert self.proc.poll() is None and time.monotonic() < self.deadline, _tail(self.err_path)
                time.sleep(0.2)


@contextlib.contextmanager
def _running_demo(bundle: Path, env: dict[str, str], cwd: Path) -> Iterator[Demo]:
    """`din demo` on a free port, reusing `bundle` (it does not train), until it printed the page's URL; Ctrl-C after."""
    bundles = Path(env["DIN_HOME"]) / "demo" / "bundles"
    shutil.copytree(bundle, bundles / bundle.name)
    port = free_port()
    err_path = cwd / "demo.err"
    with err_path.open("w") as err:
        proc = subprocess.Popen([_din(), "demo", "--port", str(port)], env=env, cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    demo = Demo(proc, f"http://127.0.0.1:{port}/", err_path, time.monotonic() + STARTUP_S)
    try:
        while f"explain page: {demo.url}\n" not in err_path.read_text(errors="replace"):
            assert proc.poll() is None, f"din demo exited ({proc.returncode}):\n{_tail(err_path)}"
            assert time.monotonic() < demo.deadline, f"din demo printed no page URL in {STARTUP_S}s:\n{_tail(err_path)}"
            time.sleep(0.2)
        yield demo
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: uvicorn and the embedded Redis stop
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_demo_loads_into_the_redis_that_redis_url_names(din_service: Service, tmp_path: Path):
    """DESIGN: with `make demo`, REDIS_URL switches to an external Redis: the demo loads its
    histories there (in REDIS_NAMESPACE) and serves from it, starting no Redis of its own,
    and never prints the URL's password."""
    import redis as redis_py

    external = EmbeddedRedis(tmp_path / "external", free_port(), persist=False)
    external.start()
    try:
        redis_py.Redis.from_url(external.url).acl_setuser("demo", enabled=True, passwords=["+s3cret-pw"], keys=["*"], commands=["+@all"])
        redis_url = f"redis://demo:s3cret-pw@127.0.0.1:{external.port}/0"
        env = {**_env(tmp_path), "REDIS_URL": redis_url, "REDIS_NAMESPACE": "demo_ext"}
        with _running_demo(din_service.bundle, env, tmp_path) as demo, redis_py.Redis.from_url(redis_url) as redis_client:
            printed = demo.err_path.read_text()
            assert f"Redis at redis://demo:***@127.0.0.1:{external.port}/0 (REDIS_URL)" in printed
            assert "s3cret-pw" not in printed
            assert redis_client.get("demo_ext:current") is not None  # the demo's data version, in that Redis
            assert not (Path(env["DIN_HOME"]) / "demo" / "redis").exists()  # no Redis of its own
            assert demo.get("api/sample", timeout=5).json()["user_ids"], "the demo's users are not where it serves from"
    finally:
        external.stop(save=False)


def test_demo_prints_the_page_url_and_serves_it(din_service: Service, tmp_path: Path):
    """`din demo` (what `make demo` runs) prints the page's URL, and that URL is the page.

    No browser needed. The demo reuses a bundle already in its home (this module's DIN),
    so it does not train; it still loads the default synthetic histories and serves, into
    the REDIS_NAMESPACE it serves from (a user's .env may set one).
    """
    env = {**_env(tmp_path), "REDIS_NAMESPACE": "shop"}
    with _running_demo(din_service.bundle, env, tmp_path) as demo:
        page = demo.get()
        assert page.status_code == 200 and 'id="heatmap"' in page.text
        assert "reusing bundle" in demo.err_path.read_text()  # it did not train
        assert demo.get("api/sample", timeout=5).json()["user_ids"], "the demo's users are not where it serves from"
        second = subprocess.run([_din(), "demo", "--port", str(free_port())], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert second.returncode == 2 and "another `din demo` runs on" in second.stderr, second.stderr[-2000:]
        assert "--redis-url" not in second.stderr  # an option din demo does not have

def test_page_asks_for_an_api_key_and_sends_it(browser, keyed_service: Service, page):
    """With API_KEYS set: the first call's 401 brings up a password field saying a key is
    needed, a wrong key shows the service's 403, the right one makes Sample and Rank work and
    goes out as X-API-Key on every call, kept in this tab's sessionStorage only."""
    log = keyed_service.log
    sent: list[tuple[str, str | None]] = []  # (path, X-API-Key) of every API call the page made
    page.on("request", lambda req: sent.append((req.url.split("?")[0].removeprefix(keyed_service.base_url),
                                                 req.headers.get("x-api-key")))
            if req.url.split("?")[0].endswith(("/rank", "/api/sample")) else None)
    error = "document.getElementById('message').classList.contains('msg-error') && !document.getElementById('message').hidden"

    # Page load samples the population: 401, and the page says a key is needed (body[data-ready]
    # comes once that call is answered, so no waiting here).
    _open(page, keyed_service)
    assert page.evaluate(error), f"no error shown after the load's sample got a 401: {page.inner_text('#message')!r}"
    key_field = page.locator("#api-key")
    assert page.locator("#api-key-form").is_visible() and key_field.get_attribute("type") == "password"
    assert "requires an API key" in page.inner_text("#api-key-note")
    message = page.inner_text("#message")
    assert message.startswith("HTTP 401") and "requires an API key" in message
    assert sent == [("/api/sample", None)]
    assert page.input_value("#candidates") == ""

    # A wrong key: the service's 403 message, on the page and by the field.
    key_field.fill("not-the-right-key")
    page.click("#api-key-use")
    page.wait_for_function(f"({error}) && document.getElementById('message').textContent.startsWith('HTTP 403')")
    assert "unknown API key" in page.inner_text("#message")
    assert "did not accept this key" in page.inner_text("#api-key-note")
    assert sent[-1] == ("/api/sample", "not-the-right-key")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "explain-api-key.png"))

    # The right key: the stopped call runs again, then Sample, Random user and Rank work.
    key_field.fill(API_KEY)
    page.click("#api-key-use")
    _filled_or_error(page, "candidates")
    page.fill("#candidates", "")
    page.fill("#sample-n", "5")
    page.click("#sample-candidates")
    _filled_or_error(page, "candidates")
    assert len(re.split(r"[,\s]+", page.input_value("#candidates").strip())) == 5
    page.fill("#user-id", "")
    page.click("#random-user")
    _filled_or_error(page, "user-id")
    assert int(page.input_value("#user-id")) in set(log.user_id.tolist())
    page.click("#rank-btn")
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)")
    assert page.evaluate("document.body.dataset.state") == "done", page.inner_text("#message")
    assert page.locator("#ranked .bar").count() == 5 and page.locator("#heatmap tr.hm-row").count() == 5
    assert page.inner_text("#model-version") == keyed_service.model_version
    assert page.locator("#message").is_hidden()
    assert "accepted" in page.inner_text("#api-key-note")
    after = sent[sent.index(("/api/sample", "not-the-right-key")) + 1:]
    assert [p for p, _ in after] == ["/api/sample"] * 3 + ["/rank"]
    assert all(k == API_KEY for _, k in after), after

    # Kept for this tab only: in sessionStorage, not in localStorage nor in a cookie.
    assert API_KEY in page.evaluate("JSON.stringify(Object.values(sessionStorage))")
    assert API_KEY not in page.evaluate("JSON.stringify(Object.values(localStorage))")
    assert API_KEY not in page.evaluate("document.cookie")
    assert all(API_KEY not in c["value"] for c in page.context.cookies())
    # A reload keeps it (same tab): the link in the URL ranks again at once, with the key.
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.evaluate("document.body.dataset.state") == "done", page.inner_text("#message")
    assert page.locator("#heatmap tr.hm-row").count() == 5
    assert sent[-1] == ("/rank", API_KEY)
    # Another tab does not have it.
    other = page.context.new_page()
    try:
        _open(other, keyed_service)
        assert other.evaluate(error)
        assert other.inner_text("#message").startswith("HTTP 401") and other.locator("#api-key-form").is_visible()
        assert other.input_value("#api-key") == ""
    finally:
        other.close()
