"""Our flat parameters ↔ the authors' PyTorch state dict (reference §5), as NumPy arrays.

This is the one module that knows the PyTorch key names and transposes. Our parameters are
the flat ``{dotted name: array}`` dict of `ParamCodec` (Flax kernels ``[in, out]``, per-group
MLPs in the canonical stacked layout, see `morpheus_jax.model.tokenizers`); the authors' module has one
``nn.Linear`` per group, weights ``[out, in]``, keyed by the group's name.

- `torch_schema`: the exact §5 keys and shapes for given sizes (what an export must hold);
- `to_torch`: flat params → ordered state dict (per-group slices of the canonical stacks);
- `from_torch`: state dict → flat params (the slices stacked again);
- `infer_model`: sizes, modalities and group names read from a state dict's shapes.

Every direction checks names and shapes and fails with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np

from morpheus_jax.core.config import ModelConfig
from morpheus_jax.core.errors import LayoutError
from morpheus_jax.core.spec import GroupLayout
from morpheus_jax.model.params import has_decoders
from morpheus_jax.model import mup

# -- the §5 schema ----------------------------------------------------------------------------

def _check_group_name(modality: str, name: str) -> None:
    if not name or "." in name:
        raise LayoutError(f"{modality}: group name {name!r} cannot be a PyTorch state-dict key "
                          "(empty or containing '.'); rename the group in the mapping")


def _linear(prefix: str, d_in: int, d_out: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (d_out, d_in)), (f"{prefix}.bias", (d_out,))]


def _norm(prefix: str, dim: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (dim,)), (f"{prefix}.bias", (dim,))]


def _block(prefix: str, h: int, mlp: int, cross: bool) -> list[tuple[str, tuple[int, ...]]]:
    keys = _norm(f"{prefix}.norm1", h) + _linear(f"{prefix}.attn.qkv", h, 3 * h) \
        + _linear(f"{prefix}.attn.out_proj", h, h)
    if cross:
        keys += _norm(f"{prefix}.norm_cross_attn", h)
        for proj in ("to_q", "to_k", "to_v", "out_proj"):
            keys += _linear(f"{prefix}.cross_attn.{proj}", h, h)
    return keys + _norm(f"{prefix}.norm2", h) + _linear(f"{prefix}.mlp.linear1", h, mlp) \
        + _linear(f"{prefix}.mlp.linear2", mlp, h)


def torch_schema(cfg: ModelConfig, groups: Mapping[str, Mapping[str, int]], *, decoders: bool = True,
                 n_outputs: int | None = None) -> dict[str, tuple[int, ...]]:
    """§5's ``{key: shape}`` in module order.

    groups: ``{modality: {group name: size}}`` for the modalities whose tokenizers (and, with
    ``decoders``, decoders) the module has, in model order. ``n_outputs``: add the
    fine-tuning head ``final_layer.1``.
    """
    h, gh = cfg.hidden_size, cfg.group_hidden
    keys = [("global_token", (1, 1, h)), ("wsi_tokenizer.prototypes", (cfg.num_prototypes, h))]
    keys += _norm("wsi_tokenizer.kv_norm", cfg.wsi_dim)
    keys += _linear("wsi_tokenizer.k_proj", cfg.wsi_dim, h) + _linear("wsi_tokenizer.v_proj", cfg.wsi_dim, h)
    keys += _norm("wsi_tokenizer.q_norm", h) + _linear("wsi_tokenizer.output_proj", h, h)
    keys += _norm("wsi_tokenizer.out_norm", h)
    for m, sizes in groups.items():
        for g, size in sizes.items():
            _check_group_name(m, g)
            p = f"omics_tokenizers.{m}.token_mlp_dict.{g}"
            keys += _linear(f"{p}.0.0", size, gh) + _linear(f"{p}.1.0", gh, h)
    for i in range(cfg.encoder_layers):
        keys += _block(f"encoder_blocks.{i}", h, cfg.encoder_mlp_dim, cross=False)
    keys += _norm("norm", h)
    if decoders:
        for m, sizes in groups.items():
            p = f"omics_decoders.{m}"
            keys += [(f"{p}.mask_tokens", (1, 1, h)), (f"{p}.id_embeddings", (1, len(sizes), h))]
            keys += _linear(f"{p}.decoder_embed", h, h)
            for i in range(cfg.decoder_layers):
                keys += _block(f"{p}.decoder_blocks.{i}", h, cfg.decoder_mlp_dim, cross=True)
            keys += _norm(f"{p}.decoder_norm", h)
            for g, size in sizes.items():
                q = f"{p}.reverse_tokenizer.token_reverse.{g}"
                keys += _linear(f"{q}.0.0", h, gh) + _linear(f"{q}.1", gh, size)
    if n_outputs:
        keys += _linear("final_layer.1", h, n_outputs)
    return dict(keys)


def group_sizes(layouts: Mapping[str, GroupLayout], modalities=None) -> dict[str, dict[str, int]]:
    modalities = list(layouts) if modalities is None else list(modalities)
    return {m: dict(zip(layouts[m].group_names, layouts[m].sizes)) for m in modalities}


# -- the name correspondence ----------------------------------------------------------------

def _dense_pairs(torch_prefix: str, jax_prefix: str | None = None):
    """(torch key, jax name, transpose) of one Linear."""
    jax_prefix = torch_prefix if jax_prefix is None else jax_prefix
    return [(f"{torch_prefix}.weight", f"{jax_prefix}.kernel", True),
            (f"{torch_prefix}.bias", f"{jax_prefix}.bias", False)]


def _same_pairs(*keys):
    return [(k, k, False) for k in keys]


def _norm_pairs(prefix):
    return _same_pairs(f"{prefix}.weight", f"{prefix}.bias")


def _block_pairs(prefix: str, cross: bool):
    pairs = _norm_pairs(f"{prefix}.norm1") + _dense_pairs(f"{prefix}.attn.qkv") \
        + _dense_pairs(f"{prefix}.attn.out_proj")
    if cross:
        pairs += _norm_pairs(f"{prefix}.norm_cross_attn")
        for proj in ("to_q", "to_k", "to_v", "out_proj"):
            pairs += _dense_pairs(f"{prefix}.cross_attn.{proj}")
    return pairs + _norm_pairs(f"{prefix}.norm2") + _dense_pairs(f"{prefix}.mlp.linear1") \
        + _dense_pairs(f"{prefix}.mlp.linear2")


def _plain_pairs(cfg: ModelConfig, modalities, decoders: bool):
    """Every parameter outside the per-group MLPs: (torch key, jax name, transpose)."""
    pairs = _same_pairs("global_token", "wsi_tokenizer.prototypes")
    pairs += _norm_pairs("wsi_tokenizer.kv_norm") + _dense_pairs("wsi_tokenizer.k_proj")
    pairs += _dense_pairs("wsi_tokenizer.v_proj") + _norm_pairs("wsi_tokenizer.q_norm")
    pairs += _dense_pairs("wsi_tokenizer.output_proj") + _norm_pairs("wsi_tokenizer.out_norm")
    for i in range(cfg.encoder_layers):
        pairs += _block_pairs(f"encoder_blocks.{i}", cross=False)
    pairs += _norm_pairs("norm")
    if decoders:
        for m in modalities:
            p = f"omics_decoders.{m}"
            pairs += _same_pairs(f"{p}.mask_tokens", f"{p}.id_embeddings") + _dense_pairs(f"{p}.decoder_embed")
            for i in range(cfg.decoder_layers):
                pairs += _block_pairs(f"{p}.decoder_blocks.{i}", cross=True)
            pairs += _norm_pairs(f"{p}.decoder_norm")
    return pairs


def _fold_queries(sd: dict[str, np.ndarray], cfg: ModelConfig, factor: float) -> None:
    """Multiply, in place, the weights that make attention queries (the q rows of every
    ``attn.qkv``, every ``cross_attn.to_q``, the WSI tokenizer's ``k_proj``, whose scores are
    its only use) by ``factor``: µP's query factor (`model.mup.query_factor`), folded so the
    authors' module, which scales logits by 1/sqrt(d), computes our function."""
    if factor == 1.0:
        return
    h = cfg.hidden_size
    for key in list(sd):
        if key.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
            v = sd[key].copy()
            v[:h] *= factor
            sd[key] = v
        elif key.endswith((".cross_attn.to_q.weight", ".cross_attn.to_q.bias")) or key.startswith(
                "wsi_tokenizer.k_proj."):
            sd[key] = sd[key] * factor


# -- ours → torch ---------------------------------------------------------------------------

def to_torch(flat: Mapping[str, np.ndarray], layouts: Mapping[str, GroupLayout], cfg: ModelConfig, *,
             encoder_only: bool = False, modalities=None) -> dict[str, np.ndarray]:
    """Flat params → §5 state dict (float32 NumPy arrays, C-contiguous, in module order).

    ``encoder_only`` drops the decoders; ``modalities`` (default: all of the model's) keeps
    the omics tokenizers (and decoders) of those modalities only.
    """
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    modalities = list(layouts) if modalities is None else list(modalities)
    unknown = [m for m in modalities if m not in layouts]
    if unknown:
        raise LayoutError(f"modalities {unknown} are not in the model (it has {list(layouts)})")
    decoders = not encoder_only
    if decoders and not has_decoders(flat):
        raise LayoutError("these parameters have no omics decoders (an encoder-only model): export it encoder-only")

    def take(name):
        if name not in flat:
            raise LayoutError(f"parameter {name!r} missing from the checkpoint")
        used.add(name)
        return flat[name]

    used: set[str] = set()
    out: dict[str, np.ndarray] = {}
    for key, name, transpose in _plain_pairs(cfg, modalities, decoders):
        v = take(name)
        out[key] = v.T if transpose else v
    for m in modalities:
        lay = layouts[m]
        off = lay.entry_offsets()
        tok = f"omics_tokenizers.{m}"
        w1, b1, w2, b2 = (take(f"{tok}.{k}") for k in ("w1", "b1", "w2", "b2"))
        for g, name in enumerate(lay.group_names):
            p = f"{tok}.token_mlp_dict.{name}"
            out[f"{p}.0.0.weight"] = w1[off[g]: off[g + 1]].T
            out[f"{p}.0.0.bias"] = b1[g]
            out[f"{p}.1.0.weight"] = w2[g].T
            out[f"{p}.1.0.bias"] = b2[g]
        if decoders:
            rev = f"omics_decoders.{m}.reverse_tokenizer"
            w1, b1, w2, b2 = (take(f"{rev}.{k}") for k in ("w1", "b1", "w2", "b2"))
            for g, name in enumerate(lay.group_names):
                p = f"{rev}.token_reverse.{name}"
                out[f"{p}.0.0.weight"] = w1[g].T
                out[f"{p}.0.0.bias"] = b1[g]
                out[f"{p}.1.weight"] = w2[off[g]: off[g + 1]]
                out[f"{p}.1.bias"] = b2[off[g]: off[g + 1]]
    n_outputs = None
    if "final_layer.kernel" in flat:  # a fine-tuned encoder's head: Sequential(Dropout, Linear)
        out["final_layer.1.weight"], out["final_layer.1.bias"] = take("final_layer.kernel").T, take("final_layer.bias")
        n_outputs = out["final_layer.1.bias"].shape[0]
    dropped = tuple(f"omics_tokenizers.{m}." for m in layouts if m not in modalities) \
        + (("omics_decoders.",) if encoder_only else tuple(f"omics_decoders.{m}." for m in layouts
                                                            if m not in modalities))
    left = sorted(n for n in set(flat) - used if not n.startswith(dropped))
    if left:
        raise LayoutError(f"parameters with no place in the PyTorch layout: {left[:5]}")
    _fold_queries(out, cfg, mup.query_factor(cfg))
    schema = torch_schema(cfg, group_sizes(layouts, modalities), decoders=decoders, n_outputs=n_outputs)
    _check_against(out, schema, "export")
    return {k: np.ascontiguousarray(out[k]) for k in schema}


def _check_against(sd: Mapping[str, np.ndarray], schema: Mapping[str, tuple], what: str) -> None:
    missing = [k for k in schema if k not in sd]
    unexpected = [k for k in sd if k not in schema]
    if missing or unexpected:
        raise LayoutError(f"{what}: state dict does not match the PyTorch layout: "
                          f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    bad = [(k, tuple(np.shape(sd[k])), s) for k, s in schema.items() if tuple(np.shape(sd[k])) != tuple(s)]
    if bad:
        k, got, want = bad[0]
        raise LayoutError(f"{what}: {k} has shape {list(got)}, expected {list(want)} "
                          f"({len(bad)} keys with wrong shapes)")


# -- torch → ours ---------------------------------------------------------------------------

def from_torch(sd: Mapping[str, np.ndarray], layouts: Mapping[str, GroupLayout], cfg: ModelConfig,
               *, decoders: bool | None = None) -> dict[str, np.ndarray]:
    """§5 state dict → flat params (float32, the canonical layout). ``decoders`` None: as the
    state dict has them. Every key must be used and have its §5 shape."""
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    if decoders is None:
        decoders = has_decoders(sd)
    modalities = list(layouts)
    n_outputs = sd["final_layer.1.bias"].shape[0] if "final_layer.1.bias" in sd else None
    _check_against(sd, torch_schema(cfg, group_sizes(layouts), decoders=decoders, n_outputs=n_outputs), "import")
    _fold_queries(sd, cfg, 1.0 / mup.query_factor(cfg))
    h, gh = cfg.hidden_size, cfg.group_hidden
    flat: dict[str, np.ndarray] = {}
    if n_outputs:
        flat["final_layer.kernel"] = np.ascontiguousarray(sd["final_layer.1.weight"].T)
        flat["final_layer.bias"] = sd["final_layer.1.bias"]
    for key, name, transpose in _plain_pairs(cfg, modalities, decoders):
        flat[name] = np.ascontiguousarray(sd[key].T if transpose else sd[key])
    for m in modalities:
        lay = layouts[m]
        tok = f"omics_tokenizers.{m}"
        mlps = [f"{tok}.token_mlp_dict.{name}" for name in lay.group_names]
        flat[f"{tok}.w1"] = np.concatenate([sd[f"{p}.0.0.weight"].T for p in mlps]).reshape(lay.total_size, gh)
        flat[f"{tok}.b1"] = np.stack([sd[f"{p}.0.0.bias"] for p in mlps]).reshape(lay.num_groups, gh)
        flat[f"{tok}.w2"] = np.stack([sd[f"{p}.1.0.weight"].T for p in mlps]).reshape(lay.num_groups, gh, h)
        flat[f"{tok}.b2"] = np.stack([sd[f"{p}.1.0.bias"] for p in mlps]).reshape(lay.num_groups, h)
        if not decoders:
            continue
        rev = f"omics_decoders.{m}.reverse_tokenizer"
        mlps = [f"{rev}.token_reverse.{name}" for name in lay.group_names]
        flat[f"{rev}.w1"] = np.stack([sd[f"{p}.0.0.weight"].T for p in mlps]).reshape(lay.num_groups, h, gh)
        flat[f"{rev}.b1"] = np.stack([sd[f"{p}.0.0.bias"] for p in mlps]).reshape(lay.num_groups, gh)
        flat[f"{rev}.w2"] = np.concatenate([sd[f"{p}.1.weight"] for p in mlps]).reshape(lay.total_size, gh)
        flat[f"{rev}.b2"] = np.concatenate([sd[f"{p}.1.bias"] for p in mlps]).reshape(lay.total_size)
    return flat


# -- reading sizes off a state dict -------------------------------------------------------------

@dataclasses.dataclass
class InferredModel:
    """What a state dict's shapes say about the model that wrote it."""

    sizes: dict              # ModelConfig fields: hidden_size, num_prototypes, wsi_dim, group_hidden, …
    modalities: list[str]    # in the state dict's order
    groups: dict[str, dict[str, int]]   # {modality: {group name: size}} in the state dict's order
    decoders: bool
    n_outputs: int | None    # fine-tuning head size, if any


def _shape(sd, key):
    if key not in sd:
        raise LayoutError(f"state dict has no {key!r}: not a MORPHEUS (MorpheusProto) state dict")
    return tuple(np.shape(sd[key]))


def infer_model(sd: Mapping[str, np.ndarray]) -> InferredModel:
    """Sizes (H, P, wsi dim, group MLP width, layers, MLP dims), modalities, groups and their
    sizes from the shapes of a §5 state dict. Head counts cannot be read from shapes."""
    h = _shape(sd, "global_token")[-1]
    sizes = {"hidden_size": h, "num_prototypes": _shape(sd, "wsi_tokenizer.prototypes")[0],
             "wsi_dim": _shape(sd, "wsi_tokenizer.kv_norm.weight")[0]}
    enc = {int(m.group(1)) for k in sd if (m := re.match(r"encoder_blocks\.(\d+)\.", k))}
    if not enc or sorted(enc) != list(range(len(enc))):
        raise LayoutError(f"encoder blocks are not numbered 0..n-1: {sorted(enc)}")
    sizes["encoder_layers"] = len(enc)
    sizes["encoder_mlp_dim"] = _shape(sd, "encoder_blocks.0.mlp.linear1.weight")[0]
    groups: dict[str, dict[str, int]] = {}
    hidden = set()
    for k in sd:
        m = re.fullmatch(r"omics_tokenizers\.([^.]+)\.token_mlp_dict\.([^.]+)\.0\.0\.weight", k)
        if m:
            shape = _shape(sd, k)
            groups.setdefault(m.group(1), {})[m.group(2)] = shape[1]
            hidden.add(shape[0])
    if len(hidden) > 1:
        raise LayoutError(f"per-group MLPs of different widths {sorted(hidden)}: not supported")
    sizes["group_hidden"] = hidden.pop() if hidden else 256
    dec_mods = [m for m in groups if any(k.startswith(f"omics_decoders.{m}.") for k in sd)]
    decoders = bool(dec_mods)
    stray = sorted({k.split(".")[1] for k in sd if k.startswith("omics_decoders.")} - set(groups))
    if stray:
        raise LayoutError(f"decoders for modalities without a tokenizer: {stray}")
    if decoders:
        if len(dec_mods) != len(groups):
            raise LayoutError(f"decoders for {dec_mods} but tokenizers for {list(groups)}: expected both or none")
        first = dec_mods[0]
        pattern = re.compile(rf"omics_decoders\.{re.escape(first)}\.decoder_blocks\.(\d+)\.")
        dec = {int(x.group(1)) for k in sd if (x := pattern.match(k))}
        if not dec or sorted(dec) != list(range(len(dec))):
            raise LayoutError(f"{first} decoder blocks are not numbered 0..n-1: {sorted(dec)}")
        sizes["decoder_layers"] = len(dec)
        sizes["decoder_mlp_dim"] = _shape(sd, f"omics_decoders.{first}.decoder_blocks.0.mlp.linear1.weight")[0]
    n_outputs = _shape(sd, "final_layer.1.weight")[0] if "final_layer.1.weight" in sd else None
    return InferredModel(sizes, list(groups), groups, decoders, n_outputs)
