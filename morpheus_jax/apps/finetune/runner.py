"""One runner for every downstream `Task`: the cohort, the split plan, per part a fine-tuned
model (or a linear probe on frozen embeddings), its predictions and metrics, then
``predictions.csv`` and ``results.json``."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from morpheus_jax.apps.downstream import Log
from morpheus_jax.apps.finetune.cohort import Cohort, open_cohort, summary_stats
from morpheus_jax.apps.finetune.task import SplitPlan, Task
from morpheus_jax.apps.finetune.trainer import Finetuner
from morpheus_jax.core.atomic import write_csv, write_json
from morpheus_jax.core.config import FinetuneConfig
from morpheus_jax.core.errors import DownstreamError

METHODS = ("finetune", "no_pretrain", "linear_probe")


def run_task(task: Task, checkpoint: str | os.PathLike, dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
             settings: FinetuneConfig, modalities: str = "wsi", split: str = "fine-tune", method: str | None = None,
             log: Log = print) -> dict:
    """Fine-tune (``method`` finetune or no_pretrain, default from ``settings.pretrained``) or
    probe each part of ``task``'s plan; writes ``predictions.csv`` and ``results.json``."""
    method = method or ("finetune" if settings.pretrained else "no_pretrain")
    if method not in METHODS:
        raise DownstreamError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():     # before any training, not after the first fold
        raise DownstreamError(f"--out {out_dir}: is a file, not a folder")
    s = dataclasses.replace(settings, pretrained=method != "no_pretrain")
    cohort = open_cohort(checkpoint, dataset, modalities, split, list(task.columns), log)
    plan = task.prepare(cohort, s)
    trainers: dict[int, Finetuner] = {}

    def trainer_for(fit) -> Finetuner:          # one per output count (survival folds may drop a cut)
        n = fit.head.n_outputs
        if n not in trainers:
            trainers[n] = Finetuner(cohort.ckpt, cohort.inputs, n, task.loss, s, cohort.root, cohort.manifest,
                                    head=fit.head)
        return trainers[n]

    num_patches = _announce(task, cohort, plan, method, s, log)
    embeddings = None
    if method == "linear_probe":
        probe_trainer = trainer_for(task.fit(plan.parts[0][0]))
        embeddings = probe_trainer.embed(probe_trainer.init_params(0, pretrained=True), cohort.records)
    scores, losses, frames, records = [], [], [], []
    for i, (train, test) in enumerate(plan.parts):
        t0 = time.perf_counter()
        fit, rows = task.fit(train), plan.rows(i)
        if embeddings is not None:
            pred = task.probe(embeddings[train], train, embeddings[rows])
        else:
            trainer = trainer_for(fit)
            params, history = trainer.fit([cohort.records[j] for j in train],
                                          {k: np.asarray(v)[train] for k, v in fit.targets.items()}, run=i,
                                          save_to=Path(out_dir) / f"{plan.unit}_{i}", head=fit.head)
            pred = task.decode(trainer.predict(params, [cohort.records[j] for j in rows]), fit)
            losses.append(history)
        held_out = np.isin(rows, test)
        scores.append(task.score(rows[held_out], pred[held_out], fit))
        frames.append(_frame(task, cohort, plan, i, rows, held_out, pred, fit))
        records.append(fit.record)
        trained = f"; train loss {losses[-1][0]:.3f} → {losses[-1][-1]:.3f}" if embeddings is None else ""
        log(f"{plan.unit} {i + 1}/{len(plan.parts)}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores[-1].items())
            + f" ({train.size} train, {test.size} test{trained}; {time.perf_counter() - t0:.1f} s)")
    out_dir = Path(out_dir)
    frame = pd.concat(frames)
    if plan.by_patient:
        frame = frame.sort_values("_row", kind="stable")
    write_csv(out_dir / "predictions.csv", frame.drop(columns="_row"), float_format=task.float_format)
    results = _results(task, cohort, plan, method, scores, records, losses, {**dataclasses.asdict(s),
                                                                            "num_patches": num_patches})
    write_json(out_dir / "results.json", results)
    log(", ".join(f"{m} {results[f'{m}_mean']:.3f} ± {results[f'{m}_std']:.3f}" for m in task.metrics)
        + f" over {len(plan.parts)} {plan.unit}s; wrote {out_dir / 'predictions.csv'} and results.json")
    return results


def _announce(task: Task, cohort: Cohort, plan: SplitPlan, method: str, s: FinetuneConfig, log: Log) -> int:
    """Log what is run; the patches per training bag."""
    num_patches = s.num_patches or cohort.ckpt.config.data.num_patches
    log(f"{task.title} ({method}) on {len(cohort.records)} {cohort.split} patients, {task.describe()}, inputs "
        f"{cohort.inputs.label}, {len(plan.parts)} {plan.unit}s; {s.epochs} epochs, batch {s.batch_size}, "
        f"lr {s.learning_rate:g}, {num_patches} patches per training bag")
    return num_patches


def _frame(task: Task, cohort: Cohort, plan: SplitPlan, part: int, rows: np.ndarray, held_out: np.ndarray,
           pred: np.ndarray, fit) -> pd.DataFrame:
    ids = cohort.ids
    return pd.DataFrame({"submitter_id": [ids[j] for j in rows], plan.unit: part,
                         **({"support": (~held_out).astype(int)} if plan.unit == "draw" else {}),
                         **task.prediction_columns(rows, pred, fit), "_row": rows})


def _results(task: Task, cohort: Cohort, plan: SplitPlan, method: str, scores: list[dict], records: list[dict],
             losses: list, settings: dict) -> dict:
    out = {"task": task.title, "method": method, **task.header(), "modalities": cohort.inputs.label,
           "split": cohort.split, "checkpoint": str(cohort.ckpt.step_dir), "step": cohort.ckpt.step,
           "patients": len(cohort.records), **task.fields()}
    for m in task.metrics:
        out[f"{m}_per_{plan.unit}"] = [s[m] for s in scores]
    for m in task.metrics:
        out[f"{m}_mean"], out[f"{m}_std"] = summary_stats([s[m] for s in scores])
    for key in records[0] if records else ():
        out[key] = [r[key] for r in records]
    return {**out, "train_loss_per_epoch": losses, "settings": settings}
