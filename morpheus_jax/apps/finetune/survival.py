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

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from morpheus_jax.apps.downstream import Log
from morpheus_jax.apps.finetune.cohort import numeric, open_cohort, summary_stats
from morpheus_jax.apps.finetune.protocol import stratified_folds
from morpheus_jax.apps.finetune.trainer import Finetuner, FinetuneSettings
from morpheus_jax.core.atomic import write_csv, write_json
from morpheus_jax.core.errors import DownstreamError, InputError
from morpheus_jax.metrics.survival import (
    concordance_index_censored,
    discrete_time_labels,
    event_from_censorship,
    km_quantile_cuts,
    logistic_hazard_nll,
    risk_from_logits,
)

BINS_FIT = ("fold", "all")


def _loss(outputs, batch):
    return logistic_hazard_nll(outputs, batch["interval"], batch["event"], reduction="none")


def precomputed_folds(values: list, column: str) -> tuple[np.ndarray, int]:
    """A metadata column of fold labels → ``[n]`` fold index (labels in sorted order) and the count."""
    labels = [str(v) for v in values]
    names = sorted(set(labels), key=lambda x: (len(x), x))      # "2" before "10"
    if len(names) < 2:
        raise DownstreamError(f"column {column!r}: needs at least 2 distinct folds, has {names}")
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[x] for x in labels], np.int64), len(names)


def run_survival(checkpoint: str | os.PathLike, dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
                 modalities: str = "wsi", split: str = "fine-tune", folds: int = 5, bins: int = 5,
                 bins_fit: str = "fold", folds_column: str | None = None,
                 time_column: str = "survival_months", censorship_column: str = "censorship",
                 settings: FinetuneSettings | None = None, log: Log = print) -> dict:
    """Cross-validated fine-tuning; writes ``predictions.csv`` and ``results.json`` to ``out_dir``."""

    s = settings or FinetuneSettings()
    if bins < 2:
        raise DownstreamError(f"--bins must be at least 2 (cut points of the quantile scheme), got {bins}")
    if bins_fit not in BINS_FIT:
        raise DownstreamError(f"--bins-fit must be one of {', '.join(BINS_FIT)}, got {bins_fit!r}")
    columns = [time_column, censorship_column] + ([folds_column] if folds_column else [])
    cohort = open_cohort(checkpoint, dataset, modalities, split, columns, log)
    times = numeric(cohort.columns[time_column], time_column)
    if not np.isfinite(times).all() or (times < 0).any():
        raise DownstreamError(f"column {time_column!r}: survival times must be finite and non-negative")
    try:
        event = event_from_censorship(numeric(cohort.columns[censorship_column], censorship_column))
    except InputError as e:
        raise DownstreamError(f"column {censorship_column!r}: {e}") from None
    if folds_column:
        fold_of, folds = precomputed_folds(cohort.columns[folds_column], folds_column)
    else:
        if event.sum() < folds:
            raise DownstreamError(f"{int(event.sum())} observed events are too few for {folds} folds")
        fold_of = stratified_folds(event, folds, s.seed)
    if not event.any():
        raise DownstreamError(f"column {censorship_column!r}: no observed event, a c-index is undefined")
    trainers: dict[int, Finetuner] = {}

    def trainer_for(n_outputs: int) -> Finetuner:       # one per output count (folds may drop a duplicate cut)
        if n_outputs not in trainers:
            trainers[n_outputs] = Finetuner(cohort.ckpt, cohort.inputs, n_outputs, _loss, s, cohort.root,
                                            cohort.manifest, head={"task": "survival", "n_outputs": n_outputs,
                                                                   "loss": "logistic_hazard"})
        return trainers[n_outputs]

    all_cuts = km_quantile_cuts(times, event, bins) if bins_fit == "all" else None
    num_patches = s.num_patches or cohort.ckpt.config.data.num_patches
    method = "finetune" if s.pretrained else "no_pretrain"
    log(f"survival ({method}) on {len(cohort.records)} {split} patients ({int(event.sum())} events), inputs "
        f"{cohort.inputs.label}, {folds} folds{f' from column {folds_column!r}' if folds_column else ''}, "
        f"{bins} KM-quantile cuts fitted on {'the whole cohort' if all_cuts is not None else 'each training fold'}; "
        f"{s.epochs} epochs, batch {s.batch_size}, lr {s.learning_rate:g}, {num_patches} patches "
        "per training bag")
    risk, label = np.zeros(len(cohort.records)), np.zeros(len(cohort.records), np.int32)
    per_fold, cuts_per_fold, losses = [], [], []
    for k in range(folds):
        t0 = time.perf_counter()
        train, test = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        cuts = all_cuts if all_cuts is not None else km_quantile_cuts(times[train], event[train], bins)
        idx, ev = discrete_time_labels(times, event, cuts)
        trainer = trainer_for(len(cuts))
        params, history = trainer.fit([cohort.records[i] for i in train],
                                      {"interval": idx[train], "event": ev[train].astype(np.float32)}, run=k,
                                      save_to=Path(out_dir) / f"fold_{k}")
        risk[test] = risk_from_logits(trainer.predict(params, [cohort.records[i] for i in test]))
        label[test] = idx[test]
        c = concordance_index_censored(event[test], times[test], risk[test])[0]
        per_fold.append(c)
        cuts_per_fold.append(cuts.tolist())
        losses.append(history)
        log(f"fold {k + 1}/{folds}: c-index {c:.3f} on {test.size} patients ({int(event[test].sum())} events); "
            f"train loss {history[0]:.3f} → {history[-1]:.3f} ({time.perf_counter() - t0:.1f} s)")
    out_dir = Path(out_dir)
    write_csv(out_dir / "predictions.csv", pd.DataFrame({"submitter_id": cohort.ids, "fold": fold_of, "risk": risk,
                                                        "time": times, "event": event, "bin": label}),
              float_format="%.6g")
    mean, std = summary_stats(per_fold)
    results = {"task": "survival", "method": method, "modalities": cohort.inputs.label, "split": split,
               "checkpoint": str(cohort.ckpt.step_dir), "step": cohort.ckpt.step, "patients": len(cohort.records),
               "events": int(event.sum()), "folds": folds, "folds_column": folds_column, "bins": bins,
               "bins_fit": bins_fit, "bin_scheme": "km_quantiles", "time_column": time_column,
               "censorship_column": censorship_column, "c_index_per_fold": per_fold, "c_index_mean": mean,
               "c_index_std": std, "time_cuts": cuts_per_fold, "train_loss_per_epoch": losses,
               "settings": {**dataclasses.asdict(s), "num_patches": num_patches}}
    write_json(out_dir / "results.json", results)
    log(f"c-index {mean:.3f} ± {std:.3f} over {folds} folds; wrote {out_dir / 'predictions.csv'} and results.json")
    return results
