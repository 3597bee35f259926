"""Step builders: the update step (pretraining and fine-tuning objectives) and evaluation.

``step(state, batch) → (state, metrics)`` does the forward, loss, gradients and the optax
update in one compiled function; dropout and masking keys derive from ``(state.rng,
state.step)``, so a resumed run draws exactly what the straight run drew.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from morpheus_jax.core.spec import GroupLayout
from morpheus_jax.model.losses import group_l1, masked_sum_count
from morpheus_jax.model.masking import KeepPlan, random_keep
from morpheus_jax.model.params import ParamCodec


class Objective:
    """Masked L1 reconstruction summed over modalities (§3), with per-modality parts."""

    def __init__(self, layouts: dict[str, GroupLayout]):
        self.modalities = tuple(layouts)
        self.counts = tuple(layouts[m].num_groups for m in self.modalities)
        self.entry = {m: layouts[m].entry_index() for m in self.modalities}
        self.group_mean = {m: layouts[m].group_mean_matrix() for m in self.modalities}

    def targets(self, omics: dict, m: str) -> jax.Array:
        """Canonical features ``[B, F]`` → group entries ``[B, S]``."""
        return omics[m][:, self.entry[m]]

    def parts(self, preds: dict, omics: dict, plan: KeepPlan, available: jax.Array,
              row_valid: jax.Array | None = None) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{m: (Σ masked group errors, number of masked groups)} over the batch."""
        out, off = {}, 0
        for i, (m, g) in enumerate(zip(self.modalities, self.counts)):
            errors = group_l1(preds[m], self.targets(omics, m), jnp.asarray(self.group_mean[m]))
            mask = plan.token_mask[:, off: off + g] * available[:, i: i + 1]
            if row_valid is not None:
                mask = mask * row_valid[:, None]
            out[m] = masked_sum_count(errors, mask)
            off += g
        return out

    @staticmethod
    def reduce(parts: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        losses = {m: s / jnp.maximum(c, 1.0) for m, (s, c) in parts.items()}
        return sum(losses.values()), losses


def make_update_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable,
                     skip_nonfinite: bool = False) -> Callable:
    """``step(state, batch) → (state, metrics)``: gradients of ``loss_fn(params, batch, key) →
    (loss, {name: scalar})`` and one optax update, the key derived from ``(state.rng,
    state.step)``. Metrics: ``loss``, the named parts, ``lr``, ``grad_norm``. The one update
    step of pretraining and fine-tuning.

    ``skip_nonfinite`` (``train.nonfinite=skip``): a step whose loss or gradient norm is not
    finite keeps the parameters and optimizer state as they were (the step counter, hence the
    next keys and batch, still advance) and reports ``skipped`` = 1. The state's structure is
    the same either way, so a run may resume with the other setting."""

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, **parts, "lr": schedule(state["step"]), "grad_norm": grad_norm}
        if skip_nonfinite:
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), (params, opt_state),
                                             (state["params"], state["opt_state"]))
            metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    return step


def make_train_step(codec: ParamCodec, tx: optax.GradientTransformation, schedule: Callable,
                    layouts: dict[str, GroupLayout], ratio: float, skip_nonfinite: bool = False) -> Callable:
    """The pretraining step: masking, forward, the masked L1 objective (`Objective`)."""
    objective = Objective(layouts)

    def loss_fn(params, batch, key):
        model = codec.model(params)
        k_mask, k_drop = jax.random.split(key)
        plan = random_keep(k_mask, objective.counts, ratio, batch["wsi"].shape[0], batch["available"])
        preds = model(batch["wsi"], batch["wsi_mask"], batch["omics"], plan, key=k_drop)
        total, losses = objective.reduce(objective.parts(preds, batch["omics"], plan, batch["available"]))
        return total, {f"loss_{m}": v for m, v in losses.items()}

    return make_update_step(loss_fn, tx, schedule, skip_nonfinite)


def make_head_step(codec: ParamCodec, tx: optax.GradientTransformation, schedule: Callable,
                   task_loss: Callable) -> Callable:
    """The fine-tuning step: encoder + head outputs, ``task_loss(outputs, batch) → [B]``
    averaged with the batch's row ``weight`` (0 for padding rows)."""

    def loss_fn(params, batch, key):
        out = codec.model(params)(batch["wsi"], batch["wsi_mask"], batch["omics"], key=key)
        w = batch["weight"]
        return jnp.sum(task_loss(out, batch) * w) / jnp.maximum(jnp.sum(w), 1.0), {}

    return make_update_step(loss_fn, tx, schedule)


def make_eval_step(codec: ParamCodec, layouts: dict[str, GroupLayout], ratio: float) -> Callable:
    """``(params, batch, key) → {m: (Σ errors, count)}``: masked reconstruction on full bags
    with a caller-fixed masking key (deterministic validation loss)."""
    objective = Objective(layouts)

    def eval_step(params, batch, key):
        model = codec.model(params)
        plan = random_keep(key, objective.counts, ratio, batch["wsi"].shape[0], batch["available"])
        preds = model(batch["wsi"], batch["wsi_mask"], batch["omics"], plan)
        return objective.parts(preds, batch["omics"], plan, batch["available"], batch["row_valid"])

    return eval_step


def make_generate(codec: ParamCodec, targets: tuple[str, ...], inputs: tuple[str, ...] = ()) -> Callable:
    """``(params, wsi, wsi_mask, omics) → {target: [B, S]}``: decode mode from WSI plus the
    omics modalities in ``inputs``."""

    def generate(params, wsi, wsi_mask, omics):
        model = codec.model(params)
        return model(wsi, wsi_mask, {m: omics[m] for m in inputs}, None, targets=targets)

    return generate
