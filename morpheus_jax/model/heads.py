"""The fine-tuning model: MORPHEUS's encoder + ``final_layer`` (Dropout → Linear) on the
global token's final embedding (MORPHEUS.md §4).

Its flat parameter names (`ParamCodec`) are the pretraining model's encoder names
(``global_token``, ``wsi_tokenizer.*``, ``omics_tokenizers.<m>.*`` for the modalities it
uses, ``encoder_blocks.*``, ``norm.*``) plus ``final_layer.kernel [H, n_out]`` and
``final_layer.bias [n_out]`` (PyTorch: ``final_layer.1.weight`` = kernelᵀ, ``final_layer.1.bias``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from morpheus_jax.core.config import ModelConfig
from morpheus_jax.core.spec import GroupLayout
from morpheus_jax.model.layers import Dense, dropout, split_key, uniform
from morpheus_jax.model.morpheus import Morpheus

Array = jax.Array
HEAD = "final_layer."


class MorpheusFinetune(Morpheus):
    """Encoder-only MORPHEUS with a task head. ``cfg.modalities``: the omics it encodes
    (may be empty: WSI only); ``cfg.encoder_dropout`` applies in the encoder blocks,
    ``head_dropout`` before the head."""

    def __init__(self, cfg: ModelConfig, layouts: Mapping[str, GroupLayout], n_outputs: int, *,
                 rng: np.random.Generator, head_dropout: float):
        super().__init__(cfg, dict(layouts), rng=rng, with_decoders=False)
        self.head_dropout = float(head_dropout)
        self.final_layer = Dense(cfg.hidden_size, n_outputs, axes=("embed", "outputs"), rng=rng, dtype=self.dtype)

    def embed(self, wsi: Array | None, wsi_mask: Array | None, omics: dict[str, Array] | None, key=None) -> Array:
        """``[B, H]`` final embedding of the global token (row 0 of the encoded sequence)."""
        encoded, _ = self.encode(wsi, wsi_mask, omics, None, key)
        return encoded[:, 0]

    def __call__(self, wsi: Array | None, wsi_mask: Array | None, omics: dict[str, Array] | None,
                 key=None) -> Array:
        """wsi ``[B, N, D]`` (or None), wsi_mask ``[B, N]``, omics ``{m: [B, F_m]}`` → ``[B, n_out]``
        float32 outputs. ``key`` None: evaluation (no dropout)."""
        k_enc, k_head = split_key(key, 2)
        z = self.embed(wsi, wsi_mask, omics, k_enc)
        noise = None if k_head is None else uniform(k_head, z.shape)
        return self.final_layer(dropout(z, self.head_dropout, noise)).astype(jnp.float32)


def finetune_config(model_cfg: ModelConfig, omics: tuple[str, ...], dropout_rate: float) -> ModelConfig:
    """The pretraining model config restricted to ``omics``, with the fine-tuning dropout."""
    return dataclasses.replace(model_cfg, modalities=list(omics), encoder_dropout=float(dropout_rate))
