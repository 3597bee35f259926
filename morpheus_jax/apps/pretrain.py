"""`morpheus pretrain`: masked omics modelling on `engine.Trainer`.

config → dataset (the demo synthesises and prepares one) → `build_run` (layouts, mesh,
sharded state, AOT-compiled step) → restore the newest good checkpoint, if any → Grain
stream → `Trainer` (metrics.jsonl / TensorBoard / progress bar, validation every
``train.eval_every`` steps, Orbax checkpoints every ``checkpoint.every`` steps, at the end
and on SIGTERM/SIGINT: the current step finishes, a checkpoint is saved, the process exits
0) → final report (validation loss, WSI-only reconstruction against the training mean).

Resuming continues exactly: parameters, optimizer state and RNG come from the checkpoint,
dropout and masking keys derive from (seed, step), and the data stream restarts at batch
``step`` (its Grain state; when the number of processes changed, the stream is re-divided
from the same global batch index, since batch k is a pure function of the seed and k).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from morpheus_jax.apps.events import ScalarEvents
from morpheus_jax.apps.plots import loss_plot
from morpheus_jax.ckpt.store import Checkpointer, checkpoint_dir, read_spec
from morpheus_jax.core import batch as batch_contract
from morpheus_jax.core import log
from morpheus_jax.core import sharding as shd
from morpheus_jax.core.atomic import write_json, write_text
from morpheus_jax.core.config import Config, from_dict, model_config_diff, save_config
from morpheus_jax.core.errors import CheckpointError, ConfigError, DatasetError, IncompatibleCheckpoint
from morpheus_jax.core.log import append_jsonl, read_jsonl
from morpheus_jax.core.runlock import RunLock
from morpheus_jax.core.spec import BUCKETED_LAYOUT, ModelSpec
from morpheus_jax.data import pipeline, records
from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare, summary
from morpheus_jax.data.synth import write_synthetic_cohort
from morpheus_jax.engine import bank as device_bank
from morpheus_jax.engine.run import Run, build_run, model_spec
from morpheus_jax.engine.trainer import Trainer, signals_deferred
from morpheus_jax.engine.validation import Evaluator, reconstruction_report
from morpheus_jax.model import flops as scaling_flops


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


DATASET_JSON = "dataset.json"


def dataset_fingerprint(manifest) -> str:
    """A prepared dataset's content: its shards' checksums and its features (not when or
    where it was prepared)."""
    content = [[s["split"], s["records"]["sha256"], s["patches"]["sha256"]] for s in manifest.shards]
    content.append({m: [info.groups, info.features] for m, info in manifest.modalities.items()})
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _check_dataset(run: Run) -> None:
    """A rerun on other data than the run's checkpoints were trained on refuses, naming both
    datasets, unless ``data.continue_on_new_data`` (then the new dataset is recorded)."""
    path = Path(run.cfg.run_dir) / DATASET_JSON
    current = {"dir": str(run.root), "fingerprint": dataset_fingerprint(run.manifest),
               "patients": dict(run.manifest.counts)}
    has_checkpoints = any(p.name.isdigit() for p in checkpoint_dir(run.cfg.run_dir).glob("*"))
    try:
        recorded = json.loads(path.read_text()) if path.exists() else None
        if recorded is not None and not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:     # written beside and renamed: damaged from outside
        recorded = None
        if has_checkpoints:
            log.warning(f"{path}: unreadable ({e}); the dataset the checkpoints were trained on is unknown, so it "
                        f"is not compared with data.dir={run.root}, which it now records")
    if recorded and has_checkpoints and recorded.get("fingerprint") != current["fingerprint"]:
        if not run.cfg.data.continue_on_new_data:
            raise ConfigError(
                f"run_dir={run.cfg.run_dir} was trained on the dataset {recorded.get('dir')} ({recorded.get('patients')}, "
                f"fingerprint {str(recorded.get('fingerprint'))[:12]}); data.dir={run.root} holds another "
                f"({current['patients']}, fingerprint {current['fingerprint'][:12]}): use a new run_dir, or set "
                "data.continue_on_new_data=true to continue from the checkpoint on the new data")
        log.warning(f"continuing {run.cfg.run_dir} on the dataset {run.root} (trained so far on {recorded.get('dir')})")
    if jax.process_index() == 0 and recorded != current:
        write_json(path, current)


def _refuse_incompatible(cfg: Config, current: ModelSpec | None = None):
    """Checks a checkpoint before it is resumed (raises, it is not set aside as damaged)."""
    def check(step_dir: Path) -> None:
        spec = read_spec(step_dir)
        if current is not None and (spec.groups, spec.features) != (current.groups, current.features):
            saved = ", ".join(f"{m} {len(g)} groups / {len(spec.features.get(m, []))} features"
                              for m, g in spec.groups.items())
            now = ", ".join(f"{m} {len(g)} groups / {len(current.features.get(m, []))} features"
                            for m, g in current.groups.items())
            raise IncompatibleCheckpoint(f"{step_dir} was trained on another dataset's features ({saved}); "
                                         f"data.dir={cfg.data.dir} has {now}: use a new run_dir")
        if spec.param_layout == BUCKETED_LAYOUT:
            raise CheckpointError(f"{step_dir} was written by morpheus-jax 0.1 (bucketed parameter layout): export, "
                                  "morpheus_jax.load and fine-tuning read it, but its optimizer state cannot be "
                                  "resumed; continue in another run_dir")
        saved = from_dict(spec.config)
        diff = model_config_diff(saved.model, cfg.model)
        if diff:
            raise IncompatibleCheckpoint(f"{step_dir} was written with a different model config: {'; '.join(diff)} "
                                         "(use another run_dir, or the checkpoint's model settings)")
    return check


def _restore_or_init(run: Run, ckpt: Checkpointer, data_iter) -> tuple[dict, int]:
    """The newest good checkpoint's state (data stream repositioned to its step), or a fresh state."""
    restored = ckpt.restore_latest(run.abstract_state(), data_iter,
                                   check=_refuse_incompatible(run.cfg, model_spec(run.cfg, run.manifest)))
    if restored is None:
        return run.init_state(), 0
    step_saved, state, data_ok = restored
    start = int(jax.device_get(state["step"]))
    if not data_ok or data_iter.get_state()["next_index"] != start:
        data_iter.set_state({"next_index": start})
        log.info(f"data stream repositioned at global batch {start} (checkpoint written by another process count)")
    log.info(f"resumed from {ckpt.directory / str(step_saved)} at step {start}")
    return state, start


class RunFolder:
    """The run folder's files, written by process 0 only: config.yaml, parameters.txt,
    metrics.jsonl (+ TensorBoard), plots/loss.png, final.json."""

    def __init__(self, run: Run, start: int):
        self.dir = Path(run.cfg.run_dir)
        self.metrics = self.dir / "metrics.jsonl"
        self.writer = jax.process_index() == 0
        self.table = shd.describe(run.codec.names, run.codec.shapes, run.param_shardings)
        self.tb = None
        if not self.writer:
            return
        save_config(run.cfg, self.dir / "config.yaml")
        write_text(self.dir / "parameters.txt", self.table + "\n")
        if start == 0:
            self.metrics.unlink(missing_ok=True)
        elif self.metrics.exists():   # a resumed run rewrites the rows past its checkpoint
            rows = [r for r in read_jsonl(self.metrics) if r.get("step", 0) <= start]
            write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))
        self.tb = ScalarEvents(self.dir / "tensorboard", purge_step=start + 1 if start else None)

    def record(self, row: dict) -> None:
        if not self.writer:
            return
        try:
            append_jsonl(self.metrics, row)
            self.tb.add(row["step"], {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))})
        except OSError as e:       # a write names no file: name the run folder
            raise e if e.filename else OSError(e.errno, e.strerror, str(self.dir)) from e

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            loss_plot(self.metrics, self.dir / "plots" / "loss.png")


@dataclasses.dataclass
class InputPath:
    """Where the step's bags come from (``data.patch_source``): the host batch stream, the
    keys handed to the device, the compiled step and the bytes it takes from the host."""

    dataset: object
    keys: tuple[str, ...]
    step: object
    input_bytes: dict


def _input_path(run: Run) -> InputPath:
    cfg = run.cfg
    compiled = run.compile_step() if cfg.data.patch_source != "device" else None
    if device_bank.resolve_source(run, compiled) == "device":
        bank = device_bank.build_bank(run, cfg.data.bank_dtype)
        return InputPath(bank.dataset(cfg.seed), batch_contract.BANK_KEYS, bank.compile_step(),
                         device_bank.input_bytes(bank.abstract_batch(), None))
    ds = pipeline.train_dataset(run.root, "pretrain", global_batch=cfg.train.global_batch_size,
                                num_patches=cfg.data.num_patches, seed=cfg.seed, modalities=tuple(run.layouts),
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                manifest=run.manifest, fraction=cfg.data.train_fraction)
    return InputPath(ds, batch_contract.KEYS, compiled, device_bank.input_bytes(run.abstract_batch(), "wsi"))


def _describe(run: Run, folder: RunFolder, flops_info: dict, param_info: dict) -> None:
    cfg, mesh = run.cfg, run.mesh
    n_params = run.codec.stored_size()
    log.info(f"model: {n_params / 1e6:.2f}M stored parameters; {run.steps} steps of {cfg.train.global_batch_size} "
             f"({run.steps_per_epoch} steps/epoch over {run.num_train} patients); mesh {dict(mesh.shape)} on "
             f"{jax.process_count()} process(es)")
    log.info(folder.table if mesh.size > 1 else f"parameter shapes and partition specs: {folder.dir / 'parameters.txt'}")
    log.info(scaling_flops.summary(flops_info, param_info))


def pretrain(cfg: Config, *, progress: bool = True) -> dict:
    """Train (or resume) the run in ``cfg.run_dir``; returns the final report."""
    shd.mesh_shape(cfg.mesh, jax.device_count())     # a bad mesh fails before any data work
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir}: is a file, not a folder")
    ensure_dataset(cfg)
    run = build_run(cfg)                              # dataset against config: before the run folder exists
    lock = RunLock(cfg.run_dir).acquire() if jax.process_index() == 0 else None   # one writer per run folder
    try:
        return _train(run, progress)
    finally:
        if lock is not None:
            lock.release()


def _train(run: Run, progress: bool) -> dict:
    cfg = run.cfg
    _check_dataset(run)
    gbs = cfg.train.global_batch_size
    ckpt = Checkpointer(checkpoint_dir(cfg.run_dir), keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best)
    feed = _input_path(run)
    data_iter = pipeline.train_iterator(feed.dataset, cfg.data.worker_count, cfg.data.prefetch_buffer)
    state, start = _restore_or_init(run, ckpt, data_iter)
    folder = RunFolder(run, start)
    flops_info = scaling_flops.step_flops(cfg.model, run.layouts, gbs, cfg.data.num_patches, cfg.masking.ratio)
    param_info = scaling_flops.param_counts(cfg.model, run.layouts)
    _describe(run, folder, flops_info, param_info)
    evaluator = Evaluator(cfg, run.root, run.manifest, run.codec, run.layouts, run.mesh)
    last_eval: dict = {}
    if start == 0 and cfg.train.eval_every > 0:
        last_eval = {"step": 0, **evaluator.loss(state["params"])}
        folder.record(last_eval)
    spec, device_kind = model_spec(cfg, run.manifest), jax.devices()[0].device_kind

    def save(step, state, eval_row):
        best = {"val_loss": eval_row["val_loss"]} if eval_row and "val_loss" in eval_row else None
        ckpt.save(step, state, data_iter, spec, best)

    def on_row(row):
        ckpt.seal_finished()            # checksums of the saves finished since (no waiting)
        folder.record(row)

    trainer = Trainer(
        feed.step, run.steps, gbs, to_device=lambda host: shd.host_to_global(
            batch_contract.select(host, feed.keys), run.mesh, run.rules),
        log_every=cfg.train.log_every, eval_every=cfg.train.eval_every,
        evaluate=lambda state: evaluator.loss(state["params"]), on_row=on_row,
        extra_row=lambda row: {**feed.input_bytes, **scaling_flops.throughput(
            flops_info, row["samples_per_s"], jax.device_count(), device_kind, cfg.model.compute_dtype)},
        checkpoint_every=cfg.checkpoint.every, save=save, preemption_every=cfg.checkpoint.preemption_check_every,
        max_skipped_in_a_row=cfg.train.max_skipped_in_a_row,
        progress=progress, desc="pretrain")
    try:
        result = trainer.run(state, data_iter, start, last_eval)
    finally:                      # a diverged run keeps its checkpoints whole (async saves finish)
        with signals_deferred("finishing the checkpoint and stopping the data workers"):
            ckpt.close()
            data_iter.close_reader()
            folder.close()
    if result.stopped_by:
        log.info(f"{result.stopped_by}: saved checkpoint at step {result.step} in {ckpt.directory}; "
                 "rerun the same command to resume")
        _all_done()
        return {"step": result.step, "stopped_by": result.stopped_by}
    report = _final_report(run, result, evaluator, flops_info, param_info, folder)
    _all_done()
    return report


def _final_report(run: Run, result, evaluator: Evaluator, flops_info: dict, param_info: dict,
                  folder: RunFolder) -> dict:
    """final.json: last validation loss, WSI-only reconstruction, parameters, FLOPs, samples."""
    step, params = result.step, result.state["params"]
    last = result.last_eval
    report = {**(last if last.get("step") == step else evaluator.loss(params)), "step": step}
    target = "rna" if "rna" in run.layouts else next(iter(run.layouts))
    if evaluator.records:
        report["reconstruction"] = reconstruction_report(evaluator, params, run.root, run.manifest, target)
    report["params"] = {k: v for k, v in param_info.items() if k != "components"}
    report["flops"] = {k: flops_info[k] for k in ("useful", "executed", "per_sample", "batch", "num_patches",
                                                  "encoder_tokens")}
    report["samples"] = step * run.cfg.train.global_batch_size
    if folder.writer:
        write_json(folder.dir / "final.json", report)
    first_val = next((r["val_loss"] for r in read_jsonl(folder.metrics) if "val_loss" in r), None)
    if "val_loss" in report:
        log.info(f"validation loss: {report['val_loss']:.4f} (first {first_val:.4f}, "
                 f"ratio {report['val_loss'] / first_val:.3f})" if first_val
                 else f"validation loss: {report['val_loss']:.4f}")
    if "reconstruction" in report:
        r = report["reconstruction"]
        log.info(f"WSI-only {r['target']} reconstruction on {r['patients']} validation patients: "
                 f"median per-feature Pearson r {r['median_r']:.3f} (training-mean baseline "
                 f"{r['baseline_median_r']:.3f}); MAE {r['mae']:.4f} (baseline {r['baseline_mae']:.4f})")
    return report


def _all_done() -> None:
    """Processes leave together: one exiting while another still works would look like a
    failed task to the coordination service."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("morpheus:pretrain finished")
