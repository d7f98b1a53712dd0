"""DIN and BaseModel: padding never matters, attention follows the candidate, user batching is exact."""

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.contract import CAND_USER, PAD_ROW, UNK_ROW, FeatureSpec, cand_input, hist_input, profile_input
from model.export import random_inputs
from model.inputs import split_inputs
from model.registry import MODELS, build_model

SPEC = FeatureSpec(vocab_sizes={"item_id": 40, "cate_id": 9}, max_history=20)
SPEC_PROFILE = FeatureSpec(profile_fields=("gender",), vocab_sizes={"item_id": 40, "cate_id": 9, "gender": 4}, max_history=20)
CONFIGS = {
    "din": ("din", ModelConfig(embedding_dim=4)),
    "din_softmax": ("din", ModelConfig(embedding_dim=4, attention_softmax=True)),
    "base": ("base", ModelConfig(embedding_dim=4)),
}


def make(key, spec=SPEC, seed=0):
    name, config = CONFIGS[key]
    torch.manual_seed(seed)
    model = build_model(name, spec, config).eval()
    with torch.no_grad():  # make the attention MLP's output spread, so differences show
        for p in model.parameters():
            p.mul_(3.0)
    return model


def inputs(spec=SPEC, users=4, slots=6, candidates=10, seed=0):
    return {k: torch.from_numpy(v) for k, v in random_inputs(spec, users, slots, candidates, seed).items()}


def score(model, x, spec=SPEC):
    with torch.no_grad():
        logit, attention = model(*split_inputs(spec, x))
    return torch.sigmoid(logit), attention


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("spec", [SPEC, SPEC_PROFILE], ids=["no_profile", "profile"])
def test_appending_padded_slots_never_changes_a_score(key, spec):
    model = make(key, spec)
    x = inputs(spec)
    ctr, att = score(model, x, spec)
    longer = dict(x)
    for f in spec.sequence_fields:
        h = x[hist_input(f)]
        longer[hist_input(f)] = torch.cat([h, torch.full((h.shape[0], 7), PAD_ROW)], dim=1)
    ctr2, att2 = score(model, longer, spec)
    # equal up to float rounding (a matmul over more rows may block its sums differently)
    torch.testing.assert_close(ctr2, ctr, rtol=0, atol=1e-6)
    torch.testing.assert_close(att2[:, : att.shape[1]], att, rtol=0, atol=1e-6)
    assert torch.all(att2[:, att.shape[1] :] == 0)  # the new slots: exactly 0


@pytest.mark.parametrize("key", list(CONFIGS))
def test_padding_row_content_never_changes_a_score(key):
    model = make(key)
    x = inputs()
    ctr, att = score(model, x)
    with torch.no_grad():
        for table in model.embed.tables.values():
            table.weight[PAD_ROW] = torch.randn(table.weight.shape[1]) * 5  # garbage in the padding row
    ctr2, att2 = score(model, x)
    assert torch.equal(ctr, ctr2)
    assert torch.equal(att, att2)


@pytest.mark.parametrize("key", ["din", "din_softmax"])
def test_padding_positions_have_attention_exactly_zero(key):
    model = make(key)
    x = inputs(users=5, slots=8, candidates=30)
    _, att = score(model, x)
    mask = (x[hist_input("item_id")] != PAD_ROW)[x[CAND_USER]]  # (N, T)
    assert (~mask).any() and mask.any()
    assert torch.all(att[~mask] == 0.0)
    assert torch.all(att[mask] != 0.0)
    # user 0 of random_inputs has an empty history: all zeros, and a finite score
    empty = x[CAND_USER] == 0
    assert empty.any() and torch.all(att[empty] == 0.0)
    assert torch.isfinite(score(model, x)[0]).all()


def test_softmax_option_normalises_over_real_behaviours_only():
    model = make("din_softmax")
    x = inputs(users=5, slots=8, candidates=30)
    _, att = score(model, x)
    lengths = (x[hist_input("item_id")] != PAD_ROW).sum(1)[x[CAND_USER]]
    sums = att.sum(1)
    torch.testing.assert_close(sums[lengths > 0], torch.ones(int((lengths > 0).sum())), rtol=0, atol=1e-6)
    assert torch.all(sums[lengths == 0] == 0)


def two_candidates_for_one_user():
    """One user with 5 behaviours, two different candidate ads for that user."""
    x = {
        hist_input("item_id"): torch.tensor([[5, 6, 7, 8, 9, PAD_ROW]]),
        hist_input("cate_id"): torch.tensor([[2, 3, 2, 4, 5, PAD_ROW]]),
        cand_input("item_id"): torch.tensor([5, 30]),
        cand_input("cate_id"): torch.tensor([2, 7]),
        CAND_USER: torch.tensor([0, 0]),
    }
    return x


def mlp_input(model, x):
    captured = []
    handle = model.mlp.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach().clone()))
    score(model, x)
    handle.remove()
    return captured[0]  # (N, 2D): [v_U, v_A]


def test_din_attention_and_interest_change_with_the_candidate():
    model = make("din")
    x = two_candidates_for_one_user()
    _, att = score(model, x)
    assert (att[0, :5] - att[1, :5]).abs().max() > 1e-3
    d = model.embed.behaviour_dim
    v_u = mlp_input(model, x)[:, :d]  # (2, D)
    assert (v_u[0] - v_u[1]).abs().max() > 1e-3


def test_base_model_pooled_vector_does_not_depend_on_the_candidate():
    model = make("base")
    x = two_candidates_for_one_user()
    ctr, att = score(model, x)
    d = model.embed.behaviour_dim
    v_u = mlp_input(model, x)[:, :d]  # (2, D)
    assert torch.equal(v_u[0], v_u[1])
    # and it is the masked sum of the behaviour embeddings
    e = model.embed.behaviours({f: x[hist_input(f)] for f in SPEC.sequence_fields})[0, :5]
    torch.testing.assert_close(v_u[0], e.sum(0), rtol=0, atol=1e-6)
    assert torch.all(att == 0) and att.shape == (2, 6)
    assert ctr[0] != ctr[1]  # the ad itself still matters


def test_split_first_layer_equals_the_papers_concatenation():
    """a(e_j, v_A) = MLP([e_j, v_A, e_j - v_A, e_j * v_A]), computed literally."""
    model = make("din")
    x = inputs(users=3, slots=5, candidates=8)
    _, att = score(model, x)
    unit = model.attention
    with torch.no_grad():
        e = model.embed.behaviours({f: x[hist_input(f)] for f in SPEC.sequence_fields})[x[CAND_USER]]  # (N, T, D)
        v = model.embed.ads({f: x[cand_input(f)] for f in SPEC.sequence_fields}).unsqueeze(1).expand_as(e)
        concat = torch.cat([e, v, e - v, e * v], dim=-1)  # (N, T, 4D)
        w = unit.rest(unit.first_act(unit.first(concat))).squeeze(-1)  # (N, T)
        mask = (x[hist_input("item_id")] != PAD_ROW)[x[CAND_USER]]
        w = torch.where(mask, w, torch.zeros_like(w))
    torch.testing.assert_close(att, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("spec", [SPEC, SPEC_PROFILE], ids=["no_profile", "profile"])
def test_user_batched_scores_equal_one_user_at_a_time(key, spec):
    """Scoring U users in one call == scoring each alone (U = 1): cand_user gathers correctly."""
    model = make(key, spec)
    x = inputs(spec, users=4, slots=6, candidates=12, seed=3)
    ctr, att = score(model, x, spec)
    for u in range(4):
        sel = (x[CAND_USER] == u).nonzero().squeeze(1)
        one = {k: v[u : u + 1] for k, v in x.items() if k.startswith(("hist_", "profile_"))}
        for f in spec.sequence_fields:
            one[cand_input(f)] = x[cand_input(f)][sel]
        one[CAND_USER] = torch.zeros(sel.numel(), dtype=torch.int64)
        ctr_u, att_u = score(model, one, spec)
        torch.testing.assert_close(ctr_u, ctr[sel], rtol=0, atol=1e-6)
        torch.testing.assert_close(att_u, att[sel], rtol=0, atol=1e-6)


def test_unknown_ids_score_through_the_unk_row():
    model = make("din")
    x = inputs()
    x[cand_input("item_id")] = torch.full_like(x[cand_input("item_id")], UNK_ROW)
    ctr, _ = score(model, x)
    assert torch.isfinite(ctr).all()


def test_embedding_padding_row_starts_at_zero_and_tables_are_per_field():
    model = make("din", SPEC_PROFILE)
    assert set(model.embed.tables) == {"item_id", "cate_id", "gender"}
    for name, table in model.embed.tables.items():
        assert table.weight.shape == (SPEC_PROFILE.vocab_sizes[name], 4)
    fresh = build_model("base", SPEC, ModelConfig(embedding_dim=4))
    for table in fresh.embed.tables.values():
        assert torch.all(table.weight[PAD_ROW] == 0)


def test_layer_sizes_follow_the_paper():
    model = build_model("din", SPEC)  # defaults: 16 per field, attention 80-40-1, MLP 200-80-1
    d = 2 * 16
    assert model.attention.first.in_features == 4 * d and model.attention.first.out_features == 80
    linears = [m for m in model.attention.rest if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(80, 40), (40, 1)]
    linears = [m for m in model.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2 * d, 200), (200, 80), (80, 1)]


def test_registry_and_config_round_trip():
    assert set(MODELS) >= {"din", "base"}
    with pytest.raises(ValueError, match="din"):
        build_model("nope", SPEC)
    c = ModelConfig(embedding_dim=8, attention_softmax=True)
    assert ModelConfig.from_json(c.to_json()) == c
    assert profile_input("gender") in SPEC_PROFILE.input_names()


def test_constructor_does_not_touch_the_global_seed_state_beyond_init():
    torch.manual_seed(123)
    a = build_model("din", SPEC)
    torch.manual_seed(123)
    b = build_model("din", SPEC)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert np.isfinite(sum(p.sum().item() for p in a.parameters()))
