"""Validation during pretraining: masked-reconstruction loss on full bags and WSI-only
generation against a predict-the-training-mean baseline."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from morpheus_jax.core import sharding as shd
from morpheus_jax.core.config import Config
from morpheus_jax.core.manifest import Manifest
from morpheus_jax.data import pipeline
from morpheus_jax.engine.step import make_eval_step, make_generate
from morpheus_jax.metrics import reconstruction as met


class Evaluator:
    """Every patch of every ``val-pretrain`` patient, batched by bag size; masking is keyed
    on (seed, batch) so the validation loss is deterministic. Every process reads the whole
    split; outputs are replicated so each process can read them."""

    def __init__(self, cfg: Config, root: Path, manifest: Manifest, codec, layouts, mesh):
        self.cfg, self.root, self.mesh = cfg, root, mesh
        self.layouts = layouts
        self.modalities = tuple(layouts)
        self.records = pipeline.read_split(root, "val-pretrain", manifest)
        div = shd.batch_divisor(mesh, cfg.mesh.rules)
        self.batch_size = -(-cfg.data.eval_batch_size // div) * div
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.eval_step = jax.jit(make_eval_step(codec, layouts, cfg.masking.ratio), out_shardings=self._replicated)
        self.codec = codec
        self._generators = {}

    def batches(self):
        for b in pipeline.eval_batches(self.root, self.records, self.modalities,
                                       batch_size=self.batch_size, min_bag=self.cfg.data.eval_bag_bucket):
            rows = b.pop("rows")
            yield rows, shd.global_from_full(b, self.mesh, self.cfg.mesh.rules)

    def loss(self, params) -> dict[str, float]:
        """``val_loss`` (sum over modalities) and ``val_loss_<m>``; {} without a val split."""
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
            self._generators[key] = jax.jit(make_generate(self.codec, (target,), inputs),
                                            out_shardings=self._replicated)
        layout = self.layouts[target]
        out = np.zeros((len(self.records), layout.num_features), np.float32)
        for rows, batch in self.batches():
            pred = np.asarray(jax.device_get(self._generators[key](
                params, batch["wsi"], batch["wsi_mask"], batch["omics"])[target]))
            feats = layout.to_features(pred)
            valid = rows >= 0
            out[rows[valid]] = feats[valid]
        return out

    def truth(self, modality: str) -> np.ndarray:
        return np.stack([np.asarray(r["omics"][modality], np.float32) for r in self.records])


def reconstruction_report(evaluator: Evaluator, params, root: Path, manifest: Manifest, target: str) -> dict:
    """WSI-only generation of ``target`` on validation patients vs predicting the training mean."""
    train = pipeline.read_split(root, "pretrain", manifest)
    mean = np.mean([r["omics"][target] for r in train if r["available"][target]], axis=0)
    keep = [i for i, r in enumerate(evaluator.records) if r["available"][target]]
    truth = evaluator.truth(target)[keep]
    pred = evaluator.generate(params, target)[keep]
    baseline = np.broadcast_to(mean, truth.shape)
    return {
        "target": target, "patients": len(keep),
        "median_r": met.reconstruction_summary(pred, truth)["median_r"],
        "baseline_median_r": met.reconstruction_summary(baseline, truth, constant=0.0)["median_r"],
        "mae": float(np.abs(pred - truth).mean()), "baseline_mae": float(np.abs(baseline - truth).mean()),
        "median_r_std_gt_0.15": met.reconstruction_summary(pred, truth, min_std=0.15)["median_r"],
    }
