"""Fine-tuning one model: AdamW with the paper's per-epoch warm-up + cosine factor (§3),
one jitted train step reused across folds and draws, full-bag prediction.

Settings default to §3's fine-tuning values: AdamW lr 5e-5, weight decay 1e-2, dropout 0.35,
20 epochs, batch 32, warm-up 5 epochs, cosine period 25 epochs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from morpheus_jax.apps.downstream import Inputs, iter_batches
from morpheus_jax.apps.finetune.protocol import TrainSampler
from morpheus_jax.ckpt.checkpoint import Checkpoint
from morpheus_jax.core.errors import DownstreamError
from morpheus_jax.engine.state import paper_schedule
from morpheus_jax.model.heads import HEAD, MorpheusFinetune, finetune_config
from morpheus_jax.model.params import ParamCodec

# (outputs [B, n_out], batch) → per-row loss [B]
TaskLoss = Callable[[jax.Array, dict], jax.Array]


@dataclasses.dataclass
class FinetuneSettings:
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 1e-2
    dropout: float = 0.35
    warmup_epochs: int = 5
    cosine_period_epochs: int = 25
    num_patches: int | None = None          # None: the pretraining config's data.num_patches
    eval_batch_size: int | None = None      # None: the pretraining config's data.eval_batch_size
    seed: int = 1999
    pretrained: bool = True                 # False: the same model from random weights

    def check(self) -> None:
        for name in ("epochs", "batch_size", "warmup_epochs", "cosine_period_epochs"):
            if getattr(self, name) < 1:
                raise DownstreamError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise DownstreamError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise DownstreamError(f"--lr must be positive, got {self.learning_rate}")


class Finetuner:
    """Trains and applies `MorpheusFinetune` for one checkpoint, input set and task."""

    def __init__(self, ckpt: Checkpoint, inputs: Inputs, n_outputs: int, task_loss: TaskLoss,
                 settings: FinetuneSettings, root: Path, manifest: dict):
        settings.check()
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
        self.tx = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                              optax.add_decayed_weights(settings.weight_decay))
        codec, tx = self.codec, self.tx

        def loss_fn(params, batch, key):
            out = codec.model(params)(batch["wsi"], batch["wsi_mask"], batch["omics"], key=key)
            w = batch["weight"]
            return jnp.sum(task_loss(out, batch) * w) / jnp.maximum(jnp.sum(w), 1.0)

        def train_step(params, opt_state, batch, key_data, step, lr):
            key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, u: p - lr * u, params, updates)    # AdamW: lr·(adam + wd·p)
            return params, opt_state, loss

        self._train_step = jax.jit(train_step, donate_argnums=(0, 1))
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

    def fit(self, records: list[dict], targets: dict[str, np.ndarray], run: int) -> tuple[dict, list[float]]:
        """Train from `init_params(run)` on ``records`` (targets: ``{name: [n]}`` the task loss
        reads from the batch); returns the parameters and the mean training loss per epoch."""
        n = len(records)
        b = min(self.s.batch_size, n)
        spe = math.ceil(n / b)
        schedule = paper_schedule(self.s.learning_rate, spe, self.s.warmup_epochs, self.s.cosine_period_epochs)
        params = self.init_params(run)
        opt_state = self.tx.init(params)
        key_data = jax.random.key_data(jax.random.fold_in(jax.random.key(self.s.seed), run))
        step, history = 0, []
        for epoch in range(self.s.epochs):
            order = np.random.default_rng([self.s.seed, run, epoch, 0xE]).permutation(n)
            losses = []
            for k in range(spe):
                rows = order[k * b: (k + 1) * b]
                weight = np.ones(b, np.float32)
                if rows.size < b:      # fixed shape: pad with rows of weight 0 (a smaller batch's gradient)
                    weight[rows.size:] = 0.0
                    rows = np.concatenate([rows, order[: b - rows.size]])
                batch = self.sampler.batch(records, rows, run, epoch)
                batch.update({name: np.asarray(v)[rows] for name, v in targets.items()})
                batch["weight"] = weight
                lr = np.float32(schedule(step))
                params, opt_state, loss = self._train_step(params, opt_state, batch, key_data, np.int32(step), lr)
                losses.append(loss)
                step += 1
            history.append(float(np.mean(jax.device_get(losses))))
        return params, history

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
