"""Maximal-update parametrisation (µP, Yang et al. 2022, "Tensor Programs V", the Adam table)
for MORPHEUS: ``model.parametrization = mup``.

Under the standard parametrisation the best AdamW learning rate shrinks as the model widens,
so a ladder trained at one rate compares tuned and untuned models. µP rescales initialisation
and per-layer learning rates by how each weight's fan-in and fan-out grow with width, relative
to a base model (``model.mup_base_hidden_size``, ``model.mup_base_group_hidden``), so that
the best rate found on a small model holds for a wide one. At the base width µP and the
standard parametrisation are the same model with the same updates.

Widths. Two knobs are widths: the transformer's ``hidden_size`` (its logical axes ``embed``,
``embed_out``, ``qkv``, ``heads_merged`` and ``mlp``; MLP dims are assumed to grow with the
hidden size, multiplier ``m = hidden_size / base``) and the per-group MLPs' ``group_hidden``
(axis ``group_hidden``, ``m_g = group_hidden / base``). Every other axis is fixed by the data:
the 1536 patch features (``wsi_feature``), a group's entries (``group_entries``), groups and
prototypes.

Rules, for a weight matrix with fan-in multiplier ``m_in`` and fan-out multiplier ``m_out``
(1 for a fixed axis):

- AdamW learning rate × ``1 / m_in``: input weights (fixed fan-in: the WSI tokenizer's
  ``k_proj``/``v_proj`` from 1536 patch features, an omics tokenizer's first layer from the
  group's entries) keep the base rate; hidden weights (attention, MLPs, ``decoder_embed``,
  ``output_proj``, the tokenizers' ``group_hidden → H`` layer, the reverse tokenizers'
  ``H → group_hidden`` layer) and readouts get it divided by their fan-in's growth. Vectors
  (biases, LayerNorm gains, the global, mask and id tokens, prototypes) keep the base rate.
  Decoupled weight decay is scaled with the rate (optax's AdamW multiplies it by the rate).
- Initialisation: torch's ``U(±1/sqrt(fan_in))`` (variance ∝ 1/fan_in) for input and hidden
  weights, as the standard parametrisation; a **readout** (fan-out fixed, fan-in a width:
  the reverse tokenizer's last layer into the group's features when ``group_hidden`` grows,
  its first layer when only ``hidden_size`` grows) is scaled by a further ``1/sqrt(m_in)``
  (variance ∝ 1/fan_in²), so outputs do not grow with width at initialisation.
- Attention logits ``q·k / d`` instead of ``q·k / sqrt(d)``, anchored at the base head
  width: ``q·k · sqrt(d_base) / d``. The encoder's and decoders' self-attention, the decoders'
  cross-attention and the WSI tokenizer's prototype attention (single head, d = H) all use
  it: queries are multiplied by ``f = sqrt(d_base / d)`` before the standard ``1/sqrt(d)``.

Export: the parametrisation changes how weights are initialised and updated, and by the
factor ``f`` how queries are scaled. ``f`` is folded into the exported weights (the rows of
``attn.qkv`` that make q and ``cross_attn.to_q``, weight and bias, and the WSI tokenizer's
``k_proj``), so the authors' PyTorch module computes the same function; import divides it out.
"""

from __future__ import annotations

import math

from morpheus_jax.core.config import ModelConfig

WIDTH_AXES = ("embed", "embed_out", "qkv", "heads_merged", "mlp")


def enabled(cfg: ModelConfig) -> bool:
    return cfg.parametrization == "mup"


def axis_multipliers(cfg: ModelConfig) -> dict[str, float]:
    """Width multiplier of each logical axis that grows with the model (others: 1)."""
    m = cfg.hidden_size / cfg.mup_base_hidden_size
    out = {a: m for a in WIDTH_AXES}
    out["group_hidden"] = cfg.group_hidden / cfg.mup_base_group_hidden
    return out


def fan_axes(name: str, axes: tuple) -> tuple[str | None, str | None] | None:
    """(fan-in axis, fan-out axis) of a weight matrix, None for a vector. Kernels are
    ``[…, in, out]`` except the reverse tokenizers' ``w2`` ``[entries, group_hidden]``,
    stored as torch's ``[out, in]``."""
    if len(axes) < 2 or name.endswith(("prototypes", "id_embeddings", "global_token", "mask_tokens")):
        return None
    if name.endswith("reverse_tokenizer.w2"):
        return axes[1], axes[0]
    return axes[-2], axes[-1]


def _mults(cfg: ModelConfig, name: str, axes: tuple) -> tuple[float, float]:
    mult = axis_multipliers(cfg)
    fans = fan_axes(name, axes)
    if fans is None:
        return 1.0, 1.0
    return mult.get(fans[0], 1.0), mult.get(fans[1], 1.0)


def learning_rate_multipliers(cfg: ModelConfig, axes: dict[str, tuple]) -> dict[str, float]:
    """``{parameter name: AdamW learning-rate multiplier}`` (all 1 under the standard
    parametrisation)."""
    if not enabled(cfg):
        return {n: 1.0 for n in axes}
    return {n: 1.0 / _mults(cfg, n, a)[0] for n, a in axes.items()}


def init_multipliers(cfg: ModelConfig, axes: dict[str, tuple]) -> dict[str, float]:
    """``{parameter name: factor on its torch-default initial value}``: ``1/sqrt(m_in)`` for
    readouts under µP, 1 otherwise."""
    out = {}
    for n, a in axes.items():
        m_in, m_out = _mults(cfg, n, a)
        out[n] = 1.0 / math.sqrt(m_in) if enabled(cfg) and m_out == 1.0 and m_in != 1.0 else 1.0
    return out


def query_factor(cfg: ModelConfig) -> float:
    """``f = sqrt(d_base / d)`` on the queries of every attention (1 under the standard
    parametrisation): logits ``q·k · sqrt(d_base) / d``. Heads are fixed across widths and
    every attention spans the hidden size, so ``d_base / d = base hidden size / hidden size``."""
    return math.sqrt(cfg.mup_base_hidden_size / cfg.hidden_size) if enabled(cfg) else 1.0
