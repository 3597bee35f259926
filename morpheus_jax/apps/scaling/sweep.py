"""Running a ladder (`morpheus sweep`) and collecting its runs into a scaling table.

Local runs go one after another, in this process (`pretrain`) or one subprocess each;
finished runs are skipped, interrupted ones resume from their checkpoints. Remote
launchers print (or submit) one ``launch/`` command per unfinished run.

Each run folder gets ``scaling.json`` (parameter counts and analytic FLOPs, written when
the run is launched locally), so a table can be collected without the dataset.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import yaml

from morpheus_jax.apps.pretrain import ensure_dataset, pretrain
from morpheus_jax.apps.scaling.ladder import (
    Ladder,
    dataset_layouts,
    expand,
    launch_command,
    pretrain_args,
    resolve_steps,
    run_config,
    run_status,
    shell,
)
from morpheus_jax.core.atomic import replacing, write_json
from morpheus_jax.core.config import Config, from_dict, yaml_problem
from morpheus_jax.core.errors import ConfigError, LadderError, MissingPath, UserError
from morpheus_jax.data import records
from morpheus_jax.data.pipeline import num_train_records
from morpheus_jax.engine.state import total_steps
from morpheus_jax.model import flops as fl

SCALING_JSON = "scaling.json"
TABLE_COLUMNS = ["run", "params", "samples", "loss", "flops", "params_without_group_mlps", "flops_per_sample",
                 "steps", "batch", "U", "seed", "hidden_size", "encoder_layers", "num_prototypes", "train_fraction"]


def scaling_info(cfg: Config, layouts) -> dict:
    """Parameter counts and per-step analytic FLOPs of a run's config."""
    pc = fl.param_counts(cfg.model, layouts)
    sf = fl.step_flops(cfg.model, layouts, cfg.train.global_batch_size, cfg.data.num_patches, cfg.masking.ratio)
    return {"params": pc["total"], "params_without_group_mlps": pc["without_group_mlps"],
            "params_stored": pc["stored"], "flops_per_step": sf["useful"], "flops_per_step_executed": sf["executed"],
            "flops_per_sample": sf["per_sample"], "batch": cfg.train.global_batch_size,
            "encoder_tokens": sf["encoder_tokens"]}


# -- planning --------------------------------------------------------------------------------------------

def _configured_steps(cfg: Config) -> int | None:
    """``train.steps``, or with ``train.epochs`` the loop's count (None without the dataset)."""
    if not cfg.train.epochs:
        return cfg.train.steps
    if not (Path(cfg.data.dir) / records.MANIFEST).exists():
        return None
    return total_steps(cfg, num_train_records(records.load_manifest(cfg.data.dir), cfg.data.train_fraction))


def plan(ladder: Ladder, *, need_dataset: bool = False) -> list[dict]:
    """Every run with its status, resolved config and steps (None while a budget cannot be
    resolved: its dataset is absent and the ladder gives no ``group_sizes``).
    ``need_dataset``: synthesise / prepare an absent dataset first (local runs)."""
    rows = []
    layouts_cache: dict = {}
    for run in expand(ladder):
        cfg = run_config(ladder, run)
        key = (cfg.data.dir, tuple(cfg.model.modalities or ()), cfg.model.group_buckets)
        if key not in layouts_cache:
            if need_dataset and not (Path(cfg.data.dir) / "manifest.json").exists():
                ensure_dataset(cfg)
            # A ladder's group_sizes stand in for a dataset not yet prepared; the dataset wins.
            layouts_cache[key] = dataset_layouts(cfg) or dataset_layouts(cfg, ladder.group_sizes)
        layouts = layouts_cache[key]
        steps = resolve_steps(cfg, run.budget, layouts)
        if run.budget and steps is None and need_dataset:
            raise LadderError(f"run {run.name}: cannot resolve {run.budget} without the dataset's groups "
                              f"({cfg.data.dir} has no manifest.json; set group_sizes in the ladder)")
        if steps is not None:
            cfg = run_config(ladder, run, steps)
        elif not run.budget:
            steps = _configured_steps(cfg)
        rows.append({"run": run, "config": cfg, "steps": steps, "layouts": layouts,
                     "status": run_status(run.run_dir)})
    return rows


def describe(ladder: Ladder, rows: list[dict]) -> str:
    """A table of runs: name, status, steps, samples, parameters, overrides."""
    lines = [f"ladder {ladder.name}: {len(rows)} runs under {ladder.out} (base {ladder.base})"]
    if ladder.fixed:
        lines.append("  fixed: " + " ".join(f"{k}={v}" for k, v in ladder.fixed.items()))
    width = max([len(r["run"].name) for r in rows] + [4])
    lines.append(f"  {'run':<{width}}  {'status':<11} {'steps':>7} {'samples':>9} {'params':>9}  overrides")
    for r in rows:
        run, cfg, steps = r["run"], r["config"], r["steps"]
        params = (f"{fl.param_counts(cfg.model, r['layouts'])['total'] / 1e6:.3f}M" if r["layouts"] is not None
                  else "?")
        samples = steps * cfg.train.global_batch_size if steps is not None else "?"
        over = " ".join(f"{k}={v}" for k, v in run.overrides.items() if ladder.fixed.get(k, object()) != v)
        lines.append(f"  {run.name:<{width}}  {r['status']:<11} {steps if steps is not None else '?':>7} "
                     f"{samples:>9} {params:>9}  {over}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "interrupted", "pending")}
    lines.append("  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


# -- running ------------------------------------------------------------------------------------------------

def run_local(ladder: Ladder, rows: list[dict], *, subprocesses: bool = False, progress: bool = True,
              echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run the unfinished runs one after another; returns ``{run: outcome}`` (done, skipped,
    failed, stopped). A run stopped by SIGTERM/SIGINT stops the sweep (rerun to resume)."""
    outcome = {}
    todo = [r for r in rows if r["status"] != "done"]
    for r in rows:
        if r["status"] == "done":
            outcome[r["run"].name] = "skipped"
    for i, r in enumerate(todo, 1):
        run, cfg = r["run"], r["config"]
        verb = "resuming" if r["status"] == "interrupted" else "starting"
        echo(f"[{i}/{len(todo)}] {verb} {run.name} ({r['steps']} steps) in {run.run_dir}")
        if r["layouts"] is not None:
            write_json(Path(run.run_dir) / SCALING_JSON, {"run": run.name, "overrides": run.overrides,
                                                           **scaling_info(cfg, r["layouts"])})
        t0 = time.perf_counter()
        try:
            if subprocesses:
                cmd = [sys.executable, "-m", "morpheus_jax.cli", "pretrain", *pretrain_args(ladder, run, r["steps"])]
                if not progress:
                    cmd.append("--no-progress")
                code = subprocess.run(cmd).returncode
                status = run_status(run.run_dir)
                result = "done" if code == 0 and status == "done" else ("stopped" if code == 0 else "failed")
            else:
                report = pretrain(cfg, progress=progress)
                result = "stopped" if report.get("stopped_by") else "done"
        except UserError as e:  # one failed run does not stop the ladder
            echo(f"[{i}/{len(todo)}] {run.name} failed: {e}")
            result = "failed"
        except Exception:  # a bug: the same, with its traceback
            echo(f"[{i}/{len(todo)}] {run.name} failed:\n{traceback.format_exc().rstrip()}")
            result = "failed"
        outcome[run.name] = result
        echo(f"[{i}/{len(todo)}] {run.name}: {result} in {time.perf_counter() - t0:.0f} s")
        if result == "stopped":
            echo("sweep stopped; rerun the same command to resume")
            break
    return outcome


def remote_commands(launcher: str, ladder: Ladder, rows: list[dict], *, zone=None, accelerator=None) -> list[list[str]]:
    """``launch/`` commands of the unfinished runs."""
    cmds = []
    for r in rows:
        if r["status"] == "done":
            continue
        if r["run"].budget and r["steps"] is None:
            raise LadderError(f"run {r['run'].name}: budget {r['run'].budget} needs the dataset's group sizes; "
                              "set group_sizes in the ladder (a JSON of {modality: [sizes]})")
        cmds.append(launch_command(launcher, ladder, r["run"], r["steps"], zone=zone, accelerator=accelerator))
    return cmds


def submit(cmds: list[list[str]], echo: Callable[[str], None] = print) -> int:
    """Run launch commands one after another; the number that failed."""
    failed = 0
    for cmd in cmds:
        echo(f"$ {shell(cmd)}")
        if subprocess.run(cmd).returncode != 0:
            failed += 1
    return failed


# -- collecting ------------------------------------------------------------------------------------------------

def _final_loss(run_dir: Path, final: dict) -> float | None:
    if "val_loss" in final:
        return float(final["val_loss"])
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return float(vals[-1]) if vals else None


def collect_run(run_dir: str | Path, group_sizes: str | Path | None = None) -> dict | None:
    """One finished run as a table row (None when unfinished or without a validation loss).

    params / FLOPs come from ``final.json`` when the training loop logged them, else from
    the run's ``scaling.json``, else from its config and dataset manifest (or
    ``group_sizes``)."""

    run_dir = Path(run_dir)
    if not (run_dir / "final.json").exists() or not (run_dir / "config.yaml").exists():
        return None
    try:
        final = json.loads((run_dir / "final.json").read_text())
    except json.JSONDecodeError:
        return None
    loss = _final_loss(run_dir, final)
    if loss is None:
        return None
    try:
        cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except yaml.YAMLError as e:
        raise LadderError(f"{run_dir / 'config.yaml'}: not valid YAML ({yaml_problem(e)})") from None
    except ConfigError as e:
        raise LadderError(f"{run_dir / 'config.yaml'}: not a run config ({e})") from None
    info = {}
    if (run_dir / SCALING_JSON).exists():
        try:
            info = json.loads((run_dir / SCALING_JSON).read_text())
        except json.JSONDecodeError as e:
            raise LadderError(f"{run_dir / SCALING_JSON}: not valid JSON ({e}); delete it to recount from the "
                              "config") from None
    if isinstance(final.get("params"), dict) and isinstance(final.get("flops"), dict):
        info.update({"params": final["params"]["total"],
                     "params_without_group_mlps": final["params"]["without_group_mlps"],
                     "flops_per_step": final["flops"]["useful"], "flops_per_sample": final["flops"]["per_sample"]})
    if "params" not in info or "flops_per_step" not in info:
        layouts = dataset_layouts(cfg, group_sizes)
        if layouts is None:
            raise LadderError(f"{run_dir}: no parameter count (no scaling.json, final.json without params, "
                              f"no dataset at {cfg.data.dir}); pass the group sizes")
        info.update(scaling_info(cfg, layouts))
    steps = int(final.get("step", cfg.train.steps))
    batch = cfg.train.global_batch_size
    unique = None      # U: the unique patients the run trains on
    if (Path(cfg.data.dir) / records.MANIFEST).exists():
        unique = num_train_records(records.load_manifest(cfg.data.dir), cfg.data.train_fraction)
    return {"run": run_dir.name, "params": int(info["params"]), "samples": steps * batch, "loss": loss,
            "flops": float(info["flops_per_step"]) * steps,
            "params_without_group_mlps": int(info["params_without_group_mlps"]),
            "flops_per_sample": float(info["flops_per_sample"]), "steps": steps, "batch": batch,
            "U": unique, "seed": cfg.seed, "hidden_size": cfg.model.hidden_size, "encoder_layers": cfg.model.encoder_layers,
            "num_prototypes": cfg.model.num_prototypes, "train_fraction": cfg.data.train_fraction}


def collect(runs_dir: str | Path, group_sizes: str | Path | None = None,
            exclude: str | Path | None = None) -> list[dict]:
    """Rows of every finished run under ``runs_dir`` (any depth), sorted by run folder, but
    the run folder ``exclude``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise LadderError(f"{runs_dir}: not a folder of runs")
    skip = Path(exclude).resolve() if exclude is not None else None
    rows = []
    for final in sorted(runs_dir.rglob("final.json")):
        if final.parent.resolve() == skip:
            continue
        row = collect_run(final.parent, group_sizes)
        if row is not None:
            rows.append(row)
    if not rows:
        raise LadderError(f"{runs_dir}: no finished run with a validation loss (final.json + config.yaml)")
    return rows


def write_table(rows: list[dict], path: str | Path) -> None:
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    cols += sorted({k for r in rows for k in r} - set(cols))
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def read_table(path: str | Path) -> list[dict]:
    """Rows of a CSV with at least ``params, samples, loss`` (numbers where they parse; ``U``,
    the unique patients, for the data-constrained law; ``seed`` where runs repeat a point)."""
    path = Path(path)
    if not path.exists():
        raise MissingPath(f"{path}: no such scaling table (--table expects a CSV with columns params, samples, loss)")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LadderError(f"{path}: cannot read the scaling table ({e})") from None
    missing = {"params", "samples", "loss"} - set(rows[0] if rows else {})
    if not rows or missing:
        raise LadderError(f"{path}: a scaling table needs columns params, samples, loss"
                          + (f" (missing {sorted(missing)})" if rows else " and at least one row"))
    out = []
    for i, r in enumerate(rows):
        row = {}
        for k, v in r.items():
            try:
                row[k] = float(v) if v not in ("", None) else None
            except ValueError:
                row[k] = v
        if row.get("U") is None and row.get("patients") is not None:   # tables written before U
            row["U"] = row.pop("patients")
        for k in ("params", "samples", "loss"):
            if not isinstance(row[k], float) or row[k] <= 0:
                raise LadderError(f"{path}: row {i + 2}: {k} must be a positive number, got {r[k]!r}")
        out.append(row)
    return out


__all__ = ["collect", "collect_run", "describe", "plan", "read_table", "remote_commands", "run_local",
           "scaling_info", "submit", "write_table"]
