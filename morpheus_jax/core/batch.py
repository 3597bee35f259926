"""The training batch: one definition of its keys, shapes, dtypes and shardings.

A batch is a dict of NumPy arrays (host) or ``jax.Array``s (device), ``B`` rows::

    wsi        [B, N, D]  patch dtype of the dataset (float16 / bfloat16 / float32)
    wsi_mask   [B, N]     bool, True = real patch
    available  [B, M]     bool, modality m of the row has data (M = the model's modalities)
    omics      {m: [B, F_m]}  float32, canonical feature order

The data pipeline builds host batches with these keys (plus bookkeeping keys it may add,
such as ``record``); `select` keeps the ones the step takes; `abstract` and `shardings` give
what the step is compiled for. Every leaf is sharded on its leading (batch) axis by the
``batch`` logical axis rule.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from morpheus_jax.core import sharding as shd

KEYS = ("wsi", "wsi_mask", "available", "omics")
# The device path (``data.patch_source=device``): patches stay in a device bank; per row the
# host sends the patient's bank offset, patch count and the uint32 key its bag is drawn from.
BANK_KEYS = ("patch_offset", "patch_count", "patch_key", "available", "omics")


def select(batch: Mapping, keys: tuple[str, ...] = KEYS) -> dict:
    """The step's keys of a host batch (bookkeeping keys dropped)."""
    return {k: batch[k] for k in keys}


def shapes(batch_size: int, num_patches: int, wsi_dim: int, patch_dtype, features: Mapping[str, int]) -> dict:
    """``{key: (shape, dtype)}`` (``omics``: ``{m: (shape, dtype)}``); ``features``: F per modality, model order."""
    b, n = batch_size, num_patches
    return {"wsi": ((b, n, wsi_dim), np.dtype(patch_dtype)), "wsi_mask": ((b, n), np.dtype(bool)),
            "available": ((b, len(features)), np.dtype(bool)),
            "omics": {m: ((b, f), np.dtype(np.float32)) for m, f in features.items()}}


def shardings(mesh: jax.sharding.Mesh, rules, modalities) -> dict:
    """NamedShardings of every leaf: rows on the batch mesh axes, the rest replicated."""
    return {"wsi": shd.batch_sharding(mesh, rules, 3), "wsi_mask": shd.batch_sharding(mesh, rules, 2),
            "available": shd.batch_sharding(mesh, rules, 2),
            "omics": {m: shd.batch_sharding(mesh, rules, 2) for m in modalities}}


def abstract(shape_tree: dict, sharding_tree: dict) -> dict:
    """``jax.ShapeDtypeStruct`` leaves (what the step is lowered for)."""
    return jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t[0], t[1], sharding=s), shape_tree, sharding_tree,
                        is_leaf=lambda t: isinstance(t, tuple))


def bank_shapes(batch_size: int, features: Mapping[str, int]) -> dict:
    """`shapes` of a device-path batch (`BANK_KEYS`)."""
    b = batch_size
    return {"patch_offset": ((b,), np.dtype(np.int32)), "patch_count": ((b,), np.dtype(np.int32)),
            "patch_key": ((b, 2), np.dtype(np.uint32)), "available": ((b, len(features)), np.dtype(bool)),
            "omics": {m: ((b, f), np.dtype(np.float32)) for m, f in features.items()}}


def bank_shardings(mesh: jax.sharding.Mesh, rules, modalities) -> dict:
    """`shardings` of a device-path batch: rows on the batch mesh axes."""
    return {"patch_offset": shd.batch_sharding(mesh, rules, 1), "patch_count": shd.batch_sharding(mesh, rules, 1),
            "patch_key": shd.batch_sharding(mesh, rules, 2), "available": shd.batch_sharding(mesh, rules, 2),
            "omics": {m: shd.batch_sharding(mesh, rules, 2) for m in modalities}}
