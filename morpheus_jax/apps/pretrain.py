"""`morpheus pretrain`: the one training loop.

config → `build_run` (dataset, layouts, mesh, sharded state, AOT-compiled step) → restore
the newest good checkpoint, if any → Grain stream → step → metrics.jsonl / TensorBoard /
progress bar → Orbax checkpoints (every ``checkpoint.every`` steps, at the end, and on
SIGTERM/SIGINT: the current step finishes, a checkpoint is saved, the process exits 0) →
final evaluation (validation loss, WSI-only reconstruction against the training mean).

Resuming continues exactly: parameters, optimizer state and RNG come from the checkpoint,
dropout and masking keys derive from (seed, step), and the data stream restarts at batch
``step`` (its Grain state; when the number of processes changed, the stream is re-divided
from the same global batch index, since batch k is a pure function of the seed and k).
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from morpheus_jax.apps.plots import loss_plot
from morpheus_jax.ckpt.store import Checkpointer, checkpoint_dir, read_spec
from morpheus_jax.core import log
from morpheus_jax.core import sharding as shd
from morpheus_jax.core.atomic import write_json, write_text
from morpheus_jax.core.config import Config, from_dict, model_config_diff, save_config
from morpheus_jax.core.errors import DatasetError, IncompatibleCheckpoint
from morpheus_jax.core.log import append_jsonl, read_jsonl
from morpheus_jax.data import pipeline, records
from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare, summary
from morpheus_jax.data.synth import write_synthetic_cohort
from morpheus_jax.engine.run import build_run, model_spec
from morpheus_jax.engine.validation import Evaluator, reconstruction_report
from morpheus_jax.model import flops as scaling_flops

# -- the loop --------------------------------------------------------------------------------------

class _Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def poll(self) -> int | None:
        """The signal to stop on, agreed by all processes (any one's signal stops them all
        at the same step, so every process takes part in the final checkpoint)."""
        if jax.process_count() == 1:
            return self.signal
        flags = multihost_utils.process_allgather(np.int32(self.signal or 0))
        return int(np.max(flags)) or None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows past ``step`` (a resumed run rewrites them)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _refuse_incompatible(cfg: Config):
    def check(step_dir: Path) -> None:
        saved = from_dict(read_spec(step_dir).config)
        diff = model_config_diff(saved.model, cfg.model)
        if diff:
            raise IncompatibleCheckpoint(f"{step_dir} was written with a different model config: {'; '.join(diff)} "
                                         "(use another run_dir, or the checkpoint's model settings)")
    return check


def ensure_dataset(cfg: Config) -> Path:
    """The prepared dataset at ``data.dir``; the demo synthesises and prepares it if absent
    (process 0 does the work, the others wait for it)."""
    root = Path(cfg.data.dir)
    if not (root / records.MANIFEST).exists() and jax.process_index() == 0:
        if cfg.data.raw_dir is None:
            raise DatasetError(f"{root}: no prepared dataset (run `morpheus prepare` or set data.raw_dir)")
        raw = Path(cfg.data.raw_dir)
        if not (raw / "metadata.csv").exists():
            if not cfg.data.synth_patients:
                raise DatasetError(f"{raw}: no metadata.csv and data.synth_patients is unset")
            log.info(f"synthesising a demo cohort of {cfg.data.synth_patients} patients into {raw}")
            write_synthetic_cohort(raw, n_patients=cfg.data.synth_patients, seed=cfg.seed,
                                   feature_dim=cfg.model.wsi_dim, val_fraction=cfg.data.synth_val_fraction)
        log.info(f"preparing {raw} into {root}")
        manifest = prepare(RawCohort.from_dir(raw), root, PrepareOptions(
            wsi_dim=cfg.model.wsi_dim, allow_missing_modalities=cfg.data.allow_missing_modalities))
        log.info(summary(manifest))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("morpheus:dataset ready")
    return root


def pretrain(cfg: Config, *, progress: bool = True) -> dict:
    """Train (or resume) the run in ``cfg.run_dir``; returns the final report."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_dataset(cfg)
    run = build_run(cfg)
    steps, gbs, mesh, rules = run.steps, cfg.train.global_batch_size, run.mesh, run.rules
    spec = model_spec(cfg, run.manifest)
    ckpt = Checkpointer(checkpoint_dir(run_dir), keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best)
    ds = pipeline.train_dataset(run.root, "pretrain", global_batch=gbs, num_patches=cfg.data.num_patches,
                                seed=cfg.seed, modalities=tuple(run.layouts), process_index=jax.process_index(),
                                process_count=jax.process_count(), manifest=run.manifest,
                                fraction=cfg.data.train_fraction)
    data_iter = pipeline.train_iterator(ds, cfg.data.worker_count, cfg.data.prefetch_buffer)
    restored = ckpt.restore_latest(run.abstract_state(), data_iter, check=_refuse_incompatible(cfg))
    if restored is None:
        state, start = run.init_state(), 0
    else:
        _, state, data_ok = restored
        start = int(jax.device_get(state["step"]))
        if not data_ok or data_iter.get_state()["next_index"] != start:
            data_iter.set_state({"next_index": start})
            log.info(f"data stream repositioned at global batch {start} (checkpoint written by another process count)")
        log.info(f"resumed from {ckpt.directory / str(restored[0])} at step {start}")
    table = shd.describe(run.codec.names, run.codec.shapes, run.param_shardings)
    metrics_path = run_dir / "metrics.jsonl"
    if jax.process_index() == 0:  # run-folder files have one writer
        save_config(cfg, run_dir / "config.yaml")
        write_text(run_dir / "parameters.txt", table + "\n")
        if start == 0:
            metrics_path.unlink(missing_ok=True)
        elif metrics_path.exists():
            _truncate_metrics(metrics_path, start)
    n_params = sum(math.prod(s) for s in run.codec.shapes.values())
    log.info(f"model: {n_params / 1e6:.2f}M stored parameters; {steps} steps of {gbs} ({run.steps_per_epoch} "
        f"steps/epoch over {run.num_train} patients); mesh {dict(mesh.shape)} on {jax.process_count()} process(es)")
    if mesh.size > 1:
        log.info(table)
    else:
        log.info(f"parameter shapes and partition specs: {run_dir / 'parameters.txt'}")
    train_step = run.compile_step()
    flops_info = scaling_flops.step_flops(cfg.model, run.layouts, gbs, cfg.data.num_patches, cfg.masking.ratio)
    param_info = scaling_flops.param_counts(cfg.model, run.layouts)
    device_kind = jax.devices()[0].device_kind
    log.info(scaling_flops.summary(flops_info, param_info))

    evaluator = Evaluator(cfg, run.root, run.manifest, run.codec, run.layouts, mesh)
    from tensorboardX import SummaryWriter  # lazy: start-up time
    tb = SummaryWriter(str(run_dir / "tensorboard")) if jax.process_index() == 0 else None

    def record(row: dict) -> None:
        if jax.process_index() == 0:
            append_jsonl(metrics_path, row)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, row["step"])

    last_val: dict = {}
    if start == 0 and cfg.train.eval_every > 0:
        last_val = {"step": 0, **evaluator.loss(state["params"])}
        record(last_val)

    bar = tqdm(total=steps, initial=start, desc="pretrain", unit="step",
               disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    pending, t_window, stopped_by = [], time.perf_counter(), None
    step = start
    with _Preemption() as pre:
        while step < steps:
            host = next(data_iter)
            batch = shd.host_to_global({k: host[k] for k in ("wsi", "wsi_mask", "available", "omics")}, mesh, rules)
            state, m = train_step(state, batch)
            step += 1
            pending.append(m)
            if len(pending) > 2:
                # Bound dispatch run-ahead (each queued step pins its input batch on device).
                jax.block_until_ready(pending[-3]["loss"])
            stop = pre.poll()
            is_log = step % cfg.train.log_every == 0 or step == steps
            is_eval = cfg.train.eval_every > 0 and (step % cfg.train.eval_every == 0 or step == steps)
            if is_log or is_eval or stop:
                values = jax.device_get(pending[-1])
                elapsed = time.perf_counter() - t_window
                row = {"step": step, **{k: float(v) for k, v in values.items()},
                       "samples_per_s": len(pending) * gbs / max(elapsed, 1e-9)}
                row.update(scaling_flops.throughput(flops_info, row["samples_per_s"], jax.device_count(),
                                                    device_kind, cfg.model.compute_dtype))
                if is_eval:
                    last_val = {"step": step, **evaluator.loss(state["params"])}
                    row.update(last_val)
                record(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}",
                                **({"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}))
                pending, t_window = [], time.perf_counter()
            bar.update(1)
            if step % cfg.checkpoint.every == 0 or step == steps or stop:
                metrics = {"val_loss": last_val["val_loss"]} if last_val.get("step") == step and "val_loss" in last_val else None
                ckpt.save(step, state, data_iter, spec, metrics)
            if stop:
                stopped_by = signal.Signals(stop).name
                break
    bar.close()
    ckpt.close()
    data_iter.close_reader()
    if tb is not None:
        tb.close()
    if jax.process_index() == 0:
        loss_plot(metrics_path, run_dir / "plots" / "loss.png")
    if stopped_by:
        log.info(f"{stopped_by}: saved checkpoint at step {step} in {ckpt.directory}; rerun the same command to resume")
        _all_done()
        return {"step": step, "stopped_by": stopped_by}

    report = {"step": step, **(last_val if last_val.get("step") == step else evaluator.loss(state["params"]))}
    report["step"] = step
    target = "rna" if "rna" in run.layouts else next(iter(run.layouts))
    if evaluator.records:
        report["reconstruction"] = reconstruction_report(evaluator, state["params"], run.root, run.manifest, target)
    report["params"] = {k: v for k, v in param_info.items() if k != "components"}
    report["flops"] = {k: flops_info[k] for k in ("useful", "executed", "per_sample", "batch", "num_patches",
                                                  "encoder_tokens")}
    report["samples"] = step * gbs
    if jax.process_index() == 0:
        write_json(run_dir / "final.json", report)
    rows = read_jsonl(metrics_path)
    first_val = next((r["val_loss"] for r in rows if "val_loss" in r), None)
    if "val_loss" in report:
        log.info(f"validation loss: {report['val_loss']:.4f} (first {first_val:.4f}, "
            f"ratio {report['val_loss'] / first_val:.3f})" if first_val else f"validation loss: {report['val_loss']:.4f}")
    if "reconstruction" in report:
        r = report["reconstruction"]
        log.info(f"WSI-only {r['target']} reconstruction on {r['patients']} validation patients: "
            f"median per-feature Pearson r {r['median_r']:.3f} (training-mean baseline {r['baseline_median_r']:.3f}); "
            f"MAE {r['mae']:.4f} (baseline {r['baseline_mae']:.4f})")
    _all_done()
    return report


def _all_done() -> None:
    """Processes leave together: one exiting while another still works would look like a
    failed task to the coordination service."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("morpheus:pretrain finished")
