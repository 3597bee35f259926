"""Fine-tuning one model on `engine.Trainer`: AdamW (optax) with the paper's per-epoch
warm-up + cosine factor (§3), the engine's update step (`make_head_step`), and a checkpoint of
the fine-tuned weights per fold or draw in the pretraining checkpoint store, which
`morpheus export` turns into the authors' fine-tuning layout (``final_layer.1.*``).

Settings (`core.config.FinetuneConfig`) default to §3's fine-tuning values: AdamW lr 5e-5,
weight decay 1e-2, dropout 0.35, 20 epochs, batch 32, warm-up 5 epochs, cosine period 25
epochs (survival). The authors' classification scripts differ (§4, `PROTOCOLS`): few-shot 5 epochs at batch 1, full-data 5
epochs at batch 32, both at a constant learning rate.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from morpheus_jax.apps.downstream import Inputs, iter_batches
from morpheus_jax.apps.finetune.protocol import TrainSampler
from morpheus_jax.ckpt.checkpoint import Checkpoint
from morpheus_jax.ckpt.store import Checkpointer, checkpoint_dir
from morpheus_jax.core.config import FinetuneConfig, load_finetune_config, validate_finetune
from morpheus_jax.core.errors import DownstreamError, OutputExists
from morpheus_jax.core.manifest import Manifest
from morpheus_jax.core.spec import HeadSpec, ModelSpec
from morpheus_jax.engine import state as st
from morpheus_jax.engine.step import make_head_step
from morpheus_jax.engine.trainer import Trainer
from morpheus_jax.model.heads import HEAD, MorpheusFinetune, finetune_config
from morpheus_jax.model.params import ParamCodec

# (outputs [B, n_out], batch) → per-row loss [B]
TaskLoss = Callable[[jax.Array, dict], jax.Array]


# The authors' settings per protocol (MORPHEUS.md §4); the rest are FinetuneConfig's defaults.
PROTOCOLS = {
    "survival": {"epochs": 20, "batch_size": 32, "schedule": "paper"},
    "few-shot": {"epochs": 5, "batch_size": 1, "schedule": "constant"},
    "full": {"epochs": 5, "batch_size": 32, "schedule": "constant"},
}


def protocol_settings(protocol: str, overrides: list[str] = (), **given) -> FinetuneConfig:
    """`FinetuneConfig` of a protocol: the ``finetune.<key>=value`` overrides, else the values
    ``given`` (the flags; None = not given), else the protocol's, else the defaults."""
    values = {**PROTOCOLS[protocol], **{k: v for k, v in given.items() if v is not None}}
    return load_finetune_config(values, overrides)


class Finetuner:
    """Trains and applies `MorpheusFinetune` for one checkpoint, input set and task."""

    def __init__(self, ckpt: Checkpoint, inputs: Inputs, n_outputs: int, task_loss: TaskLoss,
                 settings: FinetuneConfig, root: Path, manifest: Manifest, head: HeadSpec | None = None):
        validate_finetune(settings)
        self.s, self.inputs, self.n_outputs, self.root = settings, inputs, n_outputs, Path(root)
        self.cfg = finetune_config(ckpt.config.model, inputs.omics, settings.dropout)
        self.layouts = {m: ckpt.layouts[m] for m in inputs.omics}
        self.codec = ParamCodec(self._build(0))
        self.pretrained = {n: ckpt.params[n] for n in self.codec.names if not n.startswith(HEAD)}
        missing = [n for n in self.codec.names if not n.startswith(HEAD) and n not in ckpt.params]
        if missing:
            raise DownstreamError(f"checkpoint lacks encoder parameters {missing[:3]}")
        data = ckpt.config.data
        self.num_patches = settings.num_patches or data.num_patches
        self.eval_batch = settings.eval_batch_size or data.eval_batch_size
        self.min_bag = data.eval_bag_bucket
        self.sampler = TrainSampler(root, manifest, inputs, self.num_patches, settings.seed)
        self.task_loss = task_loss
        self.train_config = settings.train_config()
        run_cfg = dataclasses.replace(ckpt.config, model=self.cfg, seed=settings.seed)
        self.spec = dataclasses.replace(ModelSpec.build(run_cfg, ckpt.groups, ckpt.features), head=head)
        self._steps: dict[int, tuple] = {}      # steps per epoch → (optimizer, compiled step)
        codec = self.codec
        self._predict = jax.jit(lambda p, wsi, mask, omics: codec.model(p)(wsi, mask, omics))
        self._embed = jax.jit(lambda p, wsi, mask, omics: codec.model(p).embed(wsi, mask, omics))

    def _build(self, run: int) -> MorpheusFinetune:
        return MorpheusFinetune(self.cfg, self.layouts, self.n_outputs, rng=np.random.default_rng([self.s.seed, run]),
                                head_dropout=self.s.dropout)

    def init_params(self, run: int, pretrained: bool | None = None) -> dict[str, jax.Array]:
        """Random weights drawn from ``(seed, run)``; the encoder's replaced by the checkpoint's
        when pretrained (the head's initial weights are the same either way)."""
        params = self.codec.flatten(self._build(run))
        if self.s.pretrained if pretrained is None else pretrained:
            params.update({n: jnp.asarray(v, jnp.float32) for n, v in self.pretrained.items()})
        return params

    def _step(self, steps_per_epoch: int):
        """Optimizer and jitted step for an epoch length (the schedule is per epoch), compiled once."""
        if steps_per_epoch not in self._steps:
            schedule = st.make_schedule(self.train_config, self.s.epochs * steps_per_epoch, steps_per_epoch)
            tx = st.make_optimizer(self.train_config, schedule)
            step = jax.jit(make_head_step(self.codec, tx, schedule, self.task_loss, self.s.grad_accum_steps),
                           donate_argnums=0)
            self._steps[steps_per_epoch] = (tx, step)
        return self._steps[steps_per_epoch]

    def _batches(self, records, targets, run: int, n: int, b: int) -> Iterator[dict]:
        """Each epoch a permutation of the rows in batches of ``b``; the last batch topped up
        with rows of weight 0 (fixed shape: a smaller batch's gradient)."""
        spe = math.ceil(n / b)
        for epoch in range(self.s.epochs):
            order = np.random.default_rng([self.s.seed, run, epoch, 0xE]).permutation(n)
            for k in range(spe):
                rows = order[k * b: (k + 1) * b]
                weight = np.ones(b, np.float32)
                if rows.size < b:
                    weight[rows.size:] = 0.0
                    rows = np.concatenate([rows, np.resize(order, b - rows.size)])
                batch = self.sampler.batch(records, rows, run, epoch)
                batch.update({name: np.asarray(v)[rows] for name, v in targets.items()})
                batch["weight"] = weight
                yield batch

    def fit(self, records: list[dict], targets: dict[str, np.ndarray], run: int,
            save_to: Path | None = None, head: HeadSpec | None = None) -> tuple[dict, list[float]]:
        """Train from `init_params(run)` on ``records`` (targets: ``{name: [n]}`` the task loss
        reads from the batch); returns the parameters and the mean training loss per epoch.
        ``save_to``: a run folder that receives the fine-tuned checkpoint (``checkpoints/<step>``),
        its spec holding ``head`` (default: the one given at construction)."""
        n, k = len(records), self.s.grad_accum_steps
        b = min(self.s.batch_size, -(-n // k) * k)         # a multiple of the micro-batches
        spe = math.ceil(n / b)
        tx, step = self._step(spe)
        state = st.init_state(self.init_params(run), tx, self.s.seed)
        state["rng"] = jax.random.key_data(jax.random.fold_in(jax.random.key(self.s.seed), run))
        losses: list[float] = []
        spec = self.spec if head is None else dataclasses.replace(self.spec, head=head)
        saver = None if save_to is None else self._saver(Path(save_to), spec)
        total = self.s.epochs * spe
        trainer = Trainer(step, total, b, log_every=1, on_row=lambda row: losses.append(row["loss"]),
                          save=None if saver is None else lambda s, state, _: s == total and saver(s, state),
                          checkpoint_every=0, desc="finetune")
        result = trainer.run(state, self._batches(records, targets, run, n, b))
        if result.stopped_by:
            raise DownstreamError(f"{result.stopped_by}: fine-tuning stopped at step {result.step} of run {run}; "
                                  "nothing of this run was saved")
        history = [float(np.mean(losses[e * spe: (e + 1) * spe])) for e in range(self.s.epochs)]
        return result.state["params"], history

    def _saver(self, run_dir: Path, spec: ModelSpec):
        """``save(step, state)`` writing the fine-tuned parameters (no optimizer state: a
        fine-tuning run is not resumed) into ``run_dir/checkpoints``; only the finished run is saved."""
        directory = checkpoint_dir(run_dir)
        if directory.exists() and any(directory.iterdir()):
            raise OutputExists(f"{directory} holds checkpoints already; use another --out")

        def save(step: int, state: dict) -> None:
            store = Checkpointer(directory, keep=1, async_save=False)
            try:
                store.save(step, {"step": state["step"], "params": state["params"]}, None, spec)
            finally:
                store.close()
        return save

    def _apply(self, fn, params, records: list[dict], width: int) -> np.ndarray:
        out = np.zeros((len(records), width), np.float32)
        for b in iter_batches(self.root, records, self.inputs, batch_size=self.eval_batch, min_bag=self.min_bag):
            y = np.asarray(fn(params, b["wsi"], b["wsi_mask"], b["omics"]))
            valid = b["rows"] >= 0
            out[b["rows"][valid]] = y[valid]
        return out

    def predict(self, params, records: list[dict]) -> np.ndarray:
        """``[n, n_out]`` outputs on full bags, evaluation mode."""
        return self._apply(self._predict, params, records, self.n_outputs)

    def embed(self, params, records: list[dict]) -> np.ndarray:
        """``[n, H]`` global-token embeddings on full bags, evaluation mode."""
        return self._apply(self._embed, params, records, self.cfg.hidden_size)
