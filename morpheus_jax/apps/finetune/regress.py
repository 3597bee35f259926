"""`morpheus finetune regress`: a continuous metadata column by k-fold cross-validation.

One output; the head learns the target standardised with its training fold's mean and std
(MSE loss), the prediction is ``output · std + mean`` (both stored in the fold's head spec and
its export sidecar). Per held-out fold: Pearson r, mean absolute error and R² (scikit-learn's
``r2_score``). Folds: scikit-learn's ``KFold`` (shuffled, seeded), so ``--no-pretrain`` sees
the same folds, initial head and batches.
"""

from __future__ import annotations

import os

import numpy as np

from morpheus_jax.apps.downstream import Log
from morpheus_jax.apps.finetune.cohort import Cohort, numeric
from morpheus_jax.apps.finetune.protocol import kfold
from morpheus_jax.apps.finetune.runner import run_task
from morpheus_jax.apps.finetune.task import Fit, SplitPlan, Task
from morpheus_jax.core.config import FinetuneConfig
from morpheus_jax.core.errors import DownstreamError
from morpheus_jax.core.spec import HeadSpec
from morpheus_jax.metrics.regression import mean_absolute_error, pearson_r, r2_score, squared_error


class RegressTask(Task):
    """A continuous metadata column: MSE on the fold-standardised target; Pearson r, MAE, R²."""

    metrics, protocol = ("pearson_r", "mae", "r2"), "survival"
    float_format = "%.10g"          # the metrics recomputed from predictions.csv agree to ~1e-9

    def __init__(self, column: str, *, folds: int = 5):
        self.title, self.columns, self.folds = column, (column,), folds

    def prepare(self, cohort: Cohort, settings: FinetuneConfig) -> SplitPlan:
        self.y = y = numeric(cohort.columns[self.title], self.title)
        if not np.isfinite(y).all():
            raise DownstreamError(f"column {self.title!r}: the targets must be finite numbers")
        if np.unique(y).size < 2:
            raise DownstreamError(f"column {self.title!r} holds one value ({y[0]:g}); nothing to regress")
        return SplitPlan.folds(kfold(y.size, self.folds, settings.seed), self.folds, by_patient=True)

    def describe(self) -> str:
        return f"target mean {self.y.mean():.4g}, std {self.y.std():.4g}"

    def fields(self) -> dict:
        return {"folds": self.folds, "target_mean": float(self.y.mean()), "target_std": float(self.y.std())}

    def fit(self, train: np.ndarray) -> Fit:
        mean, std = float(self.y[train].mean()), float(self.y[train].std())
        std = std if std > 0 else 1.0
        return Fit(HeadSpec(self.title, 1, "mse", target_mean=mean, target_std=std),
                   {"target": ((self.y - mean) / std).astype(np.float32)})

    def loss(self, outputs, batch):
        return squared_error(outputs[:, 0], batch["target"])

    def decode(self, outputs: np.ndarray, fit: Fit) -> np.ndarray:
        return outputs[:, 0].astype(np.float64) * fit.head.target_std + fit.head.target_mean

    def score(self, rows: np.ndarray, pred: np.ndarray, fit: Fit) -> dict[str, float]:
        y = self.y[rows]
        return {"pearson_r": pearson_r(y, pred), "mae": mean_absolute_error(y, pred), "r2": r2_score(y, pred)}

    def prediction_columns(self, rows: np.ndarray, pred: np.ndarray, fit: Fit) -> dict:
        return {"target": self.y[rows], "prediction": pred}


def run_regress(checkpoint: str | os.PathLike, dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
                task: str, modalities: str = "wsi", split: str = "fine-tune", folds: int = 5,
                settings: FinetuneConfig | None = None, log: Log = print) -> dict:
    """Cross-validated regression of column ``task``; writes ``predictions.csv`` and ``results.json``."""
    return run_task(RegressTask(task, folds=folds), checkpoint, dataset, out_dir,
                    settings=settings or FinetuneConfig(), modalities=modalities, split=split, log=log)
