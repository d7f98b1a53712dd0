"""Hot model reload through the real app: swap under load, in-flight requests, refusals, latest.

The new bundle ("v2") is the trained one with the final MLP bias raised by 1: a real,
different model whose CTRs are known exactly (sigmoid(logit(ctr_v1) + 1)), so every
answer can be checked against the model its `model_version` names.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import anyio
import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from model.bundle import update_latest
from service.app import create_app
from test_api import rank_body, serving, settings_for, some_candidates, trained  # noqa: F401  (fixtures)
from test_observability import samples, value

pytestmark = pytest.mark.anyio

TOKEN = "reload-token-123456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
V2 = "din-test-v2"
SHIFT = 1.0


def copy_bundle(src: Path, dest_dir: Path, version: str, *, bias_shift: float = 0.0) -> Path:
    """A copy of bundle `src` named `version`; `bias_shift` is added to the output logit's bias."""
    dest = dest_dir / version
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "bundle.json").read_text())
    manifest["model_version"] = version
    (dest / "bundle.json").write_text(json.dumps(manifest))
    if bias_shift:
        graph = onnx.load(dest / "model.onnx")
        biases = _output_biases(graph.graph)
        assert biases, "no output-logit bias found in the exported graph"
        for out_bias in biases:
            out_bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(out_bias) + np.float32(bias_shift), out_bias.name))
        onnx.save(graph, dest / "model.onnx")
    return dest


def _output_biases(graph) -> list:
    """The output logit's bias: one per graph, i.e. one per branch of the serving graph's `If`.

    The training graph names it `model.mlp.*` (shape [1]); the serving graph
    (model/serving_graph.py) `<branch>/mlp_<last>_bias` in each subgraph.
    """
    found = [t for t in graph.initializer if list(t.dims) == [1] and (t.name.startswith("model.mlp.") or "/mlp_" in t.name)]
    assert len(found) <= 1, [t.name for t in found]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _output_biases(attr.g)
    return found


def shifted(ctr: dict, shift: float) -> dict:
    """CTRs of the same model with `shift` added to every logit."""
    return {k: float(1 / (1 + np.exp(-(np.log(p / (1 - p)) + shift)))) for k, p in ctr.items()}


def scores(body: dict) -> dict:
    return {(x["item_id"], x["cate_id"]): x["ctr"] for x in body["ranked"]}


@pytest.fixture
def bundles(trained, tmp_path) -> dict[str, Path]:
    root = tmp_path / "bundles"
    root.mkdir()
    v1 = copy_bundle(trained.bundle.path, root, trained.bundle.model_version)
    v2 = copy_bundle(trained.bundle.path, tmp_path, V2, bias_shift=SHIFT)
    corrupt = copy_bundle(trained.bundle.path, tmp_path, "din-test-corrupt")
    (corrupt / "model.onnx").write_bytes(b"\x08\x07garbage, not a graph")
    return {"dir": root, "v1": v1, "v2": v2, "corrupt": corrupt}


async def stream(client, body, answers: list, stop: anyio.Event) -> None:
    while not stop.is_set():
        r = await client.post("/rank", json=body)
        answers.append((r.status_code, r.json() if r.status_code == 200 else r.text))
        await anyio.sleep(0.001)


async def test_reload_under_load_switches_once_and_refuses_a_corrupt_bundle(trained, bundles, capsys):
    v1 = trained.bundle.model_version
    body = rank_body(int(trained.log.user_id[0]), some_candidates(trained.log, 25, seed=7))
    per_worker: dict[int, list] = defaultdict(list)
    stop = anyio.Event()
    async with serving(settings_for(bundles["v1"], None, admin_token=TOKEN)) as client:
        expected = {v1: scores((await client.post("/rank", json=body)).json())}
        expected[V2] = shifted(expected[v1], SHIFT)

        def total() -> int:
            return sum(map(len, per_worker.values()))

        async def until(n: int) -> None:
            while total() < n:
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            for w in range(3):
                tg.start_soon(stream, client, body, per_worker[w], stop)
            await until(30)
            good = await client.post("/admin/reload", json={"bundle": str(bundles["v2"])}, headers=AUTH)
            n_at_swap = total()
            await until(n_at_swap + 30)
            bad = await client.post("/admin/reload", json={"bundle": str(bundles["corrupt"])}, headers=AUTH)
            await until(total() + 30)
            stop.set()
        m = samples((await client.get("/metrics")).text)

    assert good.status_code == 200, good.text
    assert good.json()["model_version"] == V2 and good.json()["previous_version"] == v1 and good.json()["changed"]
    assert good.json()["load_seconds"] > 0
    assert bad.status_code == 422 and "model.onnx" in bad.json()["detail"] and bad.json()["model_version"] == V2
    answers = [a for w in per_worker.values() for a in w]
    assert [s for s, _ in answers].count(200) == len(answers), "a request failed during a reload"
    for w, seq in per_worker.items():
        versions = [b["model_version"] for _, b in seq]
        switches = sum(a != b for a, b in zip(versions, versions[1:]))
        assert versions[0] == v1 and versions[-1] == V2 and switches == 1, f"worker {w}: {versions}"
    for _, b in answers:  # every answer was scored by the model it names
        got = scores(b)
        assert got == pytest.approx(expected[b["model_version"]], abs=2e-6)
    assert value(m, "din_model_reloads_total", outcome="ok") == 1
    assert value(m, "din_model_reloads_total", outcome="refused") == 1
    assert value(m, "din_model_info", version=V2, type="din") == 1 and value(m, "din_model_info", version=v1, type="din") == 0
    n1 = sum(b["model_version"] == v1 for _, b in answers)
    with capsys.disabled():
        print(f"\n[hot reload] answers={len(answers)} failed=0 on {v1}={n1} on {V2}={len(answers) - n1} "
              f"load+warm={good.json()['load_seconds']:.3f}s corrupt refused={bad.status_code}")


async def test_a_request_is_scored_and_labelled_by_the_model_of_its_batch(trained, bundles):
    """The scorer is picked up once per micro-batch, when the batch forms: a request still
    sending its body during a swap is scored by the new model, and says so."""
    v1 = trained.bundle.model_version
    raw = json.dumps(rank_body(int(trained.log.user_id[0]), some_candidates(trained.log, 6, seed=8))).encode()
    release = anyio.Event()
    sent_head = anyio.Event()

    async def slow_body():
        yield raw[:10]
        sent_head.set()
        await release.wait()
        yield raw[10:]

    async with serving(settings_for(bundles["v1"], None, admin_token=TOKEN)) as client:
        before = (await client.post("/rank", content=raw, headers={"content-type": "application/json"})).json()
        result = {}

        async def in_flight():
            result["r"] = await client.post("/rank", content=slow_body(), headers={"content-type": "application/json"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await sent_head.wait()
            swap = await client.post("/admin/reload", json={"bundle": str(bundles["v2"])}, headers=AUTH)
            after = (await client.post("/rank", content=raw, headers={"content-type": "application/json"})).json()
            release.set()
    assert swap.status_code == 200
    late = result["r"].json()
    assert before["model_version"] == v1
    assert late["model_version"] == V2 and scores(late) == pytest.approx(shifted(scores(before), SHIFT), abs=2e-6)
    assert after["model_version"] == V2 and scores(after) == pytest.approx(shifted(scores(before), SHIFT), abs=2e-6)


def _incompatible(bundle: Path, tmp: Path) -> Path:
    """A bundle whose model reads a candidate field (brand_id) that POST /rank does not carry."""
    dest = copy_bundle(bundle, tmp, "din-test-brand")
    manifest = json.loads((dest / "bundle.json").read_text())
    manifest["feature_spec"]["sequence_fields"] = ["item_id", "brand_id"]
    sizes = manifest["feature_spec"]["vocab_sizes"]
    sizes["brand_id"] = sizes.pop("cate_id")
    (dest / "bundle.json").write_text(json.dumps(manifest))
    shutil.copy(dest / "vocab" / "cate_id.npy", dest / "vocab" / "brand_id.npy")
    return dest


def _future_format(bundle: Path, tmp: Path) -> Path:
    dest = copy_bundle(bundle, tmp, "din-test-format")
    manifest = json.loads((dest / "bundle.json").read_text())
    manifest["format_version"] = 99
    (dest / "bundle.json").write_text(json.dumps(manifest))
    return dest


def _missing_vocab(bundle: Path, tmp: Path) -> Path:
    dest = copy_bundle(bundle, tmp, "din-test-novocab")
    (dest / "vocab" / "item_id.npy").unlink()
    return dest


def _other_trainings_graph(bundle: Path, tmp: Path) -> Path:
    """vocab/ and bundle.json of a training that knew 40 more items than model.onnx's table holds."""
    dest = copy_bundle(bundle, tmp, "din-test-mixed")
    ids = np.load(dest / "vocab" / "item_id.npy")
    np.save(dest / "vocab" / "item_id.npy", np.concatenate([ids, ids.max() + 1 + np.arange(40, dtype=ids.dtype)]))
    manifest = json.loads((dest / "bundle.json").read_text())
    manifest["feature_spec"]["vocab_sizes"]["item_id"] += 40
    (dest / "bundle.json").write_text(json.dumps(manifest))
    return dest


def _rewritten(bundle: Path, tmp: Path, name: str, manifest=None, vocab: bytes | None = None) -> Path:
    """A copy whose bundle.json is `manifest(parsed)` (JSON of any type) or whose item vocabulary is `vocab`."""
    dest = copy_bundle(bundle, tmp, f"din-test-{name}")
    if manifest is not None:
        (dest / "bundle.json").write_text(json.dumps(manifest(json.loads((dest / "bundle.json").read_text()))))
    if vocab is not None:
        (dest / "vocab" / "item_id.npy").write_bytes(vocab)
    return dest


async def test_bad_bundles_are_refused_and_the_old_model_keeps_serving(trained, bundles, tmp_path):
    v1 = trained.bundle.model_version
    cases = [
        (tmp_path / "no-such-bundle", 404, "does not exist"),
        (bundles["corrupt"], 422, "cannot be loaded by ONNX Runtime"),
        (_future_format(trained.bundle.path, tmp_path), 422, "format version 99 is not supported"),
        (_incompatible(trained.bundle.path, tmp_path), 422, "'brand_id', which POST /rank does not carry"),
        (_missing_vocab(trained.bundle.path, tmp_path), 422, "item_id.npy cannot be read"),
        (_rewritten(trained.bundle.path, tmp_path, "null", manifest=lambda m: None), 422, "holds a JSON NoneType, not an object"),
        (_rewritten(trained.bundle.path, tmp_path, "list", manifest=lambda m: [1, 2]), 422, "holds a JSON list, not an object"),
        (_rewritten(trained.bundle.path, tmp_path, "sizes", manifest=lambda m: m | {"feature_spec": m["feature_spec"] | {"vocab_sizes": [1, 2]}}),
         422, "of the wrong type"),
        (_rewritten(trained.bundle.path, tmp_path, "emptyvocab", vocab=b""), 422, "item_id.npy cannot be read"),
        (tmp_path / "empty", 422, "no model bundle at"),  # a directory without any bundle in it
        (_other_trainings_graph(trained.bundle.path, tmp_path), 422, "of 'item_id', the last of the bundle's vocabulary"),
    ]
    (tmp_path / "empty").mkdir()
    body = rank_body(1, some_candidates(trained.log, 5))
    async with serving(settings_for(bundles["v1"], None, admin_token=TOKEN)) as client:
        for path, status, says in cases:
            r = await client.post("/admin/reload", json={"bundle": str(path)}, headers=AUTH)
            assert r.status_code == status, (path, r.text)
            assert says in r.json()["detail"] and r.json()["model_version"] == v1
            assert (await client.post("/rank", json=body)).json()["model_version"] == v1
        m = samples((await client.get("/metrics")).text)
    assert value(m, "din_model_reloads_total", outcome="refused") == len(cases)
    assert value(m, "din_model_reloads_total", outcome="ok") == 0


async def test_reload_without_a_path_takes_the_latest_bundle_of_the_directory(trained, bundles):
    root = bundles["dir"]
    update_latest(root, bundles["v1"])
    async with serving(settings_for(root, None, admin_token=TOKEN)) as client:
        first = (await client.post("/rank", json=rank_body(1, some_candidates(trained.log, 3)))).json()
        same = await client.post("/admin/reload", headers=AUTH)
        shutil.copytree(bundles["v2"], root / V2)
        update_latest(root, root / V2)
        newer = await client.post("/admin/reload", headers=AUTH)
        then = (await client.post("/rank", json=rank_body(1, some_candidates(trained.log, 3)))).json()
    assert first["model_version"] == trained.bundle.model_version
    assert same.status_code == 200 and same.json()["changed"] is False
    assert newer.status_code == 200 and newer.json()["changed"] is True and newer.json()["model_version"] == V2
    assert then["model_version"] == V2


async def test_reload_follows_a_latest_symlink_that_is_re_pointed(trained, bundles):
    """BUNDLE=/bundles/latest (the Dockerfile's and the compose file's): a reload after `latest` is
    re-pointed serves the newer bundle; another reload with `latest` unchanged changes nothing."""
    root = bundles["dir"]
    update_latest(root, bundles["v1"])
    shutil.copytree(bundles["v2"], root / V2)
    latest = root / "latest"
    body = rank_body(1, some_candidates(trained.log, 3))
    async with serving(settings_for(latest, None, admin_token=TOKEN)) as client:
        first = (await client.post("/rank", json=body)).json()
        same = await client.post("/admin/reload", headers=AUTH)
        update_latest(root, root / V2)
        newer = await client.post("/admin/reload", headers=AUTH)
        then = (await client.post("/rank", json=body)).json()
        again = await client.post("/admin/reload", headers=AUTH)
        update_latest(root, bundles["v1"])  # a roll-back is a re-point too, named explicitly this time
        back = await client.post("/admin/reload", json={"bundle": str(latest)}, headers=AUTH)
        last = (await client.post("/rank", json=body)).json()
    v1 = trained.bundle.model_version
    assert first["model_version"] == v1
    assert same.status_code == 200 and same.json()["changed"] is False
    assert newer.status_code == 200, newer.text
    assert newer.json()["changed"] is True and newer.json()["model_version"] == V2 and newer.json()["previous_version"] == v1
    assert then["model_version"] == V2
    assert again.status_code == 200 and again.json()["changed"] is False and again.json()["model_version"] == V2
    assert back.status_code == 200 and back.json()["changed"] is True and back.json()["model_version"] == v1
    assert last["model_version"] == v1


async def test_a_second_reload_while_one_runs_is_409(trained, bundles):
    app = create_app(settings_for(bundles["v1"], None, admin_token=TOKEN))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            answers = []

            async def reload():
                answers.append(await client.post("/admin/reload", json={"bundle": str(bundles["v2"])}, headers=AUTH))

            async with anyio.create_task_group() as tg:
                tg.start_soon(reload)
                tg.start_soon(reload)
            serving_now = app.state.scorer.model_version
    assert sorted(r.status_code for r in answers) == [200, 409]
    (refused,) = [r for r in answers if r.status_code == 409]
    assert "another reload is in progress" in refused.json()["detail"]
    assert serving_now == V2


async def test_a_bundle_replaced_at_the_same_path_is_reloaded(trained, bundles, tmp_path):
    """What the path holds decides, not the path: `rm -rf x; cp -r B x` then a reload of x (BUNDLE=x and
    a reload without a path, or `--bundle x` again) serves B; a reload that finds the serving model is
    unchanged. It used to answer `unchanged` for any path the serving model had been loaded from."""
    v1 = trained.bundle.model_version
    body = rank_body(int(trained.log.user_id[0]), some_candidates(trained.log, 5, seed=3))

    def replace(dest: Path, src: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)

    served, fixed = tmp_path / "models" / "x", tmp_path / "fixed"
    replace(served, bundles["v1"])
    answers = []
    async with serving(settings_for(served, None, admin_token=TOKEN)) as client:
        first = (await client.post("/rank", json=body)).json()

        async def reload_and_rank(json=None) -> None:
            r = await client.post("/admin/reload", json=json, headers=AUTH)
            answers.append((r.status_code, r.json(), (await client.post("/rank", json=body)).json()))

        replace(served, bundles["v2"])
        await reload_and_rank()  # BUNDLE=x, x now holds v2
        replace(fixed, bundles["v1"])
        await reload_and_rank({"bundle": str(fixed)})  # cp -r A fixed; din reload --bundle fixed
        replace(fixed, bundles["v2"])
        await reload_and_rank({"bundle": str(fixed)})  # rm -rf fixed; cp -r B fixed; the same reload
        await reload_and_rank({"bundle": str(fixed)})  # nothing changed since
        m = samples((await client.get("/metrics")).text)
    expected = {v1: scores(first), V2: shifted(scores(first), SHIFT)}
    got = [(status, r["changed"], r["previous_version"], r["model_version"], ranked["model_version"])
           for status, r, ranked in answers]
    assert got == [(200, True, v1, V2, V2), (200, True, V2, v1, v1), (200, True, v1, V2, V2), (200, False, V2, V2, V2)]
    for _, _, ranked in answers:  # scored by the model it names
        assert scores(ranked) == pytest.approx(expected[ranked["model_version"]], abs=2e-6)
    assert value(m, "din_model_reloads_total", outcome="ok") == 3
    assert value(m, "din_model_reloads_total", outcome="unchanged") == 1


async def test_a_reload_that_landed_mid_copy_is_followed_by_the_finished_copy(trained, bundles, tmp_path):
    """A copy over a served bundle that writes bundle.json first (rsync's order): a reload in between
    loads the old model.onnx under the new name; once the copy is done, the next reload must load
    it, not answer 'unchanged' because the name already matches."""
    body = rank_body(int(trained.log.user_id[0]), some_candidates(trained.log, 5, seed=3))
    served = tmp_path / "models" / "x"
    shutil.copytree(bundles["v1"], served)
    async with serving(settings_for(served, None, admin_token=TOKEN)) as client:
        first = scores((await client.post("/rank", json=body)).json())
        shutil.copy(bundles["v2"] / "bundle.json", served / "bundle.json")  # the copy, half-way
        mid = await client.post("/admin/reload", headers=AUTH)
        shutil.copy(bundles["v2"] / "model.onnx", served / "model.onnx")  # ... and done
        done = await client.post("/admin/reload", headers=AUTH)
        ranked = (await client.post("/rank", json=body)).json()
    assert (mid.status_code, mid.json()["model_version"]) == (200, V2)
    assert (done.status_code, done.json()["changed"]) == (200, True), done.json()
    assert ranked["model_version"] == V2 and scores(ranked) == pytest.approx(shifted(first, SHIFT), abs=2e-6)
