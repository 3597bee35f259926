"""`morpheus finetune survival`: discrete-time survival by k-fold cross-validation (§4).

Per fold: 5 intervals cut at quantiles of the training patients' event times, the
logistic-hazard NLL, risk = sum of the outputs (higher = worse), the censored c-index on the
held-out fold. Folds are stratified by the event indicator and depend on the seed only, so
``--no-pretrain`` sees the same folds, initial head and batches.
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
    bin_index,
    concordance_index_censored,
    event_from_censorship,
    logistic_hazard_nll,
    quantile_cuts,
    risk_from_logits,
)


def _loss(outputs, batch):
    return logistic_hazard_nll(outputs, batch["interval"], batch["event"], reduction="none")


def run_survival(checkpoint: str | os.PathLike, dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
                 modalities: str = "wsi", split: str = "fine-tune", folds: int = 5, bins: int = 5,
                 time_column: str = "survival_months", censorship_column: str = "censorship",
                 settings: FinetuneSettings | None = None, log: Log = print) -> dict:
    """Cross-validated fine-tuning; writes ``predictions.csv`` and ``results.json`` to ``out_dir``."""

    s = settings or FinetuneSettings()
    if bins < 1:
        raise DownstreamError(f"--bins must be at least 1, got {bins}")
    cohort = open_cohort(checkpoint, dataset, modalities, split, [time_column, censorship_column], log)
    times = numeric(cohort.columns[time_column], time_column)
    try:
        event = event_from_censorship(numeric(cohort.columns[censorship_column], censorship_column))
    except InputError as e:
        raise DownstreamError(f"column {censorship_column!r}: {e}") from None
    if event.sum() < folds:
        raise DownstreamError(f"{int(event.sum())} observed events are too few for {folds} folds")
    fold_of = stratified_folds(event, folds, s.seed)
    trainer = Finetuner(cohort.ckpt, cohort.inputs, bins, _loss, s, cohort.root, cohort.manifest,
                        head={"task": "survival", "n_outputs": bins, "loss": "logistic_hazard"})
    method = "finetune" if s.pretrained else "no_pretrain"
    log(f"survival ({method}) on {len(cohort.records)} {split} patients ({int(event.sum())} events), inputs "
        f"{cohort.inputs.label}, {folds} folds; {s.epochs} epochs, batch {s.batch_size}, lr {s.learning_rate:g}, "
        f"{trainer.num_patches} patches per training bag")
    risk = np.zeros(len(cohort.records))
    per_fold, cuts_per_fold, losses = [], [], []
    for k in range(folds):
        t0 = time.perf_counter()
        train, test = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        cuts = quantile_cuts(times[train], event[train], bins)
        interval = bin_index(times, cuts)
        params, history = trainer.fit([cohort.records[i] for i in train],
                                      {"interval": interval[train], "event": event[train].astype(np.float32)}, run=k,
                                      save_to=Path(out_dir) / f"fold_{k}")
        risk[test] = risk_from_logits(trainer.predict(params, [cohort.records[i] for i in test]))
        c = concordance_index_censored(event[test], times[test], risk[test])[0]
        per_fold.append(c)
        cuts_per_fold.append(cuts.tolist())
        losses.append(history)
        log(f"fold {k + 1}/{folds}: c-index {c:.3f} on {test.size} patients ({int(event[test].sum())} events); "
            f"train loss {history[0]:.3f} → {history[-1]:.3f} ({time.perf_counter() - t0:.1f} s)")
    out_dir = Path(out_dir)
    write_csv(out_dir / "predictions.csv", pd.DataFrame({"submitter_id": cohort.ids, "fold": fold_of, "risk": risk,
                                                        "time": times, "event": event}), float_format="%.6g")
    mean, std = summary_stats(per_fold)
    results = {"task": "survival", "method": method, "modalities": cohort.inputs.label, "split": split,
               "checkpoint": str(cohort.ckpt.step_dir), "step": cohort.ckpt.step, "patients": len(cohort.records),
               "events": int(event.sum()), "folds": folds, "bins": bins, "time_column": time_column,
               "censorship_column": censorship_column, "c_index_per_fold": per_fold, "c_index_mean": mean,
               "c_index_std": std,
               "bin_cuts_per_fold": cuts_per_fold, "train_loss_per_epoch": losses,
               "settings": {**dataclasses.asdict(s), "num_patches": trainer.num_patches}}
    write_json(out_dir / "results.json", results)
    log(f"c-index {mean:.3f} ± {std:.3f} over {folds} folds; wrote {out_dir / 'predictions.csv'} and results.json")
    return results
