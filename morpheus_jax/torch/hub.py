"""Reading `morpheus export` files in PyTorch: the state dict and its sidecar JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from morpheus_jax.torch.model import MorpheusProto, MorpheusProtoEncoder

_ENCODER_KWARGS = ("hidden_size", "num_prototypes", "wsi_dim", "group_hidden", "encoder_layers", "encoder_heads",
                   "encoder_mlp_dim", "encoder_dropout")
_DECODER_KWARGS = ("decoder_layers", "decoder_heads", "decoder_mlp_dim", "decoder_dropout")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a ``.safetensors`` or ``.pt`` file (tensors as stored)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # lazy: optional dependency

        return load_file(str(path))
    if path.suffix in (".pt", ".pth"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: expected a .safetensors, .pt or .pth file")


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON written beside an export (``FILE.json``): config, modalities, groups, features."""
    side = Path(path).with_name(Path(path).name + ".json")
    if not side.exists():
        raise FileNotFoundError(f"{side}: no sidecar JSON beside {path} (build the module by hand and call "
                                "load_state_dict instead)")
    return json.loads(side.read_text())


def build_from_sidecar(sidecar: dict[str, Any], *, encoder: bool | None = None, modalities=None,
                       n_outputs: int | None = None, dropout: float | None = None):
    """An untrained module shaped as the export describes.

    encoder None: `MorpheusProtoEncoder` for encoder-only exports or when ``n_outputs`` is
    given, else `MorpheusProto`. ``modalities``: the omics tokenizers to keep (encoder only;
    default: every modality of the export). ``dropout`` overrides the encoder's dropout.
    """
    cfg = sidecar["config"]
    if encoder is None:
        encoder = sidecar.get("encoder_only", False) or n_outputs is not None
    if not encoder and sidecar.get("encoder_only", False):
        raise ValueError("this export is encoder-only: it cannot build a MorpheusProto (pass encoder=True)")
    mods = list(sidecar["modalities"] if modalities is None else modalities)
    unknown = [m for m in mods if m not in sidecar["modalities"]]
    if unknown:
        raise ValueError(f"modalities {unknown} are not in the export (it has {sidecar['modalities']})")
    groups = {m: sidecar["groups"][m] for m in mods}
    features = {m: sidecar["feature_names"][m] for m in mods}
    kwargs = {k: cfg[k] for k in _ENCODER_KWARGS}
    if dropout is not None:
        kwargs["encoder_dropout"] = dropout
    if encoder:
        return MorpheusProtoEncoder(groups, features=features, n_outputs=n_outputs, **kwargs)
    kwargs.update({k: cfg[k] for k in _DECODER_KWARGS})
    return MorpheusProto(groups, features=features, **kwargs)


def from_export(path: str | os.PathLike, *, encoder: bool | None = None, modalities=None,
                n_outputs: int | None = None, dropout: float | None = None):
    """Build the module an export describes and load its weights with ``strict=True``.

    - a full export → `MorpheusProto` (encode / generate / reconstruct);
    - ``encoder=True`` or an encoder-only export → `MorpheusProtoEncoder` with the
      tokenizers of ``modalities`` (default all); a full export's decoders (and other
      modalities' tokenizers) are left out on purpose, every other key must match;
    - a fine-tuned export (``has_head`` in its sidecar) → `MorpheusProtoEncoder` with its
      trained head ``final_layer`` loaded;
    - ``n_outputs``: a fresh fine-tuning head ``final_layer`` replaces it after loading.

    Parameters come back as float32 (a bfloat16 export is widened), in training mode as
    any new module; call ``.eval()`` for inference.
    """
    sidecar = read_sidecar(path)
    if encoder is None:
        encoder = bool(sidecar.get("encoder_only")) or n_outputs is not None
    # A fine-tuned export carries its head (final_layer.1): build the module with it.
    head = sidecar.get("n_outputs") if sidecar.get("has_head") else None
    model = build_from_sidecar(sidecar, encoder=encoder, modalities=modalities, dropout=dropout, n_outputs=head)
    state = {k: v.to(torch.float32) for k, v in load_weights(path).items()}
    # Leave out, on purpose, the parts the chosen module does not have: decoders for an
    # encoder, other modalities' tokenizers and decoders. Every other key loads strictly.
    left_out = tuple(f"omics_{part}.{m}." for m in sidecar["modalities"] if m not in model.modalities
                     for part in ("tokenizers", "decoders"))
    if encoder:
        left_out += ("omics_decoders.",)
    state = {k: v for k, v in state.items() if not k.startswith(left_out)}
    model.load_state_dict(state, strict=True)
    if n_outputs is not None:
        model.add_head(n_outputs)
    return model
