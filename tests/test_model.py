import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_model, make_layouts, tiny_model_config
from flax import nnx

from morpheus_jax.core.spec import bucket_partition
from morpheus_jax.engine.step import Objective
from morpheus_jax.model.losses import group_l1, masked_mean
from morpheus_jax.model.masking import explicit_keep, random_keep
from morpheus_jax.model.morpheus import init_model
from morpheus_jax.model.params import ParamCodec


def _randomise(model, seed=0, scale=0.3):
    """Non-trivial values everywhere (LayerNorm weights/biases, tokens, biases); bucket
    padding stays zero."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = np.asarray(var[...])
        noise = rng.normal(size=v.shape).astype(np.float32) * scale
        if path[-1] == "weight":  # LayerNorm scale
            new = 1.0 + noise
        elif np.all(v == 0):
            new = noise
        else:
            new = v + 0.3 * noise * (v != 0)
        var[...] = jnp.asarray(new, jnp.float32)
    return model


def _inputs(layouts, b=3, n=20, d=24, seed=0):
    rng = np.random.default_rng(seed)
    wsi = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    mask = jnp.ones((b, n), bool)
    omics = {m: jnp.asarray(rng.normal(size=(b, l.num_features)), jnp.float32) for m, l in layouts.items()}
    return wsi, mask, omics


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def test_wsi_tokenizer_matches_literal_formula(layouts):
    model = _randomise(init_model(tiny_model_config(), layouts, 0))
    tok = model.wsi_tokenizer
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 30, 24)).astype(np.float32)
    valid = np.ones((2, 30), bool)
    valid[0, 17:] = False
    x[0, 17:] = 1e3 * rng.normal(size=(13, 24))  # garbage under the mask
    p = {k: np.asarray(v[...]) for k, v in [
        ("kvw", tok.kv_norm.weight), ("kvb", tok.kv_norm.bias), ("wk", tok.k_proj.kernel), ("bk", tok.k_proj.bias),
        ("wv", tok.v_proj.kernel), ("bv", tok.v_proj.bias), ("qw", tok.q_norm.weight), ("qb", tok.q_norm.bias),
        ("proto", tok.prototypes), ("wo", tok.output_proj.kernel), ("bo", tok.output_proj.bias),
        ("ow", tok.out_norm.weight), ("ob", tok.out_norm.bias)]}
    assert np.abs(p["bk"]).max() > 0
    kv = _ln(x.astype(np.float64), p["kvw"], p["kvb"])
    keys, values = kv @ p["wk"] + p["bk"], kv @ p["wv"] + p["bv"]
    q = _ln(p["proto"].astype(np.float64), p["qw"], p["qb"])
    h = q.shape[-1]
    scores = np.einsum("ph,bnh->bpn", q, keys) / np.sqrt(h)
    scores = np.where(valid[:, None, :], scores, -np.inf)
    a = np.exp(scores - scores.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    expected = _ln(np.einsum("bpn,bnh->bph", a, values) @ p["wo"] + p["bo"], p["ow"], p["ob"])
    got = np.asarray(nnx.jit(lambda t, a, b: t(a, b))(tok, jnp.asarray(x), jnp.asarray(valid)))
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_loss_matches_numpy(layouts):
    rng = np.random.default_rng(2)
    b = 4
    omics = {m: rng.normal(size=(b, l.num_features)).astype(np.float32) for m, l in layouts.items()}
    preds = {m: rng.normal(size=(b, l.total_size)).astype(np.float32) for m, l in layouts.items()}
    mask = rng.integers(0, 2, size=(b, sum(l.num_groups for l in layouts.values()))).astype(np.int32)
    mask[:, :6] = 0
    mask[1, 2] = 1  # one masked rna group in the whole batch
    avail = np.ones((b, 3), bool)
    avail[3, 2] = False  # no loss on a missing modality
    obj = Objective(layouts)
    total, losses = obj.reduce(obj.parts(preds, omics, explicit_keep(mask), jnp.asarray(avail)))
    expected, off = {}, 0
    for mi, (m, l) in enumerate(layouts.items()):
        errs, weights = [], []
        start = 0
        for g, feats in enumerate(l.feature_index):
            size = len(feats)
            err = np.abs(preds[m][:, start: start + size] - omics[m][:, list(feats)]).mean(1)
            start += size
            errs.append(err)
            weights.append(mask[:, off + g] * avail[:, mi])
        errs, weights = np.stack(errs, 1), np.stack(weights, 1)
        expected[m] = (errs * weights).sum() / weights.sum()
        off += l.num_groups
    for m in layouts:
        np.testing.assert_allclose(float(losses[m]), expected[m], rtol=1e-5)
    np.testing.assert_allclose(float(total), sum(expected.values()), rtol=1e-5)
    assert float(masked_mean(jnp.ones((2, 3)), jnp.zeros((2, 3)))) == 0.0
    gm = jnp.asarray(layouts["rna"].group_mean_matrix())
    assert group_l1(jnp.zeros((1, layouts["rna"].total_size)), jnp.ones((1, layouts["rna"].total_size)), gm).shape == (1, 6)


def test_bucket_partition_is_optimal():
    sizes = [196, 188, 71, 195, 41, 53, 86, 138, 30, 31]
    for nb in (1, 2, 3, 4):
        buckets = bucket_partition(sizes, nb)
        assert sorted(g for b in buckets for g in b) == list(range(len(sizes)))
        cost = sum(len(b) * max(sizes[g] for g in b) for b in buckets)
        best = min(sum(len(c) * max(sizes[g] for g in c) for c in part)
                   for part in _contiguous_partitions(sorted(range(len(sizes)), key=lambda g: sizes[g]), nb))
        assert cost == best


def _contiguous_partitions(order, nb):
    n = len(order)
    for k in range(1, nb + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0,) + cuts + (n,)
            yield [order[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("buckets", [1, 3])
def test_grouped_mlps_equal_per_group_mlps(buckets):
    layouts = make_layouts(buckets=buckets)
    model = init_model(tiny_model_config(), layouts, 0)
    rng = np.random.default_rng(3)
    for m, l in layouts.items():
        x = rng.normal(size=(2, l.num_features)).astype(np.float32)
        tok = model.omics_tokenizers[m]
        rev = model.omics_decoders[m].reverse_tokenizer
        got = np.asarray(tok(jnp.asarray(x)))
        tokens = rng.normal(size=(2, l.num_groups, 32)).astype(np.float32)
        got_rev = np.asarray(rev(jnp.asarray(tokens)))
        elu = lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0)))
        off = l.entry_offsets()
        for g, feats in enumerate(l.feature_index):
            rows = slice(off[g], off[g + 1])            # the group's rows of the canonical stacks
            w1 = np.asarray(tok.w1[...])[rows]
            h = elu(x[:, list(feats)] @ w1 + np.asarray(tok.b1[...])[g])
            want = elu(h @ np.asarray(tok.w2[...])[g] + np.asarray(tok.b2[...])[g])
            np.testing.assert_allclose(got[:, g], want, atol=1e-5, rtol=1e-5)
            h = elu(tokens[:, g] @ np.asarray(rev.w1[...])[g] + np.asarray(rev.b1[...])[g])
            want = h @ np.asarray(rev.w2[...])[rows].T + np.asarray(rev.b2[...])[rows]
            np.testing.assert_allclose(got_rev[:, rows], want, atol=1e-5, rtol=1e-5)


def test_bucket_count_does_not_change_the_stored_layout():
    """Parameters have the same names and shapes whatever model.group_buckets is, and a
    model built with one bucket count computes the same function with another."""
    small, big = make_layouts(buckets=1), make_layouts(buckets=3)
    a = ParamCodec(init_model(tiny_model_config(), small, 0))
    b = ParamCodec(init_model(tiny_model_config(), big, 0))
    assert a.names == b.names and a.shapes == b.shapes
    params = a.flatten(init_model(tiny_model_config(), small, 0))
    rng = np.random.default_rng(4)
    for m, lay in small.items():
        x = jnp.asarray(rng.normal(size=(2, lay.num_features)).astype(np.float32))
        tokens = jnp.asarray(rng.normal(size=(2, lay.num_groups, 32)).astype(np.float32))
        ma, mb = a.model(params), b.model(params)
        np.testing.assert_allclose(np.asarray(ma.omics_tokenizers[m](x)), np.asarray(mb.omics_tokenizers[m](x)),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ma.omics_decoders[m].reverse_tokenizer(tokens)),
                                   np.asarray(mb.omics_decoders[m].reverse_tokenizer(tokens)), rtol=1e-6, atol=1e-6)


SUBSETS = [s for r in range(4) for s in itertools.combinations(("rna", "dnam", "cnv"), r)]


@pytest.mark.parametrize("with_wsi", [True, False])
@pytest.mark.parametrize("subset", SUBSETS)
def test_shapes_every_modality_subset(layouts, subset, with_wsi):
    if not subset and not with_wsi:
        pytest.skip("nothing to encode")
    model = init_model(tiny_model_config(), layouts, 0)
    wsi, mask, omics = _inputs(layouts)
    omics = {m: omics[m] for m in subset}
    t = sum(layouts[m].num_groups for m in subset)
    enc, valid = nnx.jit(lambda mdl, w, k, o: mdl.encode(w, k, o))(
        model, wsi if with_wsi else None, mask if with_wsi else None, omics)
    assert enc.shape == (3, 1 + (4 if with_wsi else 0) + t, 32)
    assert bool(valid.all())
    out = jit_model(model)(wsi if with_wsi else None, mask if with_wsi else None, omics)
    assert {m: v.shape for m, v in out.items()} == {m: (3, l.total_size) for m, l in layouts.items()}
    assert all(bool(jnp.isfinite(v).all()) for v in out.values())


def test_training_plan_sequence_length_and_wsi_always_seen(layouts):
    model = init_model(tiny_model_config(), layouts, 0)
    wsi, mask, omics = _inputs(layouts)
    plan = random_keep(jax.random.key(0), (6, 5, 4), 0.75, 3)
    enc, valid = nnx.jit(lambda mdl, w, k, o, p: mdl.encode(w, k, o, p))(model, wsi, mask, omics, plan)
    assert enc.shape == (3, 1 + 4 + 3, 32)
    assert bool(valid[:, : 1 + 4].all())
    # WSI tokens are never masked: changing the bag changes every prediction under any plan.
    fwd = jit_model(model)
    out1 = fwd(wsi, mask, omics, plan)
    other = jnp.asarray(np.random.default_rng(9).normal(size=wsi.shape), jnp.float32)
    out2 = fwd(other, mask, omics, plan)
    for m in layouts:
        assert bool((jnp.abs(out1[m] - out2[m]).max(axis=1) > 1e-4).all())


def test_padded_patches_under_mask_leave_outputs_unchanged(layouts):
    model = _randomise(init_model(tiny_model_config(), layouts, 0))
    wsi, mask, omics = _inputs(layouts, n=20)
    plan = explicit_keep(np.random.default_rng(0).integers(0, 2, size=(3, 15)))
    fwd = jit_model(model)
    ref = fwd(wsi, mask, omics, plan)
    pad = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12, 24)) * 50, jnp.float32)
    wsi2 = jnp.concatenate([wsi, pad], 1)
    mask2 = jnp.concatenate([mask, jnp.zeros((3, 12), bool)], 1)
    out = fwd(wsi2, mask2, omics, plan)
    for m in layouts:
        np.testing.assert_allclose(np.asarray(out[m]), np.asarray(ref[m]), atol=1e-5, rtol=1e-5)


def test_masked_group_inputs_are_invisible(layouts):
    """Explicit masks respected: a hidden group's values cannot reach any output."""
    model = _randomise(init_model(tiny_model_config(), layouts, 0))
    wsi, mask, omics = _inputs(layouts)
    token_mask = np.zeros((3, 15), int)
    token_mask[:, 2] = 1  # hide rna group 2
    plan = explicit_keep(token_mask)
    fwd = jit_model(model)
    ref = fwd(wsi, mask, omics, plan)
    hidden = list(layouts["rna"].feature_index[2])
    only_hidden = [f for f in hidden if not any(f in g for i, g in enumerate(layouts["rna"].feature_index) if i != 2)]
    assert only_hidden
    changed = dict(omics)
    changed["rna"] = omics["rna"].at[:, only_hidden].add(5.0)
    out = fwd(wsi, mask, changed, plan)
    for m in layouts:
        np.testing.assert_allclose(np.asarray(out[m]), np.asarray(ref[m]), atol=1e-6)
    # The same change with the group visible does change the outputs.
    visible = explicit_keep(np.zeros((3, 15), int))
    diff = fwd(wsi, mask, changed, visible)["rna"] - fwd(wsi, mask, omics, visible)["rna"]
    assert float(jnp.abs(diff).max()) > 1e-4


def test_eval_deterministic_dropout_in_training(layouts):
    model = _randomise(init_model(tiny_model_config(encoder_dropout=0.3, decoder_dropout=0.2), layouts, 0))
    wsi, mask, omics = _inputs(layouts)
    plan = random_keep(jax.random.key(0), (6, 5, 4), 0.75, 3)
    fwd = jit_model(model)
    a = fwd(wsi, mask, omics, plan)
    b = fwd(wsi, mask, omics, plan)
    c = fwd(wsi, mask, omics, plan, key=jax.random.key(1))
    d = fwd(wsi, mask, omics, plan, key=jax.random.key(1))
    for m in layouts:
        np.testing.assert_array_equal(np.asarray(a[m]), np.asarray(b[m]))
        np.testing.assert_array_equal(np.asarray(c[m]), np.asarray(d[m]))
        assert float(jnp.abs(a[m] - c[m]).max()) > 1e-4


def test_generation_uses_mask_tokens_only(layouts):
    """Decode mode ignores the target's own values: they are not an input."""
    model = _randomise(init_model(tiny_model_config(), layouts, 0))
    wsi, mask, omics = _inputs(layouts)
    gen = jit_model(model, targets=("rna",))
    g1 = gen(wsi, mask, {"dnam": omics["dnam"]})["rna"]
    g2 = gen(wsi, mask, {"dnam": omics["dnam"] + 1.0})["rna"]
    assert float(jnp.abs(g1 - g2).max()) > 1e-5  # conditioned on the inputs
    assert g1.shape == (3, layouts["rna"].total_size)


def test_prototypes_start_at_zero_by_default_and_nothing_else_changes(layouts):
    """model.prototype_init: the authors' zeros by default; "normal" draws them from the same
    random stream, so every other initial weight is identical."""
    import dataclasses

    from morpheus_jax.core.config import ModelConfig

    assert ModelConfig().prototype_init == "zeros"
    normal = ParamCodec(init_model(tiny_model_config(), layouts, 0))
    zeros_cfg = dataclasses.replace(tiny_model_config(), prototype_init="zeros")
    zeros = ParamCodec(init_model(zeros_cfg, layouts, 0))
    a, b = normal.flatten(init_model(tiny_model_config(), layouts, 0)), zeros.flatten(init_model(zeros_cfg, layouts, 0))
    assert not np.any(np.asarray(b["wsi_tokenizer.prototypes"])) and np.std(np.asarray(a["wsi_tokenizer.prototypes"])) > 0.01
    for name in a:
        if name != "wsi_tokenizer.prototypes":
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
