"""Evaluation metrics as pure NumPy functions."""

from __future__ import annotations

import numpy as np

# The authors' thresholds (reconstructions.ipynb): features with r above each.
THRESHOLDS = tuple(float(t) for t in np.round(np.linspace(0.01, 0.9, 20), 6))


def pearson_per_feature(pred: np.ndarray, truth: np.ndarray, constant: float = np.nan) -> np.ndarray:
    """Pearson r of each column over rows: pred, truth ``[n, F]`` → ``[F]``.

    A column with zero variance in either array has no correlation: it gets ``constant``
    (NaN by default, as the authors' evaluation: such a feature drops out of medians and
    counts; 0 scores a constant prediction, e.g. the training mean, as uncorrelated).
    """
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    pc = pred - pred.mean(0)
    tc = truth - truth.mean(0)
    denom = np.sqrt((pc ** 2).sum(0) * (tc ** 2).sum(0))
    num = (pc * tc).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 1e-12, num / np.where(denom > 1e-12, denom, 1.0), constant)
    return r


def kept_features(truth: np.ndarray, min_std: float) -> np.ndarray:
    """``[F]`` mask of the features whose sample std (ddof = 1, the authors') exceeds ``min_std``."""
    truth = np.asarray(truth, np.float64)
    return truth.std(0, ddof=1) > min_std if truth.shape[0] > 1 else np.zeros(truth.shape[1], bool)


def summarise_r(r: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """Median over the features with a correlation, their count above each threshold, and how
    many had none (a constant prediction)."""
    finite = r[np.isfinite(r)]
    return {"median_r": float(np.median(finite)) if finite.size else float("nan"),
            "constant_predictions": int(r.size - finite.size),
            "above": {t: int((finite > t).sum()) for t in thresholds}}


def reconstruction_summary(pred: np.ndarray, truth: np.ndarray, min_std: float = 0.0,
                           thresholds=THRESHOLDS, constant: float = np.nan) -> dict:
    """Median per-feature r over features whose truth std > min_std, and counts above thresholds."""
    keep = kept_features(truth, min_std)
    r = pearson_per_feature(np.asarray(pred)[:, keep], np.asarray(truth)[:, keep], constant)
    out = summarise_r(r, thresholds)
    return {**out, "num_features": int(keep.sum()), "above": {str(t): n for t, n in out["above"].items()}}
