"""What a downstream task declares for `runner.run_task`: the metadata columns it reads, its
labels, its split plan (folds or few-shot draws), its head (size and loss), its metrics and
its prediction columns. Survival, classification and regression are three `Task`s; a new label
type is one more subclass, the runner (training, prediction, output files) is shared."""

from __future__ import annotations

import abc
import dataclasses

import jax
import numpy as np

from morpheus_jax.apps.finetune.cohort import Cohort
from morpheus_jax.core.config import FinetuneConfig
from morpheus_jax.core.errors import DownstreamError
from morpheus_jax.core.spec import HeadSpec


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """(training rows, test rows) per part of the cohort. A ``fold`` predicts its held-out
    patients; a ``draw`` (few-shot) predicts every patient, its training ones flagged
    ``support``. ``by_patient``: predictions.csv in cohort order (folds only), else part after part."""

    unit: str
    parts: list[tuple[np.ndarray, np.ndarray]]
    by_patient: bool = False

    def __post_init__(self):
        if self.unit not in ("fold", "draw"):
            raise ValueError(f"a split plan's unit is fold or draw, got {self.unit!r}")

    @classmethod
    def folds(cls, fold_of: np.ndarray, count: int, by_patient: bool) -> "SplitPlan":
        return cls("fold", [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(count)],
                   by_patient)

    def rows(self, part: int) -> np.ndarray:
        train, test = self.parts[part]
        return np.arange(sum(t.size for t in self.parts[part])) if self.unit == "draw" else test


@dataclasses.dataclass(frozen=True)
class Fit:
    """What one part trains: the head (its size, loss, meaning), the targets per cohort row
    (``{name: [n]}``, what `Task.loss` reads from a batch; the runner takes the training
    rows) and values of this part for results.json (``{key: value}``, listed per part)."""

    head: HeadSpec
    targets: dict[str, np.ndarray]
    record: dict = dataclasses.field(default_factory=dict)


class Task(abc.ABC):
    """A downstream task. `prepare` reads and checks the labels and returns the split plan; then
    per part `fit` → training, `decode` of the head's outputs → predictions, `score` and
    `prediction_columns` of the rows. Results hold ``<metric>_per_<unit>``, ``_mean``, ``_std``."""

    title: str                  # results.json "task"
    columns: tuple[str, ...]    # metadata columns read (patients lacking one are excluded)
    metrics: tuple[str, ...]
    protocol: str = "survival"  # default settings (`trainer.PROTOCOLS`)
    float_format: str = "%.6g"  # of predictions.csv

    def header(self) -> dict:
        """results.json fields after ``method`` (e.g. the classification mode)."""
        return {}

    @abc.abstractmethod
    def prepare(self, cohort: Cohort, settings: FinetuneConfig) -> SplitPlan:
        """Read and check the labels from ``cohort.columns``; the split plan."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The labels in a few words, for the opening log line."""

    @abc.abstractmethod
    def fields(self) -> dict:
        """results.json fields about the cohort's labels and the plan, before the metrics."""

    @abc.abstractmethod
    def fit(self, train: np.ndarray) -> Fit:
        """The head and targets of the part training on rows ``train``."""

    @abc.abstractmethod
    def loss(self, outputs: jax.Array, batch: dict) -> jax.Array:
        """outputs ``[B, n_out]`` and the batch (with the `Fit` targets) → per-row loss ``[B]``."""

    @abc.abstractmethod
    def decode(self, outputs: np.ndarray, fit: Fit) -> np.ndarray:
        """``[n, n_out]`` head outputs → the predictions `score` reads (``[n]`` or ``[n, C]``)."""

    @abc.abstractmethod
    def score(self, rows: np.ndarray, pred: np.ndarray, fit: Fit) -> dict[str, float]:
        """`metrics` on the held-out ``rows`` (cohort positions) and their predictions."""

    @abc.abstractmethod
    def prediction_columns(self, rows: np.ndarray, pred: np.ndarray, fit: Fit) -> dict[str, np.ndarray | list]:
        """predictions.csv columns after ``submitter_id``, the part and ``support``."""

    def probe(self, train_embeddings: np.ndarray, train: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Predictions (as `decode`'s) of a model fitted on frozen embeddings (the linear probe)."""
        raise DownstreamError(f"the linear probe is not available for {self.title}")
