"""Evaluation metrics as pure NumPy functions."""

from __future__ import annotations

import numpy as np

THRESHOLDS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def pearson_per_feature(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson r of each column over rows: pred, truth ``[n, F]`` → ``[F]``.

    A column with zero variance in either array has no correlation; it gets r = 0 (so a
    constant prediction, e.g. the training mean, scores 0).
    """
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    pc = pred - pred.mean(0)
    tc = truth - truth.mean(0)
    denom = np.sqrt((pc ** 2).sum(0) * (tc ** 2).sum(0))
    num = (pc * tc).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 1e-12, num / np.where(denom > 1e-12, denom, 1.0), 0.0)
    return r


def reconstruction_summary(pred: np.ndarray, truth: np.ndarray, min_std: float = 0.0,
                           thresholds=THRESHOLDS) -> dict:
    """Median per-feature r over features whose truth std > min_std, and counts above thresholds."""
    keep = np.asarray(truth).std(0) > min_std
    r = pearson_per_feature(np.asarray(pred)[:, keep], np.asarray(truth)[:, keep])
    return {
        "median_r": float(np.median(r)) if r.size else float("nan"),
        "num_features": int(keep.sum()),
        "above": {str(t): int((r > t).sum()) for t in thresholds},
    }
