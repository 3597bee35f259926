"""`morpheus finetune classify`: few-shot (k per class, repeated draws) or full-data (k-fold)
classification of a metadata column (§4), with two baselines:

- ``finetune``: the pretrained encoder + head, trained end to end (two classes: one logit
  and binary cross-entropy, as the authors; more: softmax cross-entropy);
- ``no_pretrain``: the same model and schedule from random weights;
- ``linear_probe``: the frozen pretrained encoder's embeddings → logistic regression.

Metrics on the held-out patients of each draw / fold: ROC AUC (macro one-vs-rest above two
classes) and balanced accuracy. Draws (pandas' ``groupby(label).sample``, the authors') and
folds (scikit-learn's ``StratifiedKFold``) depend on the seed only, so the three methods see
the same patients.
"""

from __future__ import annotations

import os

import numpy as np

from morpheus_jax.apps.downstream import Log
from morpheus_jax.apps.finetune.cohort import Cohort
from morpheus_jax.apps.finetune.linear_probe import LogisticRegression
from morpheus_jax.apps.finetune.protocol import few_shot_draw, stratified_folds
from morpheus_jax.apps.finetune.runner import METHODS, run_task
from morpheus_jax.apps.finetune.task import Fit, SplitPlan, Task
from morpheus_jax.core.config import FinetuneConfig
from morpheus_jax.core.errors import DownstreamError
from morpheus_jax.core.spec import HeadSpec
from morpheus_jax.metrics.classification import (
    balanced_accuracy,
    binary_cross_entropy,
    roc_auc,
    softmax,
    softmax_cross_entropy,
)


def probabilities(outputs: np.ndarray) -> np.ndarray:
    """``[n, C]`` class probabilities from the head's outputs (``[n, 1]``: a sigmoid)."""
    if outputs.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-outputs[:, 0].astype(np.float64)))
        return np.stack([1.0 - p, p], axis=1)
    return softmax(outputs)


def _sort_key(v):
    try:
        return (0, float(v), str(v))
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def class_labels(values: list, column: str) -> tuple[np.ndarray, list[str]]:
    classes = sorted({str(v) for v in values}, key=_sort_key)
    if len(classes) < 2:
        raise DownstreamError(f"column {column!r} has {len(classes)} class ({', '.join(classes)}); need at least 2")
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[str(v)] for v in values]), classes


class ClassifyTask(Task):
    """A metadata column's classes: one logit + BCE for two (the authors'), softmax
    cross-entropy above; ROC AUC and balanced accuracy per few-shot draw or fold."""

    metrics = ("roc_auc", "balanced_accuracy")

    def __init__(self, column: str, *, k: int = 5, draws: int = 10, full: bool = False, folds: int = 5):
        self.title, self.columns = column, (column,)
        self.k, self.draws, self.full, self.folds = k, draws, full, folds
        self.protocol = "full" if full else "few-shot"

    def header(self) -> dict:
        return {"mode": self.protocol}

    def prepare(self, cohort: Cohort, settings: FinetuneConfig) -> SplitPlan:
        values = cohort.columns[self.title]
        self.y, self.classes = class_labels(values, self.title)
        self.counts = np.bincount(self.y, minlength=len(self.classes))
        if self.full:
            return SplitPlan.folds(stratified_folds(self.y, self.folds, settings.seed), self.folds, by_patient=False)
        if self.k < 1 or self.draws < 1:
            raise DownstreamError("--k and --draws must be at least 1")
        short = [f"{c} ({n})" for c, n in zip(self.classes, self.counts) if n <= self.k]
        if short:
            raise DownstreamError(f"{self.k}-shot needs more than {self.k} patients per class of {self.title!r}; "
                                  f"too few: {', '.join(short)}")
        return SplitPlan("draw", [few_shot_draw(values, self.k, d, settings.seed) for d in range(self.draws)])

    def describe(self) -> str:
        shots = "" if self.full else f"k = {self.k}, "
        return f"{shots}classes {', '.join(f'{c} ({n})' for c, n in zip(self.classes, self.counts))}"

    def fields(self) -> dict:
        return {"classes": self.classes, "class_counts": self.counts.tolist(),
                **({"folds": self.folds} if self.full else {"k": self.k, "draws": self.draws})}

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def fit(self, train: np.ndarray) -> Fit:
        n_outputs, loss = (1, "bce") if self.binary else (len(self.classes), "softmax")
        return Fit(HeadSpec(self.title, n_outputs, loss, tuple(self.classes)), {"label": self.y.astype(np.int32)})

    def loss(self, outputs, batch):
        if self.binary:
            return binary_cross_entropy(outputs[:, 0], batch["label"])
        return softmax_cross_entropy(outputs, batch["label"])

    def decode(self, outputs: np.ndarray, fit: Fit) -> np.ndarray:
        return probabilities(outputs)

    def probe(self, train_embeddings: np.ndarray, train: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        return LogisticRegression().fit(train_embeddings, self.y[train], len(self.classes)).predict_proba(embeddings)

    def score(self, rows: np.ndarray, pred: np.ndarray, fit: Fit) -> dict[str, float]:
        return {"roc_auc": roc_auc(self.y[rows], pred), "balanced_accuracy": balanced_accuracy(self.y[rows],
                                                                                             pred.argmax(1))}

    def prediction_columns(self, rows: np.ndarray, pred: np.ndarray, fit: Fit) -> dict:
        out = {"label": [self.classes[j] for j in self.y[rows]],
               "predicted": [self.classes[j] for j in pred.argmax(1)]}
        return {**out, **{f"prob_{name}": pred[:, c] for c, name in enumerate(self.classes)}}


def run_classify(checkpoint: str | os.PathLike, dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
                 task: str, modalities: str = "wsi", split: str = "fine-tune", k: int = 5, draws: int = 10,
                 full: bool = False, folds: int = 5, method: str = "finetune",
                 settings: FinetuneConfig | None = None, log: Log = print) -> dict:
    """Few-shot draws (or ``full``: k-fold CV); writes ``predictions.csv`` and ``results.json``."""
    if method not in METHODS:
        raise DownstreamError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return run_task(ClassifyTask(task, k=k, draws=draws, full=full, folds=folds), checkpoint, dataset, out_dir,
                    settings=settings or FinetuneConfig(), modalities=modalities, split=split, method=method, log=log)
