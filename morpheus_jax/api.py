"""The stable Python API: ``morpheus_jax.load(path)`` → `MorpheusModel` handle; NumPy in, NumPy out.

    import morpheus_jax
    model = morpheus_jax.load("runs/demo")          # run folder, checkpoints folder or a checkpoint
    z = model.encode(wsi, {"rna": rna})            # [B, 1 + P + T, H]
    rna_hat = model.generate("rna", wsi)           # [B, Σ rna group sizes], decode mode
    rna_feat = model.to_features("rna", rna_hat)   # [B, F_rna], canonical order

Shapes: ``wsi`` ``[B, N, wsi_dim]`` patch features (``wsi_mask`` ``[B, N]``, True = real
patch, for padded bags); ``omics`` ``{modality: [B, F]}`` in canonical feature order
(`feature_names`); masks ``{modality: [B, G]}`` int, 1 = masked, groups in mapping order
(`group_names`). Calls are jitted: the first call of each shape compiles; bags are padded
to a power of two (≥ 16 patches) to keep the number of compiled shapes small.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from morpheus_jax.ckpt.checkpoint import read_checkpoint
from morpheus_jax.core.config import Config, model_modalities
from morpheus_jax.core.errors import InputError
from morpheus_jax.core.spec import GroupLayout
from morpheus_jax.model.heads import HEAD
from morpheus_jax.model.masking import explicit_keep
from morpheus_jax.model.morpheus import init_model
from morpheus_jax.model.params import ParamCodec, has_decoders


def load(path: str | os.PathLike) -> "MorpheusModel":
    """A run folder (its latest checkpoint), a ``checkpoints`` folder or one checkpoint step folder."""

    ckpt = read_checkpoint(path)
    return MorpheusModel(ckpt.config, ckpt.layouts, ckpt.params, feature_names=ckpt.features, step=ckpt.step)


def _bag_size(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


class MorpheusModel:
    """A MORPHEUS model for inference. Build with `load`.

    Attributes: ``modalities`` (model order), ``group_names[m]``, ``feature_names[m]``,
    ``config`` (the resolved `Config`), ``step``, ``has_decoders``.
    """

    def __init__(self, config: Config, layouts: Mapping[str, GroupLayout], params: Mapping[str, np.ndarray], *,
                 feature_names: Mapping[str, list[str]] | None = None, step: int = 0):
        self.config = config
        self.step = step
        self.layouts = {m: layouts[m] for m in model_modalities(config.model, layouts)}
        self.modalities = tuple(self.layouts)
        self.group_names = {m: list(lay.group_names) for m, lay in self.layouts.items()}
        self.group_sizes = {m: list(lay.sizes) for m, lay in self.layouts.items()}
        if feature_names is None:
            feature_names = {m: [f"{m}_{i}" for i in range(lay.num_features)] for m, lay in self.layouts.items()}
        self.feature_names = {m: list(feature_names[m]) for m in self.modalities}
        if any(n.startswith(HEAD) for n in params):
            raise InputError("this checkpoint is a fine-tuned model (it has a task head, final_layer.*): "
                             "morpheus_jax.load reads pretrained models; `morpheus export` turns it into the "
                             "authors' fine-tuning layout for PyTorch")
        self.has_decoders = has_decoders(params)
        template = init_model(config.model, self.layouts, 0, with_decoders=self.has_decoders)
        self._codec = ParamCodec(template)
        missing = [n for n in self._codec.names if n not in params]
        extra = [n for n in params if n not in self._codec.shapes]
        if missing or extra:
            raise InputError(f"parameters do not fit the config: missing {missing[:5]}, unexpected {extra[:5]}")
        bad = [n for n in self._codec.names if tuple(np.shape(params[n])) != self._codec.shapes[n]]
        if bad:
            raise InputError(f"parameter {bad[0]} has shape {list(np.shape(params[bad[0]]))}, "
                             f"the config gives {list(self._codec.shapes[bad[0]])}")
        self._params = {n: jnp.asarray(params[n], jnp.float32) for n in self._codec.names}
        self._encode_fn = jax.jit(self._encode_impl)
        self._generate_fn = jax.jit(self._generate_impl, static_argnames=("target",))
        self._reconstruct_fn = jax.jit(self._reconstruct_impl)

    def __repr__(self) -> str:
        m = self.config.model
        groups = ", ".join(f"{k}: {len(v)} groups" for k, v in self.group_names.items())
        return (f"MorpheusModel(step={self.step}, H={m.hidden_size}, P={m.num_prototypes}, "
                f"encoder_layers={m.encoder_layers}, decoders={self.has_decoders}, {groups})")

    @property
    def num_prototypes(self) -> int:
        return self.config.model.num_prototypes

    @property
    def hidden_size(self) -> int:
        return self.config.model.hidden_size

    # -- jitted internals ------------------------------------------------------------------------
    def _encode_impl(self, params, wsi, wsi_mask, omics):
        return self._codec.model(params).encode(wsi, wsi_mask, omics)[0]

    def _generate_impl(self, params, wsi, wsi_mask, omics, target):
        model = self._codec.model(params)
        encoded, valid = model.encode(wsi, wsi_mask, omics)
        return model.omics_decoders[target](encoded, valid, None)

    def _reconstruct_impl(self, params, wsi, wsi_mask, omics, token_mask):
        return self._codec.model(params)(wsi, wsi_mask, omics, explicit_keep(token_mask))

    # -- input checks ----------------------------------------------------------------------------
    def _inputs(self, wsi, omics, wsi_mask):
        omics = dict(omics or {})
        unknown = sorted(set(omics) - set(self.modalities))
        if unknown:
            raise InputError(f"unknown omics modalities {unknown}; this model has {list(self.modalities)}")
        batch = None
        if wsi is not None:
            wsi = np.asarray(wsi)
            d = self.config.model.wsi_dim
            if wsi.ndim != 3 or wsi.shape[2] != d:
                raise InputError(f"wsi must be [B, N, {d}], got {list(wsi.shape)}")
            if wsi.shape[1] == 0:
                raise InputError("wsi has no patches (N = 0)")
            batch, n = wsi.shape[:2]
            mask = np.ones((batch, n), bool) if wsi_mask is None else np.asarray(wsi_mask).astype(bool)
            if mask.shape != (batch, n):
                raise InputError(f"wsi_mask must be [{batch}, {n}], got {list(mask.shape)}")
            size = _bag_size(n)
            wsi = np.pad(wsi.astype(np.float32), ((0, 0), (0, size - n), (0, 0)))
            mask = np.pad(mask, ((0, 0), (0, size - n)))
            wsi, wsi_mask = jnp.asarray(wsi), jnp.asarray(mask)
        elif wsi_mask is not None:
            raise InputError("wsi_mask given without wsi")
        out = {}
        for m in self.modalities:
            if m not in omics:
                continue
            x = np.asarray(omics[m], np.float32)
            f = self.layouts[m].num_features
            if x.ndim != 2 or x.shape[1] != f:
                raise InputError(f"omics[{m!r}] must be [B, {f}] (canonical feature order), got {list(x.shape)}")
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise InputError(f"omics[{m!r}] has batch {x.shape[0]}, wsi has {batch}")
            out[m] = jnp.asarray(x)
        if batch is None:
            raise InputError("nothing to encode: give wsi and/or omics")
        return wsi, wsi_mask, out, batch

    # -- public ----------------------------------------------------------------------------------
    def encode(self, wsi, omics=None, wsi_mask=None) -> np.ndarray:
        """``[B, 1 + P + T, H]``: the global token, the P WSI tokens, then the omics tokens of
        the modalities given, in model modality order and mapping group order (no WSI: P = 0)."""
        wsi, wsi_mask, omics, _ = self._inputs(wsi, omics, wsi_mask)
        return np.asarray(self._encode_fn(self._params, wsi, wsi_mask, omics))

    def _check_target(self, target: str) -> None:
        if not self.has_decoders:
            raise InputError("this checkpoint is encoder-only: it has no decoders to generate with")
        if target not in self.modalities:
            raise InputError(f"unknown target modality {target!r}; this model has {list(self.modalities)}")

    def generate(self, target: str, wsi, omics=None, wsi_mask=None) -> np.ndarray:
        """``[B, Σ group sizes of target]`` in decode mode (every query is the mask token),
        conditioned on the WSI and the omics given; groups concatenated in mapping order."""
        self._check_target(target)
        wsi, wsi_mask, omics, _ = self._inputs(wsi, omics, wsi_mask)
        return np.asarray(self._generate_fn(self._params, wsi, wsi_mask, omics, target=target))

    def reconstruct(self, wsi, omics, masks, wsi_mask=None) -> dict[str, np.ndarray]:
        """Explicit-mask reconstruction, as in training: ``{modality: [B, Σ group sizes]}`` for
        every modality. ``masks[m]`` ``[B, G_m]`` int (1 = masked) for modalities in ``omics``
        (missing: nothing masked); a modality absent from ``omics`` is decoded from mask tokens."""
        if not self.has_decoders:
            raise InputError("this checkpoint is encoder-only: it has no decoders to reconstruct with")
        wsi, wsi_mask, omics, batch = self._inputs(wsi, omics, wsi_mask)
        masks = dict(masks or {})
        stray = sorted(set(masks) - set(omics))
        if stray:
            raise InputError(f"masks for modalities not in omics: {stray} (omics has {sorted(omics)})")
        parts = []
        for m in self.modalities:
            if m not in omics:
                continue
            g = self.layouts[m].num_groups
            mk = np.zeros((batch, g), np.int32) if masks.get(m) is None else np.asarray(masks[m])
            if mk.shape != (batch, g):
                raise InputError(f"masks[{m!r}] must be [{batch}, {g}] (1 = masked), got {list(mk.shape)}")
            if not np.isin(mk, (0, 1)).all():
                raise InputError(f"masks[{m!r}] must hold 0 (visible) and 1 (masked) only")
            parts.append(mk.astype(np.int32))
        token_mask = jnp.asarray(np.concatenate(parts, axis=1) if parts else np.zeros((batch, 0), np.int32))
        out = self._reconstruct_fn(self._params, wsi, wsi_mask, omics, token_mask)
        return {m: np.asarray(v) for m, v in out.items()}

    def to_features(self, modality: str, grouped) -> np.ndarray:
        """``[B, Σ group sizes]`` → ``[B, F]`` canonical order; a feature in several groups gets
        the mean of its predictions."""
        if modality not in self.layouts:
            raise InputError(f"unknown modality {modality!r}; this model has {list(self.modalities)}")
        lay = self.layouts[modality]
        grouped = np.asarray(grouped, np.float32)
        if grouped.ndim != 2 or grouped.shape[1] != lay.total_size:
            raise InputError(f"{modality}: expected [B, {lay.total_size}] grouped values, got {list(grouped.shape)}")
        return lay.to_features(grouped)
