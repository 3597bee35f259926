"""`morpheus export` and `morpheus import-torch` as library functions.

export: checkpoint → §5 state dict (``.safetensors`` / ``.pt``) + sidecar JSON.
import: §5 state dict (ours or one the authors' code saved) + group mappings → a checkpoint
that `morpheus_jax.load` and `export` read. float32 survives the round trip bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from morpheus_jax.ckpt import torch_files as files
from morpheus_jax.ckpt import torch_layout
from morpheus_jax.ckpt.checkpoint import read_checkpoint, write_checkpoint
from morpheus_jax.core.config import Config, ModelConfig, from_dict, load_config, model_modalities, to_dict
from morpheus_jax.core.errors import ExportError, OutputExists
from morpheus_jax.core.modality import ordered
from morpheus_jax.core.spec import GroupLayout, HeadSpec, ModelSpec
from morpheus_jax.data.prepare import canonical_features
from morpheus_jax.model.heads import HEAD
from morpheus_jax.model.morpheus import init_model

SIDECAR_FORMAT = "morpheus-jax/pytorch-export"
SIDECAR_VERSION = 1


# -- export ---------------------------------------------------------------------------------------

def build_sidecar(cfg: Config, groups: Mapping[str, Mapping[str, list[str]]], features: Mapping[str, list[str]],
                  modalities: list[str], *, encoder_only: bool, dtype: str, step: int, source: str,
                  head: HeadSpec | None = None) -> dict[str, Any]:
    model = dataclasses.asdict(cfg.model)
    module = "MorpheusProtoEncoder" if encoder_only else "MorpheusProto"
    if head is not None:
        note = (f"Fine-tuned encoder with its task head final_layer.1 ({head.n_outputs} outputs): load with "
                f"MorpheusProtoEncoder(groups, ..., n_outputs={head.n_outputs}).load_state_dict(sd, strict=True); "
                "morpheus_jax.torch.from_export(FILE) does both.")
    elif encoder_only:
        note = ("Encoder only (no decoders, no fine-tuning head): load with MorpheusProtoEncoder(groups, ..., "
                "n_outputs=None).load_state_dict(sd, strict=True), then add_head(n_outputs) for a new task; "
                "morpheus_jax.torch.from_export(FILE, n_outputs=...) does both.")
    else:
        note = "Full pretraining model: MorpheusProto(groups, ...).load_state_dict(sd, strict=True)."
    return {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "module": module, "encoder_only": encoder_only,
        "has_head": head is not None, **({"n_outputs": head.n_outputs, "head": head.to_json()} if head else {}),
        "dtype": dtype, "step": step, "source": source, "note": note,
        "config": {k: model[k] for k in ("hidden_size", "num_prototypes", "wsi_dim", "group_hidden",
                                         "encoder_layers", "encoder_heads", "encoder_mlp_dim", "encoder_dropout",
                                         "decoder_layers", "decoder_heads", "decoder_mlp_dim", "decoder_dropout",
                                         "layer_norm_eps")},
        "modalities": list(modalities),
        "group_names": {m: list(groups[m]) for m in modalities},
        "group_sizes": {m: [len(f) for f in groups[m].values()] for m in modalities},
        "groups": {m: {g: list(f) for g, f in groups[m].items()} for m in modalities},
        "feature_names": {m: list(features[m]) for m in modalities},
        "training_config": to_dict(cfg),
    }


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, encoder_only: bool = False,
                      modalities: list[str] | None = None, dtype: str = "float32",
                      overwrite: bool = False) -> tuple[Path, dict]:
    """Write ``out`` (suffix .safetensors or .pt) and ``out.json``; returns (path, sidecar)."""
    files.check_suffix(out)
    if Path(out).is_dir():
        raise OutputExists(f"--out {out}: is a folder; --out names the weight file to write")
    if Path(out).exists() and not overwrite:
        raise OutputExists(f"{out} exists (pass --overwrite to replace it)")
    ckpt = read_checkpoint(checkpoint)
    cfg = ckpt.config
    if cfg.model.layer_norm_eps != 1e-5:
        raise ExportError(f"model.layer_norm_eps is {cfg.model.layer_norm_eps}: the PyTorch modules use 1e-5 "
                          "everywhere (reference §5), so the export would not reproduce this model's outputs")
    if modalities is not None and not encoder_only:
        raise ExportError("--modalities selects the tokenizers of an encoder-only export; add --encoder-only")
    model_mods = model_modalities(cfg.model, ckpt.layouts)
    mods = list(model_mods if modalities is None else modalities)
    unknown = [m for m in mods if m not in ckpt.layouts]
    if unknown:
        raise ExportError(f"modalities {unknown} are not in the checkpoint (it has {list(ckpt.layouts)})")
    mods = [m for m in model_mods if m in mods]   # model order
    if not ckpt.decoders:
        encoder_only = True
    sd = torch_layout.to_torch(ckpt.params, ckpt.layouts, cfg.model, encoder_only=encoder_only, modalities=mods)
    head = None
    if f"{HEAD}kernel" in ckpt.params:   # a fine-tuned model (morpheus finetune … --out)
        n_outputs = int(ckpt.params[f"{HEAD}kernel"].shape[1])
        head = (HeadSpec("unknown", n_outputs) if ckpt.spec.head is None
                else dataclasses.replace(ckpt.spec.head, n_outputs=n_outputs))
    sidecar = build_sidecar(cfg, ckpt.groups, ckpt.features, mods, encoder_only=encoder_only, dtype=dtype,
                            step=ckpt.step, source=str(ckpt.step_dir), head=head)
    path = files.write_weights(out, sd, sidecar, dtype=dtype)
    return path, sidecar


# -- import ---------------------------------------------------------------------------------------

def _ordered(modalities) -> list[str]:
    """The model's order when neither a sidecar nor the caller says otherwise: rna, dnam, cnv
    first (the authors' order), then any other name as given."""
    return ordered(modalities)


def _groups_and_features(inferred: torch_layout.InferredModel, mappings: Mapping[str, Mapping[str, list[str]]],
                         sidecar: Mapping[str, Any] | None):

    side_groups = (sidecar or {}).get("groups", {})
    missing = _ordered([m for m in inferred.modalities if m not in mappings and m not in side_groups])
    if missing:
        raise ExportError(f"no group mapping for modalities {missing}: pass --mapping "
                          + " ".join(f"{m}=JSON" for m in missing)
                          + f" (the file has tokenizers for {_ordered(inferred.modalities)})")
    groups, features = {}, {}
    for m in inferred.modalities:
        if m in mappings:
            groups[m] = {g: list(f) for g, f in mappings[m].items()}
            same = m in side_groups and list(side_groups[m]) == list(groups[m]) and \
                all(list(side_groups[m][g]) == groups[m][g] for g in groups[m])
            features[m] = list(sidecar["feature_names"][m]) if same else canonical_features(groups[m])
        else:
            groups[m] = {g: list(f) for g, f in side_groups[m].items()}
            features[m] = list(sidecar["feature_names"][m])
        have, want = inferred.groups[m], groups[m]
        missing, extra = [g for g in want if g not in have], [g for g in have if g not in want]
        if missing or extra:
            raise ExportError(f"{m}: mapping groups and weight-file groups differ: in the mapping only "
                              f"{missing[:5]} ({len(missing)}), in the file only {extra[:5]} ({len(extra)})")
        wrong = [(g, len(f), have[g]) for g, f in want.items() if len(f) != have[g]]
        if wrong:
            g, n, s = wrong[0]
            raise ExportError(f"{m}: group {g!r} has {n} features in the mapping but its weights take {s} inputs "
                              f"({len(wrong)} groups differ)")
    return groups, features


def import_weights(path: str | os.PathLike, out: str | os.PathLike, *,
                   mappings: Mapping[str, Mapping[str, list[str]]] | None = None,
                   num_heads: int | None = None, decoder_num_heads: int | None = None,
                   modalities: list[str] | None = None, config: str | os.PathLike | None = None,
                   step: int | None = None, overwrite: bool = False) -> Path:
    """A §5 state dict → a checkpoint folder ``out/<step>/``; returns the step folder.

    Sizes come from the shapes. Group order and feature names come from ``mappings``
    (``{modality: {group: [features]}}``) or, when absent, from the export's sidecar. Head
    counts: ``num_heads`` (encoder, and decoders unless ``decoder_num_heads``), else the
    sidecar's, else 8. Modality order: ``modalities``, else the sidecar's, else the
    mappings', else rna, dnam, cnv. Other settings: ``config`` (a YAML file or a name in
    configs/), else the sidecar's training config, else the defaults.
    """
    sd, sidecar = files.read_weights(path)
    if sidecar is not None and sidecar.get("format") != SIDECAR_FORMAT:
        sidecar = None
    inferred = torch_layout.infer_model(sd)
    if inferred.n_outputs is not None:
        raise ExportError(f"{path}: holds a fine-tuning head (final_layer.1, {inferred.n_outputs} outputs); "
                          "import-torch reads pretraining and encoder weights: drop the final_layer.* keys to import "
                          "the encoder")
    if not inferred.modalities:
        raise ExportError(f"{path}: no omics tokenizers: a WSI-only encoder cannot be imported "
                          "(the JAX model needs at least one omics modality)")
    mappings = dict(mappings or {})
    stray = [m for m in mappings if m not in inferred.modalities]
    if stray:
        raise ExportError(f"mappings for modalities the file has no weights for: {stray} "
                          f"(it has {inferred.modalities})")
    groups, features = _groups_and_features(inferred, mappings, sidecar)

    if modalities is None:
        if sidecar is not None and set(sidecar["modalities"]) == set(inferred.modalities):
            modalities = list(sidecar["modalities"])
        elif mappings and set(mappings) == set(inferred.modalities):
            modalities = list(mappings)
        else:
            modalities = _ordered(inferred.modalities)
    if sorted(modalities) != sorted(inferred.modalities):
        raise ExportError(f"modality order {modalities} does not list the file's modalities {inferred.modalities}")

    if config is not None:
        cfg = load_config(config)
    elif sidecar is not None and "training_config" in sidecar:
        cfg = from_dict(sidecar["training_config"])
    else:
        cfg = Config()
    side_cfg = (sidecar or {}).get("config", {})
    model = dataclasses.asdict(cfg.model)
    model.update(inferred.sizes)
    heads = num_heads or side_cfg.get("encoder_heads") or 8
    model["encoder_heads"] = heads
    model["decoder_heads"] = decoder_num_heads or num_heads or side_cfg.get("decoder_heads") or heads
    model["modalities"] = list(modalities)
    cfg_dict = to_dict(cfg)
    cfg_dict["model"] = model
    cfg = from_dict(cfg_dict)  # validates (heads divide H, …)

    layouts = {m: GroupLayout.from_mapping(groups[m], features[m], cfg.model.group_buckets) for m in modalities}
    flat = torch_layout.from_torch(sd, layouts, cfg.model, decoders=inferred.decoders)
    _check_against_model(flat, cfg.model, layouts, inferred.decoders)
    step = int(step if step is not None else (sidecar or {}).get("step", 0))
    spec = ModelSpec.build(cfg, groups, features)
    return write_checkpoint(out, step, flat, spec, overwrite=overwrite)


def _check_against_model(flat: Mapping[str, np.ndarray], cfg: ModelConfig, layouts, decoders: bool) -> None:
    """The imported names and shapes are exactly those of the JAX model (guards layout drift)."""


    abstract = nnx.eval_shape(lambda: init_model(cfg, layouts, 0, with_decoders=decoders))
    names = {".".join(str(p) for p in path): tuple(v.shape)
             for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    missing, extra = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
    if missing or extra:
        raise ExportError(f"imported parameters do not match the JAX model: missing {missing[:5]}, extra {extra[:5]}")
    bad = [(n, flat[n].shape, s) for n, s in names.items() if tuple(flat[n].shape) != s]
    if bad:
        raise ExportError(f"imported parameter {bad[0][0]} has shape {list(bad[0][1])}, the model expects "
                          f"{list(bad[0][2])}")
