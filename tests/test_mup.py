"""µP (`model.parametrization=mup`): the standard model at the base width, per-layer rates and
readout initialisation by fan-in growth, AdamW's first update scaled per layer, and an export
that loads into the authors' module and computes our function (the query factor folded)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_layouts, tiny_model_config
from morpheus_jax.ckpt.torch_layout import from_torch, to_torch
from morpheus_jax.core.config import TrainConfig
from morpheus_jax.engine import state as st
from morpheus_jax.model import mup
from morpheus_jax.model.morpheus import init_model
from morpheus_jax.model.params import ParamCodec


def _flat(cfg, layouts, seed=0):
    model = init_model(cfg, layouts, seed)
    codec = ParamCodec(model)
    return codec, {k: np.asarray(v) for k, v in codec.flatten(model).items()}


def test_mup_at_the_base_width_is_the_standard_model():
    layouts = make_layouts()
    std = tiny_model_config()
    base = tiny_model_config(parametrization="mup", mup_base_hidden_size=std.hidden_size,
                             mup_base_group_hidden=std.group_hidden)
    codec, a = _flat(std, layouts)
    _, b = _flat(base, layouts)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert set(mup.learning_rate_multipliers(base, codec.axes).values()) == {1.0}
    assert mup.query_factor(base) == 1.0
    tx = st.make_optimizer(TrainConfig(), 1e-3, mup.learning_rate_multipliers(base, codec.axes))
    assert jax.tree.structure(tx.init(a)) == jax.tree.structure(st.make_optimizer(TrainConfig(), 1e-3).init(a))


def test_rates_and_readout_init_follow_fan_in_growth():
    layouts = make_layouts()
    std = tiny_model_config()                       # hidden 32, group_hidden 16
    wide = tiny_model_config(parametrization="mup", mup_base_hidden_size=8, mup_base_group_hidden=16)   # m = 4
    codec, a = _flat(std, layouts)
    _, b = _flat(wide, layouts)
    lr = mup.learning_rate_multipliers(wide, codec.axes)
    init = mup.init_multipliers(wide, codec.axes)
    hidden = ["encoder_blocks.0.attn.qkv.kernel", "encoder_blocks.0.mlp.linear2.kernel",
              "omics_decoders.rna.decoder_blocks.0.cross_attn.to_k.kernel", "wsi_tokenizer.output_proj.kernel"]
    inputs = ["wsi_tokenizer.k_proj.kernel", "omics_tokenizers.rna.w1", "omics_tokenizers.rna.w2"]
    vectors = ["wsi_tokenizer.prototypes", "global_token", "encoder_blocks.0.attn.qkv.bias", "norm.weight",
               "omics_decoders.rna.id_embeddings"]
    readout = "omics_decoders.rna.reverse_tokenizer.w1"          # H (a width) → group_hidden (fixed here)
    assert all(lr[n] == 0.25 for n in hidden + [readout]) and all(lr[n] == 1.0 for n in inputs + vectors)
    assert init[readout] == 0.5 and all(init[n] == 1.0 for n in hidden + inputs + vectors)
    for n in a:                                      # the same draws; readouts (every modality's) scaled
        np.testing.assert_allclose(b[n], init[n] * a[n], rtol=1e-6)
    assert {n for n in a if init[n] != 1.0} == {f"omics_decoders.{m}.reverse_tokenizer.w1" for m in layouts}
    assert mup.query_factor(wide) == 0.5
    # With group_hidden a width too, the readout is the reverse tokenizer's last layer.
    both = tiny_model_config(parametrization="mup", mup_base_hidden_size=8, mup_base_group_hidden=4)
    lr2, init2 = mup.learning_rate_multipliers(both, codec.axes), mup.init_multipliers(both, codec.axes)
    assert init2["omics_decoders.rna.reverse_tokenizer.w2"] == 0.5 and init2[readout] == 1.0
    assert lr2["omics_decoders.rna.reverse_tokenizer.w2"] == 0.25 and lr2["omics_tokenizers.rna.w2"] == 0.25


def test_first_adamw_update_is_scaled_per_layer():
    """Adam's first step moves every weight by ~lr (g/|g|); under µP a hidden weight by lr/m."""
    layouts = make_layouts()
    cfg = tiny_model_config(parametrization="mup", mup_base_hidden_size=8)
    codec, params = _flat(cfg, layouts)
    mults = mup.learning_rate_multipliers(cfg, codec.axes)
    lr = 1e-2
    tx = st.make_optimizer(TrainConfig(weight_decay=0.0), lr, mults)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    grads = {k: jax.random.normal(jax.random.key(i), v.shape) for i, (k, v) in enumerate(params.items())}
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in ("encoder_blocks.0.attn.qkv.kernel", "wsi_tokenizer.k_proj.kernel", "global_token"):
        assert float(jnp.median(jnp.abs(updates[name]))) == pytest.approx(lr * mults[name], rel=1e-3), name


def test_mup_export_loads_into_the_authors_module_and_computes_our_function():
    torch = pytest.importorskip("torch")
    from morpheus_jax.torch import MorpheusProto

    layouts = make_layouts()
    cfg = tiny_model_config(parametrization="mup", mup_base_hidden_size=8, encoder_dropout=0.0)
    model = init_model(cfg, layouts, 3)
    codec = ParamCodec(model)
    rng = np.random.default_rng(0)
    flat = {k: np.asarray(v) + (0.3 * rng.normal(size=v.shape).astype(np.float32) if v.ndim > 1 else 0)
            for k, v in codec.flatten(model).items()}
    flat["wsi_tokenizer.prototypes"] = rng.normal(size=flat["wsi_tokenizer.prototypes"].shape).astype(np.float32)
    sd = to_torch(flat, layouts, cfg)
    assert not np.allclose(sd["wsi_tokenizer.k_proj.weight"], flat["wsi_tokenizer.k_proj.kernel"].T)  # folded
    back = from_torch(sd, layouts, cfg)
    for k in flat:
        np.testing.assert_allclose(back[k], flat[k], rtol=1e-6, atol=1e-7)
    sizes = {m: {n: len(idx) for n, idx in zip(lay.group_names, lay.feature_index)} for m, lay in layouts.items()}
    tm = MorpheusProto(sizes, hidden_size=cfg.hidden_size, num_prototypes=cfg.num_prototypes, wsi_dim=cfg.wsi_dim,
                       group_hidden=cfg.group_hidden, encoder_heads=cfg.encoder_heads,
                       decoder_heads=cfg.decoder_heads, encoder_mlp_dim=cfg.encoder_mlp_dim,
                       decoder_mlp_dim=cfg.decoder_mlp_dim).eval()
    tm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    wsi = rng.normal(size=(2, 9, cfg.wsi_dim)).astype(np.float32)
    ours = codec.model({k: jnp.asarray(v) for k, v in flat.items()})
    enc, _ = ours.encode(jnp.asarray(wsi), None, None)
    gen = ours(jnp.asarray(wsi), None, None, targets=("rna",))["rna"]     # decode mode: cross-attention too
    with torch.no_grad():
        theirs = tm.encode(torch.from_numpy(wsi))
        theirs_gen = tm.generate("rna", torch.from_numpy(wsi))
    np.testing.assert_allclose(np.asarray(enc), theirs.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(gen), theirs_gen.numpy(), atol=1e-4, rtol=1e-4)
    # Without the fold the authors' module computes another function.
    sd_raw = dict(sd, **{k: sd[k] / 0.5 for k in ("wsi_tokenizer.k_proj.weight", "wsi_tokenizer.k_proj.bias")})
    tm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd_raw.items()}, strict=True)
    with torch.no_grad():
        assert not np.allclose(tm.encode(torch.from_numpy(wsi)).numpy(), np.asarray(enc), atol=1e-3)


def test_parametrization_settings_are_checked():
    from morpheus_jax.core.config import load_config
    from morpheus_jax.core.errors import ConfigError

    with pytest.raises(ConfigError, match="model.parametrization must be 'standard' or 'mup', got 'mu'"):
        load_config("demo", ["model.parametrization=mu"])
    with pytest.raises(ConfigError, match="model.mup_base_hidden_size must be >= 1"):
        load_config("demo", ["model.parametrization=mup", "model.mup_base_hidden_size=0"])
