"""`morpheus finetune survival`: discrete-time survival by k-fold cross-validation (§4).

The authors' labels: pycox's ``LabTransDiscreteTime(bins, scheme='quantiles')`` — cut points
at Kaplan–Meier quantiles, events rounded up to a cut and censored times down, one output per
cut (`metrics.survival.km_quantile_cuts`). The cuts are fitted on each fold's training patients
(``bins_fit="fold"``, no leakage into the held-out fold) or once on the whole cohort as the
authors do (``"all"``). Then the logistic-hazard NLL, risk = sum of the outputs (higher =
worse), the censored c-index on the held-out fold. Folds: the metadata column
``folds_column`` (the authors' precomputed folds) or stratified by the event indicator
(scikit-learn's ``StratifiedKFold``, seeded), so ``--no-pretrain`` sees the same folds,
initial head and batches.
"""

from __future__ import annotations

import os

import numpy as np

from morpheus_jax.apps.downstream import Log
from morpheus_jax.apps.finetune.cohort import Cohort, numeric
from morpheus_jax.apps.finetune.protocol import stratified_folds
from morpheus_jax.apps.finetune.runner import run_task
from morpheus_jax.apps.finetune.task import Fit, SplitPlan, Task
from morpheus_jax.core.config import FinetuneConfig
from morpheus_jax.core.errors import DownstreamError, InputError
from morpheus_jax.core.spec import HeadSpec
from morpheus_jax.metrics.survival import (
    concordance_index_censored,
    discrete_time_labels,
    event_from_censorship,
    km_quantile_cuts,
    logistic_hazard_nll,
    risk_from_logits,
)

BINS_FIT = ("fold", "all")


def precomputed_folds(values: list, column: str) -> tuple[np.ndarray, int]:
    """A metadata column of fold labels → ``[n]`` fold index (labels in sorted order) and the count."""
    labels = [str(v) for v in values]
    names = sorted(set(labels), key=lambda x: (len(x), x))      # "2" before "10"
    if len(names) < 2:
        raise DownstreamError(f"column {column!r}: needs at least 2 distinct folds, has {names}")
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[x] for x in labels], np.int64), len(names)


class SurvivalTask(Task):
    """Discrete-time survival: KM-quantile cuts (per training fold or once), logistic-hazard
    NLL, risk = sum of the outputs, censored c-index per fold."""

    title, metrics, protocol = "survival", ("c_index",), "survival"

    def __init__(self, *, folds: int = 5, bins: int = 5, bins_fit: str = "fold", folds_column: str | None = None,
                 time_column: str = "survival_months", censorship_column: str = "censorship"):
        if bins < 2:
            raise DownstreamError(f"--bins must be at least 2 (cut points of the quantile scheme), got {bins}")
        if bins_fit not in BINS_FIT:
            raise DownstreamError(f"--bins-fit must be one of {', '.join(BINS_FIT)}, got {bins_fit!r}")
        self.folds, self.bins, self.bins_fit, self.folds_column = folds, bins, bins_fit, folds_column
        self.time_column, self.censorship_column = time_column, censorship_column
        self.columns = (time_column, censorship_column) + ((folds_column,) if folds_column else ())

    def prepare(self, cohort: Cohort, settings: FinetuneConfig) -> SplitPlan:
        self.times = times = numeric(cohort.columns[self.time_column], self.time_column)
        if not np.isfinite(times).all() or (times < 0).any():
            raise DownstreamError(f"column {self.time_column!r}: survival times must be finite and non-negative")
        try:
            self.event = event = event_from_censorship(numeric(cohort.columns[self.censorship_column],
                                                               self.censorship_column))
        except InputError as e:
            raise DownstreamError(f"column {self.censorship_column!r}: {e}") from None
        if self.folds_column:
            fold_of, self.folds = precomputed_folds(cohort.columns[self.folds_column], self.folds_column)
        else:
            if event.sum() < self.folds:
                raise DownstreamError(f"{int(event.sum())} observed events are too few for {self.folds} folds")
            fold_of = stratified_folds(event, self.folds, settings.seed)
        if not event.any():
            raise DownstreamError(f"column {self.censorship_column!r}: no observed event, a c-index is undefined")
        self.all_cuts = km_quantile_cuts(times, event, self.bins) if self.bins_fit == "all" else None
        return SplitPlan.folds(fold_of, self.folds, by_patient=True)

    def describe(self) -> str:
        where = "the whole cohort" if self.all_cuts is not None else "each training fold"
        column = f" from column {self.folds_column!r}" if self.folds_column else ""
        return f"{int(self.event.sum())} events, folds{column}, {self.bins} KM-quantile cuts fitted on {where}"

    def fields(self) -> dict:
        return {"events": int(self.event.sum()), "folds": self.folds, "folds_column": self.folds_column,
                "bins": self.bins, "bins_fit": self.bins_fit, "bin_scheme": "km_quantiles",
                "time_column": self.time_column, "censorship_column": self.censorship_column}

    def fit(self, train: np.ndarray) -> Fit:
        cuts = self.all_cuts if self.all_cuts is not None else km_quantile_cuts(self.times[train],
                                                                              self.event[train], self.bins)
        idx, ev = discrete_time_labels(self.times, self.event, cuts)
        return Fit(HeadSpec("survival", len(cuts), "logistic_hazard"),
                   {"interval": idx, "event": ev.astype(np.float32)}, {"time_cuts": cuts.tolist()})

    def loss(self, outputs, batch):
        return logistic_hazard_nll(outputs, batch["interval"], batch["event"], reduction="none")

    def decode(self, outputs: np.ndarray, fit: Fit) -> np.ndarray:
        return np.asarray(risk_from_logits(outputs), np.float64)

    def score(self, rows: np.ndarray, pred: np.ndarray, fit: Fit) -> dict[str, float]:
        return {"c_index": concordance_index_censored(self.event[rows], self.times[rows], pred)[0]}

    def prediction_columns(self, rows: np.ndarray, pred: np.ndarray, fit: Fit) -> dict:
        return {"risk": pred, "time": self.times[rows], "event": self.event[rows],
                "bin": fit.targets["interval"][rows]}


def run_survival(checkpoint: str | os.PathLike, dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
                 modalities: str = "wsi", split: str = "fine-tune", folds: int = 5, bins: int = 5,
                 bins_fit: str = "fold", folds_column: str | None = None,
                 time_column: str = "survival_months", censorship_column: str = "censorship",
                 settings: FinetuneConfig | None = None, log: Log = print) -> dict:
    """Cross-validated fine-tuning; writes ``predictions.csv`` and ``results.json`` to ``out_dir``."""
    task = SurvivalTask(folds=folds, bins=bins, bins_fit=bins_fit, folds_column=folds_column,
                        time_column=time_column, censorship_column=censorship_column)
    return run_task(task, checkpoint, dataset, out_dir, settings=settings or FinetuneConfig(),
                    modalities=modalities, split=split, log=log)
