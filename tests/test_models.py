"""Every model: shapes, padding never matters, user batching is exact; DIN's attention; each baseline's formula."""

import itertools

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.contract import CAND_USER, PAD_ROW, UNK_ROW, FeatureSpec, cand_input, hist_input, profile_input
from model.dice import Dice
from model.embedding import IdTable
from model.export import random_inputs
from model.inputs import split_inputs
from model.interactions import fm_interaction, inner_products, pair_index
from model.registry import MODELS, build_model

SPEC = FeatureSpec(vocab_sizes={"item_id": 40, "cate_id": 9}, max_history=20)
SPEC_PROFILE = FeatureSpec(profile_fields=("gender",), vocab_sizes={"item_id": 40, "cate_id": 9, "gender": 4}, max_history=20)
CONFIGS = {
    "din": ("din", ModelConfig(embedding_dim=4)),
    "din_softmax": ("din", ModelConfig(embedding_dim=4, attention_softmax=True)),
    "din_dice": ("din_dice", ModelConfig(embedding_dim=4)),
    "base": ("base", ModelConfig(embedding_dim=4)),
    "lr": ("lr", ModelConfig(embedding_dim=4)),
    "wdl": ("wdl", ModelConfig(embedding_dim=4, wide_buckets=997)),  # 40^2 > 997: hashed item crosses
    "pnn": ("pnn", ModelConfig(embedding_dim=4)),
    "deepfm": ("deepfm", ModelConfig(embedding_dim=4)),
}
ATTENTION = {"din", "din_softmax", "din_dice"}


def make(key, spec=SPEC, seed=0):
    """A model in eval mode whose weights are spread out like a trained one's (no zero tables left)."""
    name, config = CONFIGS[key]
    torch.manual_seed(seed)
    model = build_model(name, spec, config).eval()
    with torch.no_grad():  # make the outputs spread, so differences show
        for p in model.parameters():
            p.mul_(3.0)
            if not p.any():  # zero-initialised first-order / cross weights
                p.normal_(0.0, 0.3)
        for m in model.modules():
            if isinstance(m, Dice):  # frozen statistics away from the (0, 1) defaults
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
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
@pytest.mark.parametrize("spec", [SPEC, SPEC_PROFILE], ids=["no_profile", "profile"])
def test_every_model_maps_the_contract_inputs_to_logit_and_attention(key, spec):
    model = make(key, spec)
    x = inputs(spec, users=3, slots=7, candidates=11)
    with torch.no_grad():
        logit, att = model(*split_inputs(spec, x))
    assert logit.shape == (11,) and att.shape == (11, 7)
    assert logit.dtype == torch.float32 and att.dtype == torch.float32
    assert torch.isfinite(logit).all() and torch.isfinite(att).all()
    assert logit.std() > 1e-3  # candidates are told apart
    if key not in ATTENTION:
        assert torch.all(att == 0) and not getattr(model, "has_attention", False)
    else:
        assert model.has_attention


@pytest.mark.parametrize("key", list(CONFIGS))
def test_padding_row_content_never_changes_a_score(key):
    model = make(key)
    x = inputs()
    ctr, att = score(model, x)
    with torch.no_grad():
        for table in model.modules():
            if isinstance(table, IdTable):
                table.weight[PAD_ROW] = torch.randn(table.weight.shape[1]) * 5  # garbage in the padding row
    ctr2, att2 = score(model, x)
    assert torch.equal(ctr, ctr2)
    assert torch.equal(att, att2)


@pytest.mark.parametrize("key", sorted(ATTENTION))
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
    assert list(MODELS) == ["lr", "base", "wdl", "pnn", "deepfm", "din", "din_dice"]
    with pytest.raises(ValueError, match="din"):
        build_model("nope", SPEC)
    c = ModelConfig(embedding_dim=8, attention_softmax=True, activation="dice", wide_buckets=101)
    assert ModelConfig.from_json(c.to_json()) == c
    old = {"embedding_dim": 8, "attention_hidden": [80, 40], "mlp_hidden": [200, 80], "attention_softmax": False}
    assert ModelConfig.from_json(old).activation == "prelu"  # a bundle from before Dice
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="relu")
    assert build_model("din_dice", SPEC).config.activation == "dice"
    assert build_model("din", SPEC).config.activation == "prelu"
    assert profile_input("gender") in SPEC_PROFILE.input_names()


def test_constructor_does_not_touch_the_global_seed_state_beyond_init():
    torch.manual_seed(123)
    a = build_model("din", SPEC)
    torch.manual_seed(123)
    b = build_model("din", SPEC)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert np.isfinite(sum(p.sum().item() for p in a.parameters()))


# ---------------------------------------------------------------- each baseline's formula, computed literally

def parts(spec, x):
    hist, profile, cand, cand_user = split_inputs(spec, x)
    mask = (hist["item_id"] != PAD_ROW)  # (U, T)
    return hist, profile, cand, cand_user, mask


def test_lr_is_a_sum_of_id_weights_with_the_history_as_a_bag():
    model = make("lr", SPEC_PROFILE)
    x = inputs(SPEC_PROFILE, users=3, slots=6, candidates=9, seed=4)
    hist, profile, cand, cand_user, mask = parts(SPEC_PROFILE, x)
    lin = model.linear
    with torch.no_grad():
        logit, _ = model(hist, profile, cand, cand_user)
        for n in range(9):
            u = int(cand_user[n])
            want = float(lin.bias)
            want += sum(float(lin.ad[f].weight[cand[f][n], 0]) for f in ("item_id", "cate_id"))
            want += float(lin.user["gender"].weight[profile["gender"][u], 0])
            for t in range(6):
                if mask[u, t]:
                    want += sum(float(lin.bag[f].weight[hist[f][u, t], 0]) for f in ("item_id", "cate_id"))
            assert float(logit[n]) == pytest.approx(want, abs=1e-5)


def test_wide_part_sums_one_weight_per_behaviour_x_candidate_pair():
    model = make("wdl")
    x = inputs(users=3, slots=6, candidates=9, seed=5)
    hist, profile, cand, cand_user, mask = parts(SPEC, x)
    wide = model.wide
    assert wide.rows == {"item_id": 997, "cate_id": 81}  # 40^2 hashed into 997; 9^2 exact
    with torch.no_grad():
        got = wide(hist, cand, cand_user, mask)
        for n in range(9):
            u = int(cand_user[n])
            want = 0.0
            for t in range(6):
                if mask[u, t]:
                    for f in ("item_id", "cate_id"):
                        v = SPEC.vocab_sizes[f]
                        row = (int(hist[f][u, t]) * v + int(cand[f][n])) % wide.rows[f]
                        want += float(wide.tables[f].weight[row, 0])
            assert float(got[n]) == pytest.approx(want, abs=1e-5)
    # exact crosses: distinct (behaviour, candidate) category pairs get distinct rows
    pairs = torch.tensor(list(itertools.product(range(9), range(9))))
    rows = wide.cross_rows("cate_id", pairs[:, :1], pairs[:, 1])
    assert rows.unique().numel() == 81


def test_inner_products_and_fm_match_their_definitions():
    v = torch.randn(5, 4, 3)
    got = inner_products(v, pair_index(4))
    want = torch.stack([(v[:, i] * v[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4)], dim=1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(fm_interaction(v), want.sum(1), rtol=1e-5, atol=1e-5)


def test_pnn_and_deepfm_see_the_pooled_history_and_the_ad_as_fields():
    """Both use the fields [profile, sum-pooled item, sum-pooled cate, ad item, ad cate]."""
    for key in ("pnn", "deepfm"):
        model = make(key, SPEC_PROFILE)
        assert len(model.embed.per_field(torch.zeros(1, 5 * 4))) == 5
    pnn = make("pnn", SPEC_PROFILE)
    first = [m for m in pnn.mlp if isinstance(m, torch.nn.Linear)][0]
    assert first.in_features == 5 * 4 + 10  # fields + their 10 pairwise products
    deepfm = make("deepfm", SPEC_PROFILE)
    x = inputs(SPEC_PROFILE, users=3, slots=6, candidates=9, seed=6)
    hist, profile, cand, cand_user, mask = parts(SPEC_PROFILE, x)
    with torch.no_grad():
        logit, _ = deepfm(hist, profile, cand, cand_user)
        e = deepfm.embed.behaviours(hist)
        pooled = (e * mask.unsqueeze(-1)).sum(1)  # (U, 8)
        user = torch.cat([deepfm.embed.profile(profile), pooled], -1)[cand_user]
        xf = torch.cat([user, deepfm.embed.ads(cand)], -1)  # (N, 20)
        v = xf.reshape(9, 5, 4)
        fm = sum((v[:, i] * v[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
        want = deepfm.linear(hist, profile, cand, cand_user, mask) + fm + deepfm.mlp(xf).squeeze(-1)
    torch.testing.assert_close(logit, want, rtol=0, atol=1e-5)
