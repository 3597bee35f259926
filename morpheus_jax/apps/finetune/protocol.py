"""Fine-tuning data: training batches of sampled patches, cross-validation folds, few-shot draws.

Training bags hold ``num_patches`` patches drawn as in pretraining (`pipeline.sample_patches`:
a random subset, topped up with replacement for small bags) from a generator keyed on
``(seed, run, epoch, record index)``; evaluation uses every patch (`downstream.iter_batches`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from morpheus_jax.apps.downstream import Inputs
from morpheus_jax.core.errors import DownstreamError
from morpheus_jax.core.manifest import Manifest
from morpheus_jax.data import pipeline
from morpheus_jax.data import records as rec


class TrainSampler:
    """Builds fixed-shape training batches ``{wsi, wsi_mask, omics}`` for rows of a cohort."""

    def __init__(self, root: Path, manifest: Manifest, inputs: Inputs, num_patches: int, seed: int):
        self.root, self.inputs, self.num_patches, self.seed = Path(root), inputs, int(num_patches), int(seed)
        self.dim = manifest.patches.dim
        self.dtype = rec.patch_numpy_dtype(manifest.patches.dtype)

    def batch(self, records: list[dict], rows: np.ndarray, run: int, epoch: int) -> dict:
        b = len(rows)
        out: dict = {"wsi": None, "wsi_mask": None}
        if self.inputs.wsi:
            wsi = np.empty((b, self.num_patches, self.dim), self.dtype)
            for j, i in enumerate(rows):
                r = records[i]
                rng = np.random.default_rng([self.seed, run, epoch, r["index"]])
                pipeline.sample_patches(self.root, r, self.num_patches, rng, out=wsi[j])
            out["wsi"], out["wsi_mask"] = wsi, np.ones((b, self.num_patches), bool)
        out["omics"] = {m: np.stack([np.asarray(records[i]["omics"][m], np.float32) for i in rows])
                        for m in self.inputs.omics}
        return out


def stratified_folds(strata, k: int, seed: int) -> np.ndarray:
    """``[n]`` fold of each sample in ``0 … k-1``: each stratum shuffled, then dealt round-robin
    (strata in sorted order), so folds differ in size by at most one and hold each stratum evenly."""
    strata = np.asarray(strata)
    if k < 2:
        raise DownstreamError(f"--folds must be at least 2, got {k}")
    if strata.size < k:
        raise DownstreamError(f"{strata.size} patients are too few for {k} folds")
    rng = np.random.default_rng([seed, 0xF01D])
    order = np.concatenate([rng.permutation(np.flatnonzero(strata == s)) for s in np.unique(strata)])
    folds = np.empty(strata.size, np.int64)
    folds[order] = np.arange(strata.size) % k
    return folds


def few_shot_draw(labels, n_classes: int, k: int, draw: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows: k per class, test rows: the rest) of one random draw."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0xD4A3, draw])
    train = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                                    for c in range(n_classes)]))
    return train, np.setdiff1d(np.arange(labels.size), train)
