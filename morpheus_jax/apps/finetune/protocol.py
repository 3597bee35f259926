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
    """``[n]`` fold of each sample in ``0 … k-1``: scikit-learn's ``StratifiedKFold(k,
    shuffle=True, random_state=seed)`` (the authors' folds), fold ``i`` = the test part of its
    ``i``-th split."""
    from sklearn.model_selection import StratifiedKFold  # lazy: start-up time

    strata = np.asarray(strata)
    if k < 2:
        raise DownstreamError(f"--folds must be at least 2, got {k}")
    if strata.size < k:
        raise DownstreamError(f"{strata.size} patients are too few for {k} folds")
    smallest = min(int((strata == v).sum()) for v in np.unique(strata))
    if smallest < k:
        raise DownstreamError(f"a class has {smallest} patients, fewer than the {k} folds (use fewer --folds)")
    folds = np.empty(strata.size, np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, test) in enumerate(splitter.split(np.zeros(strata.size), strata)):
        folds[test] = i
    return folds


def few_shot_draw(values, k: int, draw: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of few-shot draw ``draw``: the authors' draw, pandas'
    ``DataFrame({"label": values}).groupby("label").sample(n=k, random_state=seed + draw)`` over
    the cohort in metadata order (``values``: the label column's values as read), the rest for
    testing. Rows are positions in ``values``, sorted."""
    import pandas as pd  # lazy: start-up time

    frame = pd.DataFrame({"label": list(values)})
    try:
        chosen = frame.groupby("label").sample(n=k, random_state=seed + draw).index
    except TypeError:                       # labels of mixed types do not sort: group by their text
        chosen = frame.assign(label=frame["label"].astype(str)).groupby("label").sample(
            n=k, random_state=seed + draw).index
    train = np.sort(np.asarray(chosen, np.int64))
    return train, np.setdiff1d(np.arange(len(frame)), train)


def kfold(n: int, k: int, seed: int) -> np.ndarray:
    """``[n]`` fold of each sample in ``0 … k-1``: scikit-learn's ``KFold(k, shuffle=True,
    random_state=seed)`` (a continuous label has no strata), fold ``i`` = the test part of its
    ``i``-th split."""
    from sklearn.model_selection import KFold  # lazy: start-up time

    if k < 2:
        raise DownstreamError(f"--folds must be at least 2, got {k}")
    if n < 2 * k:
        raise DownstreamError(f"{n} patients are too few for {k} folds (each fold needs 2 to correlate)")
    folds = np.empty(n, np.int64)
    for i, (_, test) in enumerate(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n))):
        folds[test] = i
    return folds
