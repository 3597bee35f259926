"""The optimised formulations (WSI pooling from raw patches, stacked bucketed group MLPs)
equal the plain per-reference formulations, values and gradients, with padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_layouts, tiny_model_config
from flax import nnx

from morpheus_jax.model.morpheus import init_model
from morpheus_jax.model.params import ParamCodec
from morpheus_jax.model.wsi_pool import attention_pool, attention_pool_reference


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def literal_wsi_tokenizer(p, x, mask):
    """§2 as written: project every patch to K and V."""
    kv = _ln(x, p["kv_norm.weight"], p["kv_norm.bias"])
    k = kv @ p["k_proj.kernel"] + p["k_proj.bias"]
    v = kv @ p["v_proj.kernel"] + p["v_proj.bias"]
    q = _ln(p["prototypes"], p["q_norm.weight"], p["q_norm.bias"])
    scores = jnp.einsum("ph,bnh->bpn", q, k) * q.shape[-1] ** -0.5
    scores = jnp.where(mask[:, None, :], scores, -jnp.inf)
    out = jax.nn.softmax(scores, -1) @ v @ p["output_proj.kernel"] + p["output_proj.bias"]
    return _ln(out, p["out_norm.weight"], p["out_norm.bias"])


def _randomised_tokenizer_params(model, rng):
    params = {}
    for path, var in nnx.to_flat_state(nnx.state(model.wsi_tokenizer, nnx.Param)):
        name = ".".join(map(str, path))
        value = np.asarray(var[...])
        noise = rng.normal(size=value.shape).astype(np.float32)
        params[name] = jnp.asarray(1 + 0.3 * noise if name.endswith("norm.weight") else value + 0.2 * noise)
    return params


def test_wsi_tokenizer_values_and_gradients(layouts):
    model = init_model(tiny_model_config(), layouts, 0)
    rng = np.random.default_rng(0)
    params = _randomised_tokenizer_params(model, rng)
    x = jnp.asarray(rng.normal(size=(3, 40, 24)) * 1.5 + 0.4, jnp.float32)
    mask = np.ones((3, 40), bool)
    mask[1, 23:] = False
    x = x.at[1, 23:].set(1e3)  # garbage under the padding
    mask = jnp.asarray(mask)
    ct = jnp.asarray(rng.normal(size=(3, 4, 32)), jnp.float32)
    graph, _ = nnx.split(model.wsi_tokenizer, nnx.Param)

    def ours(p):
        tok = nnx.merge(graph, nnx.from_flat_state({tuple(k.split(".")): nnx.Param(v) for k, v in p.items()}))
        return jnp.sum(tok(x, mask) * ct)

    def plain(p):
        return jnp.sum(literal_wsi_tokenizer(p, x, mask) * ct)

    v1, g1 = jax.jit(jax.value_and_grad(ours))(params)
    v2, g2 = jax.jit(jax.value_and_grad(plain))(params)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for name in params:
        scale = float(jnp.abs(g2[name]).max()) + 1e-6
        np.testing.assert_allclose(np.asarray(g1[name]), np.asarray(g2[name]), atol=1e-5 * max(scale, 1.0), rtol=1e-4,
                                   err_msg=name)
    # k_proj.bias cannot change a softmax over patches: its gradient is zero in both.
    assert float(jnp.abs(g2["k_proj.bias"]).max()) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_attention_pool_matches_materialised_form(dtype):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 33, 20)) + 0.3, dtype)
    mask = jnp.asarray(rng.random((2, 33)) > 0.2)
    w, b = jnp.asarray(1 + 0.2 * rng.normal(size=20), jnp.float32), jnp.asarray(0.2 * rng.normal(size=20), jnp.float32)
    qk = jnp.asarray(rng.normal(size=(5, 20)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(2, 5, 20)), jnp.float32)
    fast = jax.value_and_grad(lambda *a: jnp.sum(attention_pool(x, mask, *a, 0.2, 1e-5) * ct), argnums=(0, 1, 2))
    slow = jax.value_and_grad(lambda *a: jnp.sum(attention_pool_reference(x, mask, *a, 0.2, 1e-5) * ct),
                              argnums=(0, 1, 2))
    (v1, g1), (v2, g2) = fast(w, b, qk), slow(w, b, qk)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("buckets", [1, 3])
def test_group_mlps_values_and_gradients(buckets):
    """Stacked, bucketed group MLPs vs one MLP per group (the authors' layout): values and
    per-group weight gradients equal; bucket padding gets no gradient."""
    layouts = make_layouts(buckets=buckets)
    model = init_model(tiny_model_config(), layouts, 0)
    codec = ParamCodec(model)
    flat = codec.flatten(model)
    rng = np.random.default_rng(2)
    m, lay = "rna", layouts["rna"]
    x = jnp.asarray(rng.normal(size=(4, lay.num_features)), jnp.float32)
    tokens_ct = jnp.asarray(rng.normal(size=(4, lay.num_groups, 32)), jnp.float32)
    dec_in = jnp.asarray(rng.normal(size=(4, lay.num_groups, 32)), jnp.float32)
    out_ct = jnp.asarray(rng.normal(size=(4, lay.total_size)), jnp.float32)
    tok, rev = f"omics_tokenizers.{m}", f"omics_decoders.{m}.reverse_tokenizer"

    def ours(p):
        mdl = codec.model(p)
        return (jnp.sum(mdl.omics_tokenizers[m](x) * tokens_ct)
                + jnp.sum(mdl.omics_decoders[m].reverse_tokenizer(dec_in) * out_ct))

    off = lay.entry_offsets()

    def rows(g):
        return slice(int(off[g]), int(off[g + 1]))

    # Per-group weights cut out of the canonical stacks: the authors' one-MLP-per-group model.
    per_group = {}
    for g, feats in enumerate(lay.feature_index):
        per_group[g] = {
            "t1w": flat[f"{tok}.w1"][rows(g)], "t1b": flat[f"{tok}.b1"][g],
            "t2w": flat[f"{tok}.w2"][g], "t2b": flat[f"{tok}.b2"][g],
            "r1w": flat[f"{rev}.w1"][g], "r1b": flat[f"{rev}.b1"][g],
            "r2w": flat[f"{rev}.w2"][rows(g)].T, "r2b": flat[f"{rev}.b2"][rows(g)]}

    def plain(pg):
        total, start = 0.0, 0
        for g, feats in enumerate(lay.feature_index):
            w = pg[g]
            h = jax.nn.elu(x[:, list(feats)] @ w["t1w"] + w["t1b"])
            total += jnp.sum(jax.nn.elu(h @ w["t2w"] + w["t2b"]) * tokens_ct[:, g])
            h = jax.nn.elu(dec_in[:, g] @ w["r1w"] + w["r1b"])
            size = len(feats)
            total += jnp.sum((h @ w["r2w"] + w["r2b"]) * out_ct[:, start: start + size])
            start += size
        return total

    v1, g1 = jax.jit(jax.value_and_grad(ours))(flat)
    v2, g2 = jax.jit(jax.value_and_grad(plain))(per_group)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for g, feats in enumerate(lay.feature_index):
        pairs = [(g1[f"{tok}.w1"][rows(g)], g2[g]["t1w"]), (g1[f"{tok}.b1"][g], g2[g]["t1b"]),
                 (g1[f"{tok}.w2"][g], g2[g]["t2w"]), (g1[f"{rev}.w1"][g], g2[g]["r1w"]),
                 (g1[f"{rev}.w2"][rows(g)].T, g2[g]["r2w"]), (g1[f"{rev}.b2"][rows(g)], g2[g]["r2b"])]
        for a, c in pairs:
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)
    # Every canonical row belongs to exactly one group: the stacks hold no padding to train.
    assert flat[f"{tok}.w1"].shape[0] == flat[f"{rev}.w2"].shape[0] == sum(lay.sizes)
