"""ONNX export: the graph's names and dynamic axes, parity with PyTorch, and the bundle."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.bundle import load_bundle
from model.config import ModelConfig
from model.contract import CAND_USER, OUTPUT_NAMES, PAD_ROW, UNK_ROW, FeatureSpec, Vocabulary, hist_input
from model.dice import Dice
from model.export import ParityError, check_parity, export_bundle, random_inputs, to_onnx, torch_scores
from model.registry import build_model

SPEC = FeatureSpec(vocab_sizes={"item_id": 50, "cate_id": 8}, max_history=10)
SPEC_PROFILE = FeatureSpec(
    profile_fields=("gender", "age"), vocab_sizes={"item_id": 50, "cate_id": 8, "gender": 4, "age": 9}, max_history=10
)
CASES = [
    ("din", SPEC, ModelConfig(embedding_dim=4)),
    ("base", SPEC, ModelConfig(embedding_dim=4)),
    ("din", SPEC_PROFILE, ModelConfig(embedding_dim=4, attention_softmax=True)),
    ("base", SPEC_PROFILE, ModelConfig(embedding_dim=4)),
    # every model of the registry, with profile fields (the service serves any of them)
    ("lr", SPEC_PROFILE, ModelConfig(embedding_dim=4)),
    ("wdl", SPEC_PROFILE, ModelConfig(embedding_dim=4, wide_buckets=997)),  # hashed item crosses
    ("pnn", SPEC_PROFILE, ModelConfig(embedding_dim=4)),
    ("deepfm", SPEC_PROFILE, ModelConfig(embedding_dim=4)),
    ("din_dice", SPEC_PROFILE, ModelConfig(embedding_dim=4)),
    ("din_dice", SPEC, ModelConfig(embedding_dim=4, attention_softmax=True)),
]
IDS = ["din", "base", "din_softmax_profile", "base_profile", "lr", "wdl", "pnn", "deepfm", "din_dice", "din_dice_softmax"]


def trained_like(name, spec, config, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, spec, config).eval()
    with torch.no_grad():  # spread the outputs out, like a trained model's
        for p in model.parameters():
            p.mul_(3.0)
            if not p.any():  # zero-initialised first-order / cross weights
                p.normal_(0.0, 0.3)
        for m in model.modules():
            if isinstance(m, Dice):  # frozen statistics as after training
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def exported():
    return {i: (m := trained_like(*case), to_onnx(m, case[1])) for i, case in zip(IDS, CASES)}


@pytest.mark.parametrize("case_id,case", list(zip(IDS, CASES)))
def test_onnx_matches_torch_on_random_user_batches(exported, case_id, case):
    _, spec, _ = case
    model, onnx_bytes = exported[case_id]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    for users, slots, candidates, seed in [(4, 9, 33, 0), (1, 3, 5, 1), (7, 1, 7, 2), (3, 25, 200, 3)]:
        x = random_inputs(spec, users, slots, candidates, seed)
        if users > 1 and slots > 2:  # ragged histories with unknown ids
            assert (x[hist_input("item_id")] == PAD_ROW).any() and (x[hist_input("item_id")] == UNK_ROW).any()
        want_ctr, want_att = torch_scores(model, spec, x)
        got_ctr, got_att = session.run(list(OUTPUT_NAMES), x)
        assert got_ctr.shape == (candidates,) and got_att.shape == (candidates, slots)
        assert got_ctr.dtype == np.float32 and got_att.dtype == np.float32
        assert np.max(np.abs(got_ctr - want_ctr)) <= 1e-5
        assert np.max(np.abs(got_att - want_att)) <= 1e-5
    assert check_parity(model, spec, onnx_bytes) <= 1e-5


def test_every_registered_model_has_a_parity_case():
    from model.registry import MODELS

    assert {case[0] for case in CASES} == set(MODELS)


def test_dice_exports_as_elementwise_ops_on_frozen_statistics(exported):
    """No batch statistics in the graph: one candidate scores the same alone as in a batch."""
    model, onnx_bytes = exported["din_dice"]
    ops = {n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node}
    assert not ops & {"ReduceMean", "BatchNormalization"}
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = random_inputs(SPEC_PROFILE, 3, 6, 20, seed=8)
    ctr, _ = session.run(list(OUTPUT_NAMES), x)
    one = dict(x)
    for name in x:
        if name.startswith("cand_"):
            one[name] = x[name][5:6]
    ctr_one, _ = session.run(list(OUTPUT_NAMES), one)
    assert abs(float(ctr_one[0]) - float(ctr[5])) <= 1e-6


@pytest.mark.parametrize("case_id,case", list(zip(IDS, CASES)))
def test_graph_names_and_dynamic_axes_follow_the_contract(exported, case_id, case):
    _, spec, _ = case
    graph = onnx.load_from_string(exported[case_id][1]).graph
    assert [i.name for i in graph.input] == spec.input_names()
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    for i in graph.input:
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64, i.name
        dims = [d.dim_param for d in i.type.tensor_type.shape.dim]
        if i.name.startswith("hist_"):
            assert dims == ["U", "T"]
        elif i.name.startswith("profile_"):
            assert dims == ["U"]
        else:
            assert dims == ["N"]
    out_dims = {o.name: [d.dim_param for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert out_dims == {"ctr": ["N"], "attention": ["N", "T"]}


def test_base_model_exports_zero_attention(exported):
    model, onnx_bytes = exported["base"]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    _, att = session.run(list(OUTPUT_NAMES), random_inputs(SPEC, 3, 6, 11, seed=5))
    assert att.shape == (11, 6) and np.all(att == 0)


def test_din_attention_is_zero_on_padding_in_onnx(exported):
    _, onnx_bytes = exported["din"]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = random_inputs(SPEC, 4, 8, 40, seed=6)
    _, att = session.run(list(OUTPUT_NAMES), x)
    pad = (x[hist_input("item_id")] == PAD_ROW)[x[CAND_USER]]
    assert pad.any() and np.all(att[pad] == 0) and np.all(att[~pad] != 0)


def test_parity_check_fails_loudly_on_a_wrong_graph(exported):
    model, _ = exported["din"]
    other = to_onnx(trained_like("din", SPEC, ModelConfig(embedding_dim=4), seed=1), SPEC)
    with pytest.raises(ParityError, match="disagree"):
        check_parity(model, SPEC, other)


def test_export_bundle_writes_a_loadable_bundle(tmp_path):
    model = trained_like("din", SPEC, ModelConfig(embedding_dim=4))
    vocabularies = {"item_id": Vocabulary(np.arange(100, 148)), "cate_id": Vocabulary(np.arange(1, 7))}
    result = export_bundle(
        model,
        model_type="din",
        spec=SPEC,
        vocabularies=vocabularies,
        out_dir=tmp_path,
        data_fingerprint="0123456789abcdef",
        extra={"model_config": ModelConfig(embedding_dim=4).to_json(), "metrics": {"test": {"auc": 0.7}}},
    )
    bundle = load_bundle(result.bundle)
    assert bundle.model_type == "din" and bundle.has_attention
    assert bundle.manifest["parity_max_abs_diff"] == result.parity_max_abs_diff <= 1e-5
    assert bundle.manifest["data_fingerprint"] == "0123456789abcdef"
    assert bundle.manifest["model_config"]["embedding_dim"] == 4
    assert bundle.manifest["metrics"]["test"]["auc"] == 0.7
    np.testing.assert_array_equal(bundle.vocabularies["item_id"].ids, np.arange(100, 148))
    # the bundle's graph scores like the model
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    x = random_inputs(SPEC, 2, 4, 6, seed=9)
    np.testing.assert_allclose(session.run(["ctr"], x)[0], torch_scores(model, SPEC, x)[0], rtol=0, atol=1e-5)


def test_a_bundle_with_undefined_metrics_is_strict_json(tmp_path):
    """A run whose GAUC is undefined (NaN) wrote `NaN` into bundle.json, which JSON parsers refuse."""
    import json

    from model.bundle import MANIFEST, write_bundle

    spec = FeatureSpec(vocab_sizes={"item_id": 5, "cate_id": 4}, max_history=3)
    vocabs = {"item_id": Vocabulary(np.arange(3)), "cate_id": Vocabulary(np.arange(2))}
    path = write_bundle(tmp_path, model_version="din-x", model_type="din", spec=spec, vocabularies=vocabs,
                        onnx_bytes=b"", extra={"metrics": {"auc": 0.7, "gauc": float("nan")}})  # fmt: skip

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    manifest = json.loads((path / MANIFEST).read_text(), parse_constant=refuse)
    assert manifest["metrics"] == {"auc": 0.7, "gauc": None}
