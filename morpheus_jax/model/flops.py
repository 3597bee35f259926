"""Analytic FLOPs of a training step and parameter counts, for any model config.

Convention (what counts):

- Only matrix products count: every ``dot``/``einsum`` of the step, ``2·m·n·k`` FLOPs each
  (a multiply and an add per term). This is the usual "model FLOPs" of MFU. LayerNorms,
  softmax, GELU/ELU, dropout, gathers and the AdamW update are not counted; XLA's
  ``cost_analysis()`` counts them (about one FLOP per element and op), which is why its
  total is a little higher (README, "Scaling laws").
- Backward = 2× forward for a product whose both operands depend on parameters (input
  gradient and weight gradient), 1× for a product whose input is data: the first layer
  of the per-group omics MLPs sees the raw omics features, so only its weight gradient is
  computed. Training FLOPs = forward + backward.
- Shapes are those of the code that runs: the WSI tokenizer in its reformulated form
  (scores ``kv·(q Wkᵀ)`` and pooling ``A·kv`` over all N patches in D = wsi_dim, each with
  one product in the backward pass since patches take no gradient, then
  ``(A kv) Wv`` on P pooled rows; ``q Wkᵀ`` once per step), an encoder over ``1 + P + k``
  tokens (k = int(T(1 - ratio)) kept omics tokens), and per modality a decoder over G_m
  queries with ``1 + P + k`` context tokens. Every group is tokenized (the kept ones are
  gathered after) and every group is reconstructed.
- "useful": per-group MLPs at their groups' sizes (the authors' one-MLP-per-group model).
  "executed": at the zero-padded bucket widths the stacked layout computes (what XLA runs).

Parameter counts follow the authors' layout (no bucket padding): 33.98 M at paper shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from morpheus_jax.core.config import ModelConfig, model_modalities
from morpheus_jax.core.spec import GroupLayout, bucket_partition
from morpheus_jax.model.masking import num_kept

# Dense peak FLOP/s per chip by `jax.Device.device_kind`, for matmuls in bfloat16 and in
# float32 as XLA runs them at default precision: TPUs pass float32 matmuls through the
# bf16 MXU (same peak), NVIDIA GPUs use TF32 tensor cores. Prefix match, longest first.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},      # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},           # v5p reports "TPU v5"
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},      # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 495e12},
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 495e12},      # SXM
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 156e12},
}


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Dense matmul peak FLOP/s of one device of this kind (None when unknown, e.g. CPU)."""
    for kind in sorted(PEAK_FLOPS, key=len, reverse=True):
        if device_kind.startswith(kind):
            return PEAK_FLOPS[kind].get(dtype)
    return None


# -- group shapes ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GroupShapes:
    """A modality's group sizes and the ``(groups, padded width)`` of each computed bucket."""

    sizes: tuple[int, ...]
    buckets: tuple[tuple[int, int], ...]

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def padded(self) -> int:
        return sum(g * w for g, w in self.buckets)


def group_shapes(layout: GroupLayout | Sequence[int], num_buckets: int) -> GroupShapes:
    """From a `GroupLayout` (its own buckets) or a list of group sizes (bucketed as the model does)."""
    if isinstance(layout, GroupLayout):
        sizes = layout.sizes
        buckets = [(len(b), layout.bucket_width(i)) for i, b in enumerate(layout.buckets)]
    else:
        sizes = [int(s) for s in layout]
        buckets = [(len(b), max(sizes[g] for g in b)) for b in bucket_partition(sizes, num_buckets)]
    return GroupShapes(tuple(sizes), tuple(buckets))


def _shapes(cfg: ModelConfig, layouts: Mapping) -> dict[str, GroupShapes]:
    mods = model_modalities(cfg, layouts)
    missing = [m for m in mods if m not in layouts]
    if missing:
        raise ValueError(f"no group layout or sizes for modalities {missing}")
    return {m: group_shapes(layouts[m], cfg.group_buckets) for m in mods}


def sequence_lengths(cfg: ModelConfig, layouts: Mapping, ratio: float) -> dict[str, int]:
    """Training sequence lengths: omics tokens T, kept k, encoder tokens ``1 + P + k``."""
    t = sum(s.num_groups for s in _shapes(cfg, layouts).values())
    k = num_kept(t, ratio)
    return {"omics_tokens": t, "kept": k, "encoder_tokens": 1 + cfg.num_prototypes + k}


# -- FLOPs -----------------------------------------------------------------------------------------

class _Tally:
    """Forward FLOPs per component, with each product's backward multiplier."""

    def __init__(self):
        self.parts: dict[str, dict[str, float]] = {}

    def add(self, component: str, useful: float, executed: float | None = None, backward: float = 2.0):
        executed = useful if executed is None else executed
        p = self.parts.setdefault(component, {"forward": 0.0, "backward": 0.0,
                                              "forward_executed": 0.0, "backward_executed": 0.0})
        p["forward"] += useful
        p["backward"] += backward * useful
        p["forward_executed"] += executed
        p["backward_executed"] += backward * executed


def _attention_block(t: _Tally, name: str, b: int, lq: int, h: int, mlp: int, lk: int | None = None):
    """Self-attention block (fused qkv, out_proj, MLP); with ``lk`` also cross-attention."""
    t.add(name, 2 * b * lq * h * 3 * h)          # qkv
    t.add(name, 2 * 2 * b * lq * lq * h)         # scores, weights·V
    t.add(name, 2 * b * lq * h * h)              # out_proj
    if lk is not None:
        t.add(name, 2 * b * lq * h * h)          # to_q
        t.add(name, 2 * 2 * b * lk * h * h)      # to_k, to_v over the context
        t.add(name, 2 * 2 * b * lq * lk * h)     # scores, weights·V
        t.add(name, 2 * b * lq * h * h)          # out_proj
    t.add(name, 2 * 2 * b * lq * h * mlp)        # linear1, linear2


def step_flops(model_cfg: ModelConfig, layouts: Mapping, batch: int, num_patches: int,
               ratio: float) -> dict:
    """Matmul FLOPs of one training step (forward + backward) at a global batch size.

    ``layouts``: ``{modality: GroupLayout or [group sizes]}``. Returns ``useful`` and
    ``executed`` totals per step, ``per_sample`` (useful / batch), the forward-only totals,
    the sequence lengths, and ``components`` (wsi_tokenizer, omics_tokenizers, encoder,
    decoders, reverse_tokenizers, objective), each with forward / backward, useful and
    executed.
    """
    c = model_cfg
    shapes = _shapes(c, layouts)
    seq = sequence_lengths(c, layouts, ratio)
    b, n, d, p, h, gh = batch, num_patches, c.wsi_dim, c.num_prototypes, c.hidden_size, c.group_hidden
    lenc = seq["encoder_tokens"]
    t = _Tally()
    # WSI tokenizer, reformulated: q Wkᵀ once; scores and pooling over N patches in D dims.
    t.add("wsi_tokenizer", 2 * p * h * d)
    # Patches are data (no gradient): the custom VJP runs one product per forward product
    # (scores' and pooling's gradients), so backward = 1x. The patch-mean corrections are
    # [B, N, P]·[B, N] products, forward and backward.
    t.add("wsi_tokenizer", 2 * 2 * b * p * n * d, backward=1.0)
    t.add("wsi_tokenizer", 2 * b * n * p, backward=1.0)
    t.add("wsi_tokenizer", 2 * b * p * d * h)    # v_proj of the pooled rows
    t.add("wsi_tokenizer", 2 * b * p * h * h)    # output_proj
    for m in shapes:
        s = shapes[m]
        # Layer 1 sees data: weight gradient only.
        t.add("omics_tokenizers", 2 * b * s.total * gh, 2 * b * s.padded * gh, backward=1.0)
        t.add("omics_tokenizers", 2 * b * s.num_groups * gh * h)
    for _ in range(c.encoder_layers):
        _attention_block(t, "encoder", b, lenc, h, c.encoder_mlp_dim)
    for m in shapes:
        s = shapes[m]
        t.add("decoders", 2 * b * lenc * h * h)  # decoder_embed
        for _ in range(c.decoder_layers):
            _attention_block(t, "decoders", b, s.num_groups, h, c.decoder_mlp_dim, lk=lenc)
        t.add("reverse_tokenizers", 2 * b * s.num_groups * h * gh)
        t.add("reverse_tokenizers", 2 * b * s.total * gh, 2 * b * s.padded * gh)
        # Per-group means of |error|: [B, S] @ [S, G] (a constant matrix: input gradient only).
        t.add("objective", 2 * b * s.total * s.num_groups, backward=1.0)

    parts = t.parts
    fwd = sum(v["forward"] for v in parts.values())
    useful = sum(v["forward"] + v["backward"] for v in parts.values())
    executed = sum(v["forward_executed"] + v["backward_executed"] for v in parts.values())
    return {
        "useful": useful,
        "executed": executed,
        "per_sample": useful / batch,
        "forward": fwd,
        "forward_executed": sum(v["forward_executed"] for v in parts.values()),
        "batch": batch, "num_patches": num_patches, "ratio": ratio, **seq,
        "components": {k: {**v, "total": v["forward"] + v["backward"],
                           "total_executed": v["forward_executed"] + v["backward_executed"]}
                       for k, v in parts.items()},
    }


# -- parameters -------------------------------------------------------------------------------------

def param_counts(model_cfg: ModelConfig, layouts: Mapping, with_decoders: bool = True) -> dict[str, int]:
    """Parameter counts: ``total`` (the authors' layout), ``stored`` (what a checkpoint holds:
    the canonical layout has no bucket padding, so the same), ``without_group_mlps`` (total
    minus the per-group tokenizers and reverse tokenizers), ``group_mlps``, and per component."""
    c = model_cfg
    shapes = _shapes(c, layouts)
    h, gh, d, p = c.hidden_size, c.group_hidden, c.wsi_dim, c.num_prototypes

    def lin(i, o):
        return i * o + o

    def block(mlp, cross):
        n = 2 * h + lin(h, 3 * h) + lin(h, h) + 2 * h + lin(h, mlp) + lin(mlp, h)
        return n + (2 * h + 4 * lin(h, h) if cross else 0)

    parts = {
        "global_token": h,
        "wsi_tokenizer": p * h + 2 * d + 2 * lin(d, h) + 2 * h + lin(h, h) + 2 * h,
        "encoder": c.encoder_layers * block(c.encoder_mlp_dim, False) + 2 * h,
        "omics_tokenizers": 0, "decoders": 0, "reverse_tokenizers": 0,
    }
    for m in shapes:
        s = shapes[m]
        g = s.num_groups
        # Layer 1 of a tokenizer: size → gh; layer 2: gh → H.
        parts["omics_tokenizers"] += s.total * gh + g * gh + g * lin(gh, h)
        if with_decoders:
            parts["decoders"] += h + g * h + lin(h, h) + c.decoder_layers * block(c.decoder_mlp_dim, True) + 2 * h
            # Reverse: H → gh, then gh → size.
            parts["reverse_tokenizers"] += g * lin(h, gh) + s.total * gh + s.total
    total = sum(parts.values())
    group = parts["omics_tokenizers"] + parts["reverse_tokenizers"]
    return {"total": total, "stored": total, "without_group_mlps": total - group,
            "group_mlps": group, "components": parts}


def throughput(flops: dict, samples_per_s: float, num_devices: int, device_kind: str,
               dtype: str = "float32") -> dict[str, float]:
    """Model TFLOP/s per device (useful matmul FLOPs) and MFU when the device's peak is known."""
    per_device = flops["per_sample"] * samples_per_s / max(num_devices, 1)
    out = {"model_tflops_per_device": per_device / 1e12}
    peak = peak_flops(device_kind, dtype)
    if peak:
        out["mfu"] = per_device / peak
    return out


def summary(flops: dict, params: dict) -> str:
    """A few lines for logs: totals per step and per sample, components, parameters."""
    lines = [f"training FLOPs per step (batch {flops['batch']}, {flops['num_patches']} patches, encoder "
             f"{flops['encoder_tokens']} tokens): {flops['useful'] / 1e9:.2f} G useful, "
             f"{flops['executed'] / 1e9:.2f} G executed (bucket padding); "
             f"{flops['per_sample'] / 1e6:.1f} M per sample"]
    comp = ", ".join(f"{k} {v['total'] / 1e9:.2f}" for k, v in flops["components"].items())
    lines.append(f"  by component (GFLOP): {comp}")
    lines.append(f"parameters: {params['total'] / 1e6:.2f} M ({params['without_group_mlps'] / 1e6:.2f} M without "
                 f"the per-group MLPs)")
    return "\n".join(lines)
