"""The serving graph: the training graph's function, rearranged; parity pinned at 1e-5.

PReLU slopes above 1, below 0, exactly 0 and 1 exercise the reflection and the relu-split
rewrites; U = 1 and U > 1 run the two branches of the `If`; Dice runs as the trained module.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.activation import PReLU
from model.config import ModelConfig
from model.contract import CAND_USER, OUTPUT_NAMES, FeatureSpec, cand_input
from model.export import export_module, random_inputs, to_onnx, torch_scores
from model.registry import build_model
from model.serving_graph import serving_modules

SPEC = FeatureSpec(vocab_sizes={"item_id": 60, "cate_id": 9}, max_history=12)
SPEC_PROFILE = FeatureSpec(
    profile_fields=("gender", "age"), vocab_sizes={"item_id": 60, "cate_id": 9, "gender": 4, "age": 9}, max_history=12
)
CASES = {
    "din": ("din", SPEC, ModelConfig(embedding_dim=4)),
    "din_softmax_profile": ("din", SPEC_PROFILE, ModelConfig(embedding_dim=4, attention_softmax=True)),
    "din_one_attention_layer": ("din", SPEC, ModelConfig(embedding_dim=3, attention_hidden=(7,), mlp_hidden=(9,))),
    "din_deep": ("din", SPEC_PROFILE, ModelConfig(embedding_dim=4, attention_hidden=(9, 6, 5), mlp_hidden=(11, 7, 3))),
    "base_profile": ("base", SPEC_PROFILE, ModelConfig(embedding_dim=4)),
    "din_dice_profile": ("din_dice", SPEC_PROFILE, ModelConfig(embedding_dim=4)),
    "base_dice": ("base", SPEC, ModelConfig(embedding_dim=4, activation="dice")),
}


def trained_like(name, spec, config, seed=0):
    """Random weights spread out like a trained model's, and PReLU slopes of every kind."""
    torch.manual_seed(seed)
    model = build_model(name, spec, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
        for m in model.modules():
            if isinstance(m, PReLU):
                a = torch.empty_like(m.alpha).uniform_(-0.5, 2.5)  # below 0, in [0, 1], above 1
                a[0], a[-1] = 1.0, 0.0
                m.alpha.copy_(a)
    return model


@pytest.fixture(scope="module")
def exported():
    return {k: (m := trained_like(*c), to_onnx(m, c[1])) for k, c in CASES.items()}


def _branches_run(session_bytes, x, tmp_path) -> set[str]:
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "ort_profile")
    s = ort.InferenceSession(session_bytes, so, providers=["CPUExecutionProvider"])
    s.run(list(OUTPUT_NAMES), x)
    with open(s.end_profiling()) as f:
        names = {e["name"] for e in json.load(f) if e.get("cat") == "Node"}
    return {prefix for prefix in ("one_user/", "batch/") if any(prefix in n for n in names)}


@pytest.mark.parametrize("case", list(CASES))
def test_serving_graph_matches_the_training_graph(exported, case):
    _, spec, _ = CASES[case]
    model, onnx_bytes = exported[case]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    for users, slots, candidates, seed in [(1, 12, 30, 0), (1, 1, 1, 1), (5, 9, 40, 2), (3, 12, 200, 3), (2, 1, 2, 4)]:
        x = random_inputs(spec, users, slots, candidates, seed)
        want_ctr, want_att = torch_scores(model, spec, x)
        got_ctr, got_att = session.run(list(OUTPUT_NAMES), x)
        assert got_ctr.shape == want_ctr.shape and got_att.shape == want_att.shape
        assert np.max(np.abs(got_ctr - want_ctr)) <= 1e-5, (users, slots, candidates)
        assert np.max(np.abs(got_att - want_att)) <= 1e-5, (users, slots, candidates)
    assert np.ptp(want_ctr) > 1e-3  # the scores really vary: the comparison means something


@pytest.mark.parametrize("case", ["din_dice_profile", "base_dice"])
def test_dice_models_get_the_serving_graph(exported, case):
    """Dice runs as the trained module (element-wise on its frozen statistics) inside the serving
    graph: din_dice, and any model built with activation="dice", are not left on the training graph."""
    model, onnx_bytes = exported[case]
    assert serving_modules(model, CASES[case][1]) is not None
    assert [n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node if n.op_type == "If"] == ["If"]


def test_one_user_and_batch_branches_run_where_they_should(exported, tmp_path):
    _, onnx_bytes = exported["din"]
    assert _branches_run(onnx_bytes, random_inputs(SPEC, 1, 8, 20, seed=0), tmp_path) == {"one_user/"}
    assert _branches_run(onnx_bytes, random_inputs(SPEC, 3, 8, 20, seed=0), tmp_path) == {"batch/"}


def test_the_same_user_alone_and_in_a_batch_scores_the_same(exported):
    """U = 1 (one branch) and the same user inside U = 3 (the other) agree."""
    _, onnx_bytes = exported["din_softmax_profile"]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = random_inputs(SPEC_PROFILE, 3, 10, 30, seed=7)
    ctr, att = session.run(list(OUTPUT_NAMES), x)
    mine = x[CAND_USER] == 1
    alone = {k: (v[1:2] if not k.startswith("cand") else v[mine]) for k, v in x.items()}
    alone[CAND_USER] = np.zeros(int(mine.sum()), dtype=np.int64)
    ctr1, att1 = session.run(list(OUTPUT_NAMES), alone)
    np.testing.assert_allclose(ctr1, ctr[mine], rtol=0, atol=1e-6)
    np.testing.assert_allclose(att1, att[mine], rtol=0, atol=1e-6)


def _ancestor_inputs(graph: onnx.GraphProto, value: str) -> set[str]:
    producer = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    seen, todo, found = set(), [value], set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in inputs:
            found.add(v)
        elif v in producer:
            todo.extend(producer[v].input)
    return found


def test_user_side_is_computed_once_per_user_and_no_concat_first_layer():
    """In the batch graph the attention's user projection reads only history inputs, the pair
    GEMM's weight is D x H (not the 4D x H of the concatenated form), and no PRelu is left."""
    name, spec, config = CASES["din"]
    model = trained_like(name, spec, config)
    general, _ = serving_modules(model, spec)
    graph = onnx.load_from_string(export_module(general, spec)).graph
    d, h = 2 * config.embedding_dim, config.attention_hidden[0]
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    assert not any(op.op_type == "PRelu" for op in graph.node)
    assert (4 * d, h) not in weights.values() and (h, 4 * d) not in weights.values()
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and weights.get(n.input[1]) == (d, h)]
    sources = [_ancestor_inputs(graph, n.input[0]) for n in matmuls]
    per_user = [s for s in sources if s and all(i.startswith("hist_") for i in s)]
    per_pair = [s for s in sources if CAND_USER in s and cand_input("item_id") in s]
    assert len(per_user) == 1 and len(per_pair) == 1, sources  # user projection once per user; one pair GEMM


def test_models_without_a_serving_graph_export_as_they_are():
    class Other(torch.nn.Module):
        pass

    assert serving_modules(Other(), SPEC) is None


def test_export_records_the_serving_graph_and_falls_back_when_it_is_wrong(tmp_path, caplog):
    """A DIN variant whose activation depends on the layout (softmax over dim 1: T in training,
    H in the serving graph's (N*T, H)) fails the serving graph's parity; the export then ships
    the training graph, says so in the manifest and warns."""
    from model.bundle import load_bundle
    from model.contract import Vocabulary
    from model.export import export_bundle

    vocabs = {"item_id": Vocabulary(np.arange(58)), "cate_id": Vocabulary(np.arange(7))}

    def export(model, name):
        result = export_bundle(
            model, model_type="din", spec=SPEC, vocabularies=vocabs, out_dir=tmp_path / name,
            data_fingerprint="fallback0", extra={},
        )  # fmt: skip
        return load_bundle(result.bundle)

    model = trained_like("din", SPEC, ModelConfig(embedding_dim=4))
    assert export(model, "plain").manifest["onnx_graph"] == "serving"

    class SoftmaxOverDim1(torch.nn.Module):
        def forward(self, h):
            return h.softmax(dim=1)

    model.attention.first_act = SoftmaxOverDim1()
    with caplog.at_level("WARNING", logger="model.export"):
        bundle = export(model, "odd")
    assert bundle.manifest["onnx_graph"] == "training" and bundle.manifest["parity_max_abs_diff"] <= 1e-5
    assert "serving graph of din failed" in caplog.text


def test_the_naive_benchmark_baseline_is_the_same_function():
    """model/naive_din.py (the benchmark's baseline) scores exactly as DIN, in PyTorch and in ONNX."""
    from model.naive_din import NaiveDIN

    _, spec, config = CASES["din_softmax_profile"]
    model = trained_like("din", spec, config)
    naive = NaiveDIN(model).eval()
    session = ort.InferenceSession(to_onnx(naive, spec, optimize=False), providers=["CPUExecutionProvider"])
    x = random_inputs(spec, 3, 10, 40, seed=11)
    want_ctr, want_att = torch_scores(model, spec, x)
    for ctr, att in (torch_scores(naive, spec, x), session.run(list(OUTPUT_NAMES), x)):
        np.testing.assert_allclose(ctr, want_ctr, rtol=0, atol=1e-5)
        np.testing.assert_allclose(att, want_att, rtol=0, atol=1e-5)
