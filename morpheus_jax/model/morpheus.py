"""MORPHEUS: WSI + omics tokenizers, a transformer encoder, one masked decoder per modality.

Pure arrays in, arrays out; the model knows group layouts (from the mappings) but nothing
about files. Sizes come from `ModelConfig`. Attribute names follow the authors' PyTorch
module (reference §5) so the export mapping stays a table of renames and transposes.

Omics inputs are flat canonical feature vectors ``{modality: [B, F_m]}``; outputs of a
decoder are group predictions concatenated in mapping order ``[B, S_m]``
(``S_m = Σ group sizes``, a feature of several groups appearing once per group).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morpheus_jax.core.config import ModelConfig, model_modalities
from morpheus_jax.core.spec import GroupLayout
from morpheus_jax.model import mup
from morpheus_jax.model.layers import DecoderBlock, Dense, EncoderBlock, LayerNorm, normal_init, split_key
from morpheus_jax.model.masking import KeepPlan, token_positions
from morpheus_jax.model.tokenizers import GroupTokenizer, ReverseTokenizer, WSITokenizer

Array = jax.Array


def _run(block: nnx.Module, remat: bool, *args):
    """Call a transformer block, recomputing its activations in the backward pass when
    ``remat`` (saves memory on large configs at ~1/3 more compute)."""
    if not remat:
        return block(*args)
    return nnx.remat(lambda b, *a: b(*a))(block, *args)


class OmicsDecoder(nnx.Module):
    """Decoder of one modality: queries (own token or mask token) + id embeddings,
    self- and cross-attention blocks over the encoded sequence, per-group reverse MLPs."""

    def __init__(self, cfg: ModelConfig, layout: GroupLayout, *, rng: np.random.Generator, dtype):
        h = cfg.hidden_size
        self.mask_tokens = nnx.Param(normal_init(rng, (1, 1, h)),
                                     axes=(None, None, "embed"))
        self.id_embeddings = nnx.Param(normal_init(rng, (1, layout.num_groups, h)),
                                       axes=(None, "groups", "embed"))
        self.decoder_embed = Dense(h, h, axes=("embed", "embed_out"), rng=rng, dtype=dtype)
        self.decoder_blocks = nnx.List([
            DecoderBlock(h, cfg.decoder_heads, cfg.decoder_mlp_dim, cfg.decoder_dropout,
                         eps=cfg.layer_norm_eps, rng=rng, dtype=dtype, q_factor=mup.query_factor(cfg))
            for _ in range(cfg.decoder_layers)])
        self.decoder_norm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dtype)
        self.reverse_tokenizer = ReverseTokenizer(layout, cfg.group_hidden, h, rng=rng, dtype=dtype)
        self.remat = cfg.remat

    def __call__(self, encoded: Array, context_mask: Array, token_pos: Array | None, key=None) -> Array:
        """encoded ``[B, L, H]``, context_mask ``[B, L]``, token_pos ``[B, G]`` (position of each
        group's kept token in ``encoded``, -1 = use the mask token; None = all mask tokens,
        i.e. generation) → predictions ``[B, S]``."""
        e = self.decoder_embed(encoded)
        b, g = e.shape[0], self.id_embeddings.shape[1]
        mask_tok = jnp.broadcast_to(self.mask_tokens[...].astype(e.dtype), (b, g, e.shape[-1]))
        if token_pos is None:
            q = mask_tok
        else:
            own = jnp.take_along_axis(e, jnp.maximum(token_pos, 0)[..., None], axis=1)
            q = jnp.where((token_pos >= 0)[..., None], own, mask_tok)
        q = q + self.id_embeddings[...].astype(e.dtype)
        keys = split_key(key, len(self.decoder_blocks))
        for block, k in zip(self.decoder_blocks, keys):
            q = _run(block, self.remat, q, e, context_mask, k)
        return self.reverse_tokenizer(self.decoder_norm(q))


class Morpheus(nnx.Module):
    """The pretraining model (encoder + decoders). ``layouts`` in model modality order."""

    def __init__(self, cfg: ModelConfig, layouts: dict[str, GroupLayout], *, rng: np.random.Generator,
                 with_decoders: bool = True):
        mods = model_modalities(cfg, layouts)
        missing = [m for m in mods if m not in layouts]
        if missing:
            raise ValueError(f"no group layout for modalities {missing}")
        dtype = jnp.dtype(cfg.compute_dtype)
        h = cfg.hidden_size
        self.modalities = tuple(mods)
        self.layouts = {m: layouts[m] for m in self.modalities}
        self.hidden_size = h
        self.dtype = dtype
        self.remat = cfg.remat
        self.global_token = nnx.Param(normal_init(rng, (1, 1, h)),
                                      axes=(None, None, "embed"))
        self.wsi_tokenizer = WSITokenizer(cfg.wsi_dim, h, cfg.num_prototypes, eps=cfg.layer_norm_eps,
                                          rng=rng, dtype=dtype, prototype_init=cfg.prototype_init,
                                          q_factor=mup.query_factor(cfg))
        self.omics_tokenizers = nnx.Dict({
            m: GroupTokenizer(self.layouts[m], cfg.group_hidden, h, rng=rng, dtype=dtype)
            for m in self.modalities})
        self.encoder_blocks = nnx.List([
            EncoderBlock(h, cfg.encoder_heads, cfg.encoder_mlp_dim, cfg.encoder_dropout,
                         eps=cfg.layer_norm_eps, rng=rng, dtype=dtype, q_factor=mup.query_factor(cfg))
            for _ in range(cfg.encoder_layers)])
        self.norm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dtype)
        if with_decoders:
            self.omics_decoders = nnx.Dict({
                m: OmicsDecoder(cfg, self.layouts[m], rng=rng, dtype=dtype) for m in self.modalities})
        else:
            self.omics_decoders = nnx.Dict({})

    # -- helpers -----------------------------------------------------------------------
    def present(self, omics: dict[str, Array] | None) -> tuple[str, ...]:
        """Modalities of ``omics`` in model order (unknown names are an error)."""
        omics = omics or {}
        unknown = set(omics) - set(self.modalities)
        if unknown:
            raise ValueError(f"unknown omics modalities {sorted(unknown)}; model has {self.modalities}")
        return tuple(m for m in self.modalities if m in omics)

    def group_counts(self, modalities) -> tuple[int, ...]:
        return tuple(self.layouts[m].num_groups for m in modalities)

    # -- encoder -----------------------------------------------------------------------
    def encode(self, wsi: Array | None, wsi_mask: Array | None, omics: dict[str, Array] | None,
               plan: KeepPlan | None = None, key=None) -> tuple[Array, Array]:
        """wsi ``[B, N, D]`` (or None), wsi_mask ``[B, N]`` (True = real patch), omics
        ``{m: [B, F_m]}`` → (encoded ``[B, 1 + P + K, H]``, valid ``[B, 1 + P + K]``).

        Tokens: global, the P WSI tokens (if wsi given), then the kept omics tokens
        (``plan.keep_idx``; all tokens in order when plan is None, K = T).
        """
        present = self.present(omics)
        parts = []
        if wsi is not None:
            parts.append(self.wsi_tokenizer(wsi, wsi_mask))
        b = (wsi if wsi is not None else omics[present[0]]).shape[0]
        fixed = 1 + (parts[0].shape[1] if parts else 0)
        valid = [jnp.ones((b, fixed), bool)]
        if present:
            tokens = jnp.concatenate([self.omics_tokenizers[m](omics[m]) for m in present], axis=1)
            if plan is not None:
                tokens = jnp.take_along_axis(tokens, plan.keep_idx[..., None], axis=1)
                valid.append(plan.keep_valid)
            else:
                valid.append(jnp.ones(tokens.shape[:2], bool))
            parts.append(tokens)
        glob = jnp.broadcast_to(self.global_token[...].astype(self.dtype), (b, 1, self.hidden_size))
        x = jnp.concatenate([glob] + [p.astype(self.dtype) for p in parts], axis=1)
        valid = jnp.concatenate(valid, axis=1)
        keys = split_key(key, len(self.encoder_blocks))
        for block, k in zip(self.encoder_blocks, keys):
            x = _run(block, self.remat, x, valid, k)
        return self.norm(x), valid

    # -- full model ----------------------------------------------------------------------
    def __call__(self, wsi: Array | None, wsi_mask: Array | None, omics: dict[str, Array] | None,
                 plan: KeepPlan | None = None, targets: tuple[str, ...] | None = None,
                 key=None) -> dict[str, Array]:
        """Reconstruct (training) or generate: predictions ``{m: [B, S_m]}`` for every
        modality in ``targets`` (default: all decoders).

        A target whose tokens went into the encoder uses, per group, its own encoded token
        when kept by ``plan`` and the mask token otherwise; a target absent from ``omics``
        is generated from mask tokens only (decode mode).
        """
        k_enc, k_dec = split_key(key, 2)
        encoded, valid = self.encode(wsi, wsi_mask, omics, plan, k_enc)
        present = self.present(omics)
        targets = tuple(targets) if targets is not None else tuple(self.omics_decoders.keys())
        start = encoded.shape[1] - (plan.keep_idx.shape[1] if plan is not None else
                                    sum(self.group_counts(present)))
        pos_all = None
        if present:
            if plan is None:
                t = sum(self.group_counts(present))
                pos_all = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (encoded.shape[0], t))
            else:
                pos_all = token_positions(plan)
        offsets, off = {}, 0
        for m in present:
            offsets[m] = off
            off += self.layouts[m].num_groups
        dec_keys = split_key(k_dec, len(targets))
        out = {}
        for m, k in zip(targets, dec_keys):
            if m in offsets:
                pos = pos_all[:, offsets[m]: offsets[m] + self.layouts[m].num_groups]
                pos = jnp.where(pos >= 0, pos + start, -1)
            else:
                pos = None
            out[m] = self.omics_decoders[m](encoded, valid, pos, k)
        return out


def init_model(cfg: ModelConfig, layouts: dict[str, GroupLayout], seed: int,
               with_decoders: bool = True) -> Morpheus:
    """Parameters drawn with NumPy from ``seed`` (deterministic, no XLA compiles); under µP
    the readouts scaled (`mup.init_multipliers`), from the same draws."""
    model = Morpheus(cfg, layouts, rng=np.random.default_rng(seed), with_decoders=with_decoders)
    if mup.enabled(cfg):
        state = nnx.state(model, nnx.Param)
        for path, var in nnx.to_flat_state(state):
            name = ".".join(str(p) for p in path)
            factor = mup.init_multipliers(cfg, {name: tuple(var.get_metadata().get("axes") or ())})[name]
            if factor != 1.0:
                var.set_value(var.get_value() * factor)
        nnx.update(model, state)
    return model
