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

import dataclasses
import os
import time
from pathlib import Path

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from morpheus_jax.apps.downstream import Log
from morpheus_jax.apps.finetune.cohort import open_cohort, summary_stats
from morpheus_jax.apps.finetune.linear_probe import LogisticRegression
from morpheus_jax.apps.finetune.protocol import few_shot_draw, stratified_folds
from morpheus_jax.apps.finetune.trainer import Finetuner, FinetuneSettings
from morpheus_jax.core.atomic import write_csv, write_json
from morpheus_jax.core.errors import DownstreamError
from morpheus_jax.metrics.classification import balanced_accuracy, roc_auc, softmax

METHODS = ("finetune", "no_pretrain", "linear_probe")


def _softmax_loss(outputs, batch):
    return -jnp.take_along_axis(jax.nn.log_softmax(outputs, axis=-1), batch["label"][:, None], axis=-1)[:, 0]


def _binary_loss(outputs, batch):
    """The authors' two-class head: one logit, binary cross-entropy (label 1 = the second class)."""
    return optax.sigmoid_binary_cross_entropy(outputs[:, 0], batch["label"].astype(jnp.float32))


def head_for(classes: list[str]) -> tuple[int, Callable, str]:
    """(outputs, loss, name): one logit + BCE for two classes, softmax cross-entropy above."""
    return (1, _binary_loss, "bce") if len(classes) == 2 else (len(classes), _softmax_loss, "softmax")


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


def run_classify(checkpoint: str | os.PathLike, dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
                 task: str, modalities: str = "wsi", split: str = "fine-tune", k: int = 5, draws: int = 10,
                 full: bool = False, folds: int = 5, method: str = "finetune",
                 settings: FinetuneSettings | None = None, log: Log = print) -> dict:
    """Few-shot draws (or ``full``: k-fold CV); writes ``predictions.csv`` and ``results.json``."""

    if method not in METHODS:
        raise DownstreamError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    s = dataclasses.replace(settings or FinetuneSettings(), pretrained=method != "no_pretrain")
    cohort = open_cohort(checkpoint, dataset, modalities, split, [task], log)
    y, classes = class_labels(cohort.columns[task], task)
    counts = np.bincount(y, minlength=len(classes))
    if full:
        fold_of = stratified_folds(y, folds, s.seed)
        parts = [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(folds)]
        unit, mode = "fold", "full"
    else:
        if k < 1 or draws < 1:
            raise DownstreamError("--k and --draws must be at least 1")
        short = [f"{c} ({n})" for c, n in zip(classes, counts) if n <= k]
        if short:
            raise DownstreamError(f"{k}-shot needs more than {k} patients per class of {task!r}; too few: "
                                  f"{', '.join(short)}")
        parts = [few_shot_draw(cohort.columns[task], k, d, s.seed) for d in range(draws)]
        unit, mode = "draw", "few-shot"
    n_outputs, loss, loss_name = head_for(classes)
    trainer = Finetuner(cohort.ckpt, cohort.inputs, n_outputs, loss, s, cohort.root, cohort.manifest,
                        head={"task": task, "n_outputs": n_outputs, "classes": classes, "loss": loss_name})
    log(f"{task} ({method}, {mode}{f', k = {k}' if not full else ''}) on {len(cohort.records)} {split} patients, "
        f"classes {', '.join(f'{c} ({n})' for c, n in zip(classes, counts))}, inputs {cohort.inputs.label}")
    embeddings = None
    if method == "linear_probe":
        embeddings = trainer.embed(trainer.init_params(0, pretrained=True), cohort.records)
    aucs, baccs, losses, frames = [], [], [], []
    for i, (train, test) in enumerate(parts):
        t0 = time.perf_counter()
        # Predictions for the held-out patients; a few-shot draw also reports its support set.
        rows = np.arange(len(y)) if unit == "draw" else test
        if method == "linear_probe":
            prob = LogisticRegression().fit(embeddings[train], y[train], len(classes)).predict_proba(embeddings[rows])
        else:
            params, history = trainer.fit([cohort.records[j] for j in train], {"label": y[train].astype(np.int32)},
                                          run=i, save_to=Path(out_dir) / f"{unit}_{i}")
            prob = probabilities(trainer.predict(params, [cohort.records[j] for j in rows]))
            losses.append(history)
        pred = prob.argmax(1)
        held_out = np.isin(rows, test)
        aucs.append(roc_auc(y[rows][held_out], prob[held_out]))
        baccs.append(balanced_accuracy(y[rows][held_out], pred[held_out]))
        frame = pd.DataFrame({"submitter_id": [cohort.ids[j] for j in rows], unit: i,
                              **({"support": (~held_out).astype(int)} if unit == "draw" else {}),
                              "label": [classes[j] for j in y[rows]], "predicted": [classes[j] for j in pred]})
        for c, name in enumerate(classes):
            frame[f"prob_{name}"] = prob[:, c]
        frames.append(frame)
        log(f"{unit} {i + 1}/{len(parts)}: ROC AUC {aucs[-1]:.3f}, balanced accuracy {baccs[-1]:.3f} "
            f"({train.size} train, {test.size} test; {time.perf_counter() - t0:.1f} s)")
    out_dir = Path(out_dir)
    write_csv(out_dir / "predictions.csv", pd.concat(frames), float_format="%.6g")
    auc_mean, auc_std = summary_stats(aucs)
    bacc_mean, bacc_std = summary_stats(baccs)
    results = {"task": task, "method": method, "mode": mode, "modalities": cohort.inputs.label, "split": split,
               "checkpoint": str(cohort.ckpt.step_dir), "step": cohort.ckpt.step, "patients": len(cohort.records),
               "classes": classes, "class_counts": counts.tolist(),
               **({"folds": folds} if full else {"k": k, "draws": draws}),
               f"roc_auc_per_{unit}": aucs, f"balanced_accuracy_per_{unit}": baccs,
               "roc_auc_mean": auc_mean, "roc_auc_std": auc_std,
               "balanced_accuracy_mean": bacc_mean, "balanced_accuracy_std": bacc_std,
               "train_loss_per_epoch": losses,
               "settings": {**dataclasses.asdict(s), "num_patches": trainer.num_patches}}
    write_json(out_dir / "results.json", results)
    log(f"ROC AUC {auc_mean:.3f} ± {auc_std:.3f}, balanced accuracy {bacc_mean:.3f} ± {bacc_std:.3f} over "
        f"{len(parts)} {unit}s; wrote {out_dir / 'predictions.csv'} and results.json")
    return results
