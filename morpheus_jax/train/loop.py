"""`morpheus pretrain`: the one training loop.

config → dataset (synthesised and prepared if the demo's is absent) → model and sharded
state → Grain stream → jitted step → metrics.jsonl / TensorBoard / progress bar →
Orbax checkpoints (every ``checkpoint.every`` steps, at the end, on SIGTERM/SIGINT) →
final evaluation (validation loss, WSI-only reconstruction against the training mean).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from morpheus_jax import sharding as shd
from morpheus_jax.config import Config, ConfigError, IncompatibleCheckpoint, from_dict, model_config_diff, save_config, to_dict
from morpheus_jax.data import pipeline, records
from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare, summary
from morpheus_jax.eval import metrics as met
from morpheus_jax.eval.plots import loss_plot, read_jsonl
from morpheus_jax.model.morpheus import init_model
from morpheus_jax.model.tokenizers import GroupLayout
from morpheus_jax.train import state as st
from morpheus_jax.train.checkpoint import Checkpointer, checkpoint_dir
from morpheus_jax.train.step import make_eval_step, make_generate, make_train_step


def log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


# -- dataset --------------------------------------------------------------------------------

def ensure_dataset(cfg: Config) -> Path:
    """The prepared dataset at ``data.dir``; the demo synthesises and prepares it if absent."""
    root = Path(cfg.data.dir)
    if (root / records.MANIFEST).exists():
        return root
    if cfg.data.raw_dir is None:
        raise records.DatasetError(f"{root}: no prepared dataset (run `morpheus prepare` or set data.raw_dir)")
    raw = Path(cfg.data.raw_dir)
    if not (raw / "metadata.csv").exists():
        if not cfg.data.synth_patients:
            raise records.DatasetError(f"{raw}: no metadata.csv and data.synth_patients is unset")
        from morpheus_jax.data.synth import write_synthetic_cohort
        log(f"synthesising a demo cohort of {cfg.data.synth_patients} patients into {raw}")
        write_synthetic_cohort(raw, n_patients=cfg.data.synth_patients, seed=cfg.seed,
                               feature_dim=cfg.model.wsi_dim, val_fraction=cfg.data.synth_val_fraction)
    log(f"preparing {raw} into {root}")
    manifest = prepare(RawCohort.from_dir(raw), root, PrepareOptions(
        wsi_dim=cfg.model.wsi_dim, allow_missing_modalities=cfg.data.allow_missing_modalities))
    log(summary(manifest))
    return root


def layouts_from_manifest(manifest: dict, modalities, num_buckets: int) -> dict[str, GroupLayout]:
    out = {}
    for m in modalities:
        if m not in manifest["modalities"]:
            raise records.DatasetError(f"dataset has no modality {m!r} (has {sorted(manifest['modalities'])}); "
                                       "set model.modalities accordingly")
        info = manifest["modalities"][m]
        out[m] = GroupLayout.from_mapping(info["groups"], info["features"], num_buckets)
    return out


def model_spec(cfg: Config, manifest: dict) -> dict:
    """What a checkpoint needs to rebuild the model: config, groups, feature names."""
    return {"config": to_dict(cfg),
            "modalities": {m: {"groups": manifest["modalities"][m]["groups"],
                               "features": manifest["modalities"][m]["features"]}
                           for m in cfg.model.modalities}}


# -- sharded state ----------------------------------------------------------------------------

def state_shardings(abstract_state: dict, param_shardings: dict, mesh) -> dict:
    """Parameters and their optimizer moments by the rules; everything else replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        last = path[-1] if path else None
        name = getattr(last, "key", None)
        if name in param_shardings and tuple(leaf.shape) == param_shardings[name][1]:
            return param_shardings[name][0]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def global_from_full(batch, mesh, rules):
    """A batch every process holds in full → global arrays sharded on the batch axes."""
    def put(x):
        x = np.asarray(x)
        sh = shd.batch_sharding(mesh, rules, x.ndim)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    return jax.tree.map(put, batch)


# -- evaluation ---------------------------------------------------------------------------------

class Evaluator:
    """Validation loss (deterministic masking, full bags) and WSI-only generation."""

    def __init__(self, cfg: Config, root: Path, manifest: dict, codec, layouts, mesh):
        self.cfg, self.root, self.mesh = cfg, root, mesh
        self.layouts = layouts
        self.modalities = tuple(layouts)
        self.records = pipeline.read_split(root, "val-pretrain", manifest)
        div = shd.batch_divisor(mesh, cfg.mesh.rules)
        self.batch_size = -(-cfg.data.eval_batch_size // div) * div
        self.eval_step = jax.jit(make_eval_step(codec, layouts, cfg.masking.ratio))
        self.codec = codec
        self._generators = {}

    def batches(self):
        for b in pipeline.eval_batches(self.root, self.records, self.modalities,
                                       batch_size=self.batch_size, min_bag=self.cfg.data.eval_bag_bucket):
            rows = b.pop("rows")
            yield rows, global_from_full(b, self.mesh, self.cfg.mesh.rules)

    def loss(self, params) -> dict[str, float]:
        if not self.records:
            return {}
        base = jax.random.key(self.cfg.seed + 7919)
        sums = {m: [0.0, 0.0] for m in self.modalities}
        for i, (_, batch) in enumerate(self.batches()):
            parts = jax.device_get(self.eval_step(params, batch, jax.random.fold_in(base, i)))
            for m, (s, c) in parts.items():
                sums[m][0] += float(s)
                sums[m][1] += float(c)
        losses = {f"val_loss_{m}": s / max(c, 1.0) for m, (s, c) in sums.items()}
        return {"val_loss": sum(losses.values()), **losses}

    def generate(self, params, target: str, inputs: tuple[str, ...] = ()) -> np.ndarray:
        """``[n_val, F]`` predicted canonical features of ``target`` from WSI + ``inputs``."""
        key = (target, inputs)
        if key not in self._generators:
            self._generators[key] = jax.jit(make_generate(self.codec, (target,), inputs))
        layout = self.layouts[target]
        out = np.zeros((len(self.records), layout.num_features), np.float32)
        for rows, batch in self.batches():
            pred = np.asarray(jax.device_get(self._generators[key](
                params, batch["wsi"], batch["wsi_mask"], batch["omics"])[target]))
            feats = met.grouped_to_features(pred, layout.entry_index(), layout.num_features)
            valid = rows >= 0
            out[rows[valid]] = feats[valid]
        return out

    def truth(self, modality: str) -> np.ndarray:
        return np.stack([np.asarray(r["omics"][modality], np.float32) for r in self.records])


def reconstruction_report(evaluator: Evaluator, params, root: Path, manifest: dict, target: str) -> dict:
    """WSI-only generation of ``target`` on validation patients vs predicting the training mean."""
    train = pipeline.read_split(root, "pretrain", manifest)
    avail = [r for r in train if r["available"][target]]
    mean = np.mean([r["omics"][target] for r in avail], axis=0)
    keep = [i for i, r in enumerate(evaluator.records) if r["available"][target]]
    truth = evaluator.truth(target)[keep]
    pred = evaluator.generate(params, target)[keep]
    baseline = np.broadcast_to(mean, truth.shape)
    model_r = met.reconstruction_summary(pred, truth)
    base_r = met.reconstruction_summary(baseline, truth)
    return {
        "target": target, "patients": len(keep),
        "median_r": model_r["median_r"], "baseline_median_r": base_r["median_r"],
        "mae": float(np.abs(pred - truth).mean()), "baseline_mae": float(np.abs(baseline - truth).mean()),
        "median_r_std_gt_0.15": met.reconstruction_summary(pred, truth, min_std=0.15)["median_r"],
    }


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

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows past ``step`` (a resumed run rewrites them)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def pretrain(cfg: Config, *, progress: bool = True) -> dict:
    """Train (or resume) the run in ``cfg.run_dir``; returns the final report."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    root = ensure_dataset(cfg)
    manifest = records.load_manifest(root)
    layouts = layouts_from_manifest(manifest, cfg.model.modalities, cfg.model.group_buckets)
    if manifest.get("allow_missing_modalities") and not cfg.data.allow_missing_modalities:
        raise ConfigError(f"{root} was prepared with --allow-missing-modalities (some patients lack "
                                     "omics); set data.allow_missing_modalities=true to train on it")
    n_train = len(pipeline.subset_indices(manifest["counts"].get("pretrain", 0), cfg.data.train_fraction))
    steps = st.total_steps(cfg, n_train)
    spe = pipeline.steps_per_epoch(n_train, cfg.train.global_batch_size)

    mesh = shd.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    gbs = cfg.train.global_batch_size
    if gbs % shd.batch_divisor(mesh, rules) or gbs % jax.process_count():
        raise ValueError(f"train.global_batch_size={gbs} must be divisible by the batch mesh axes "
                         f"({shd.batch_divisor(mesh, rules)} devices) and by {jax.process_count()} processes")

    model = init_model(cfg.model, layouts, cfg.seed)
    codec = st.ParamCodec(model)
    params = codec.flatten(model)
    del model
    schedule = st.make_schedule(cfg.train, steps, spe)
    tx = st.make_optimizer(cfg.train, schedule)
    state = st.init_state(params, tx, cfg.seed)
    psh = shd.tree_shardings(codec.axes, codec.shapes, rules, mesh)
    state_sh = state_shardings(state, {k: (v, codec.shapes[k]) for k, v in psh.items()}, mesh)
    state = jax.device_put(state, state_sh)

    spec = model_spec(cfg, manifest)
    ckpt = Checkpointer(checkpoint_dir(run_dir), every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    ds = pipeline.train_dataset(root, "pretrain", global_batch=gbs, num_patches=cfg.data.num_patches,
                                seed=cfg.seed, modalities=tuple(layouts), process_index=jax.process_index(),
                                process_count=jax.process_count(), manifest=manifest,
                                fraction=cfg.data.train_fraction)
    data_iter = pipeline.train_iterator(ds, cfg.data.worker_count, cfg.data.prefetch_buffer)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        from morpheus_jax.train.checkpoint import read_spec
        saved = from_dict(read_spec(ckpt.directory / str(latest))["config"])
        diff = model_config_diff(saved.model, cfg.model)
        if diff:
            raise IncompatibleCheckpoint(f"{ckpt.directory / str(latest)} was written with a different model "
                                         f"config: {'; '.join(diff)}")
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
        state = ckpt.restore(latest, abstract, data_iter)
        start = int(jax.device_get(state["step"]))
        log(f"resumed from {ckpt.directory / str(latest)} at step {start}")
    save_config(cfg, run_dir / "config.yaml")

    metrics_path = run_dir / "metrics.jsonl"
    if start == 0 and metrics_path.exists():
        metrics_path.unlink()
    elif metrics_path.exists():
        _truncate_metrics(metrics_path, start)

    batch_sh = {k: shd.batch_sharding(mesh, rules, 3 if k == "wsi" else 2 if k in ("wsi_mask", "available") else 1)
                for k in ("wsi", "wsi_mask", "available")}
    batch_sh["omics"] = {m: shd.batch_sharding(mesh, rules, 2) for m in layouts}
    train_step = jax.jit(make_train_step(codec, tx, schedule, layouts, cfg.masking.ratio),
                         in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
    evaluator = Evaluator(cfg, root, manifest, codec, layouts, mesh)

    from tensorboardX import SummaryWriter
    tb = SummaryWriter(str(run_dir / "tensorboard")) if jax.process_index() == 0 else None
    n_params = sum(int(np.prod(s)) for s in codec.shapes.values())
    log(f"model: {n_params / 1e6:.2f}M stored parameters; {steps} steps of {gbs} "
        f"({spe} steps/epoch over {n_train} patients); mesh {dict(mesh.shape)}")

    def record(row: dict) -> None:
        if jax.process_index() == 0:
            _append_jsonl(metrics_path, row)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, row["step"])

    if start == 0 and cfg.train.eval_every > 0:
        record({"step": 0, **evaluator.loss(state["params"])})

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
            is_log = step % cfg.train.log_every == 0 or step == steps
            is_eval = cfg.train.eval_every > 0 and (step % cfg.train.eval_every == 0 or step == steps)
            if is_log or is_eval or pre.signal:
                values = jax.device_get(pending[-1])
                elapsed = time.perf_counter() - t_window
                row = {"step": step, **{k: float(v) for k, v in values.items()},
                       "samples_per_s": len(pending) * gbs / max(elapsed, 1e-9)}
                if is_eval:
                    row.update(evaluator.loss(state["params"]))
                record(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}",
                                **({"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}))
                pending, t_window = [], time.perf_counter()
            bar.update(1)
            if step % cfg.checkpoint.every == 0 or step == steps or pre.signal:
                ckpt.save(step, state, data_iter, spec, force=True)
            if pre.signal:
                stopped_by = signal.Signals(pre.signal).name
                break
    bar.close()
    ckpt.close()
    if tb is not None:
        tb.close()
    if jax.process_index() == 0:
        loss_plot(metrics_path, run_dir / "plots" / "loss.png")
    if stopped_by:
        log(f"{stopped_by}: saved checkpoint at step {step} in {ckpt.directory}; rerun the same command to resume")
        return {"step": step, "stopped_by": stopped_by}

    report = {"step": step, **evaluator.loss(state["params"])}
    target = "rna" if "rna" in layouts else next(iter(layouts))
    if evaluator.records:
        report["reconstruction"] = reconstruction_report(evaluator, state["params"], root, manifest, target)
    if jax.process_index() == 0:
        with open(run_dir / "final.json", "w") as f:
            json.dump(report, f, indent=1)
    rows = read_jsonl(metrics_path)
    first_val = next((r["val_loss"] for r in rows if "val_loss" in r), None)
    if "val_loss" in report:
        log(f"validation loss: {report['val_loss']:.4f} (first {first_val:.4f}, "
            f"ratio {report['val_loss'] / first_val:.3f})" if first_val else f"validation loss: {report['val_loss']:.4f}")
    if "reconstruction" in report:
        r = report["reconstruction"]
        log(f"WSI-only {r['target']} reconstruction on {r['patients']} validation patients: "
            f"median per-feature Pearson r {r['median_r']:.3f} (training-mean baseline {r['baseline_median_r']:.3f}); "
            f"MAE {r['mae']:.4f} (baseline {r['baseline_mae']:.4f})")
    return report
