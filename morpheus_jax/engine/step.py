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
from morpheus_jax.model.layers import row_keys, split_key
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

    def loss_masks(self, plan: KeepPlan, available: jax.Array,
                   row_valid: jax.Array | None = None) -> dict[str, jax.Array]:
        """{m: ``[B, G_m]``} 1 where a group counts in the loss: masked, of an available modality
        (and, with ``row_valid``, a real row)."""
        out, off = {}, 0
        for i, (m, g) in enumerate(zip(self.modalities, self.counts)):
            mask = plan.token_mask[:, off: off + g] * available[:, i: i + 1]
            out[m] = mask if row_valid is None else mask * row_valid[:, None]
            off += g
        return out

    def parts(self, preds: dict, omics: dict, plan: KeepPlan, available: jax.Array,
              row_valid: jax.Array | None = None) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{m: (Σ masked group errors, number of masked groups)} over the batch."""
        return {m: masked_sum_count(group_l1(preds[m], self.targets(omics, m), jnp.asarray(self.group_mean[m])), mask)
                for m, mask in self.loss_masks(plan, available, row_valid).items()}

    def counts_of(self, plan: KeepPlan, available: jax.Array) -> dict[str, jax.Array]:
        """{m: number of masked groups} over the batch (the loss's normalisers)."""
        return {m: jnp.sum(mask).astype(jnp.float32) for m, mask in self.loss_masks(plan, available).items()}

    @staticmethod
    def reduce(parts: dict, norm: dict | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Σ errors over the number of masked groups per modality (``norm``: batch-wide counts,
        default the parts' own), summed over modalities."""
        losses = {m: s / jnp.maximum(c if norm is None else norm[m], 1.0) for m, (s, c) in parts.items()}
        return sum(losses.values()), losses


def make_update_step(loss_fn: Callable, norm_fn: Callable, tx: optax.GradientTransformation, schedule: Callable,
                     skip_nonfinite: bool = False, accum_steps: int = 1) -> Callable:
    """``step(state, batch) → (state, metrics)``: one optax update from the gradients of the
    batch's loss. The one update step of pretraining and fine-tuning.

    Randomness is per sample: sample ``i`` of step ``s`` draws its masking and dropout from
    ``fold_in(fold_in(rng, s), i)`` (`layers.row_keys`). The loss is a sum over samples
    divided by batch-wide normalisers: ``norm_fn(batch, keys) → norm`` (e.g. the number of
    masked groups per modality; no gradient flows through it) and ``loss_fn(params, batch,
    keys, norm) → (loss, {name: scalar})`` where loss and parts are sums of per-sample terms
    over ``norm``.

    ``accum_steps`` = k > 1 (``train.grad_accum_steps``): the batch is split into k micro-batches
    (rows ``j, j + k, …``: each device keeps its own rows) whose gradients are summed in a
    ``lax.scan`` before the one update. With the same keys and the full batch's normalisers
    this is the full batch's update, up to float summation order; activation memory is that of
    one micro-batch.

    ``skip_nonfinite`` (``train.nonfinite=skip``): a step whose loss or gradient norm is not
    finite keeps the parameters and optimizer state as they were (the step counter, hence the
    next keys and batch, still advance) and reports ``skipped`` = 1. The state's structure is
    the same either way, so a run may resume with the other setting."""

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, batch, keys, norm):
        if accum_steps == 1:
            return grad_fn(params, batch, keys, norm)
        k = accum_steps

        def micro(x):      # [B, …] → [k, B/k, …]: micro-batch j holds rows j, j + k, …
            return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

        def body(carry, xs):
            (loss, parts), grads = grad_fn(params, *xs, norm)
            return jax.tree.map(jnp.add, carry, ((loss, parts), grads)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, keys, norm))
        total, _ = jax.lax.scan(body, zeros, jax.tree.map(micro, (batch, keys)))
        return total

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        keys = row_keys(key, batch_rows(batch))
        norm = jax.lax.stop_gradient(norm_fn(batch, keys))
        (loss, parts), grads = gradients(state["params"], batch, keys, norm)
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


def batch_rows(batch: dict) -> int:
    return jax.tree.leaves(batch)[0].shape[0]


def make_train_step(codec: ParamCodec, tx: optax.GradientTransformation, schedule: Callable,
                    layouts: dict[str, GroupLayout], ratio: float, skip_nonfinite: bool = False,
                    accum_steps: int = 1) -> Callable:
    """The pretraining step: masking, forward, the masked L1 objective (`Objective`): per
    modality the masked groups' errors summed over the batch over their number."""
    objective = Objective(layouts)

    def plan_of(batch, keys):
        return random_keep(split_key(keys, 2)[0], objective.counts, ratio, batch_rows(batch), batch["available"])

    def norm_fn(batch, keys):
        plan = plan_of(batch, keys)
        return objective.counts_of(plan, batch["available"])

    def loss_fn(params, batch, keys, norm):
        model = codec.model(params)
        plan = plan_of(batch, keys)
        preds = model(batch["wsi"], batch["wsi_mask"], batch["omics"], plan, key=split_key(keys, 2)[1])
        total, losses = objective.reduce(objective.parts(preds, batch["omics"], plan, batch["available"]), norm)
        return total, {f"loss_{m}": v for m, v in losses.items()}

    return make_update_step(loss_fn, norm_fn, tx, schedule, skip_nonfinite, accum_steps)


def make_head_step(codec: ParamCodec, tx: optax.GradientTransformation, schedule: Callable,
                   task_loss: Callable, accum_steps: int = 1) -> Callable:
    """The fine-tuning step: encoder + head outputs, ``task_loss(outputs, batch) → [B]``
    averaged with the batch's row ``weight`` (0 for padding rows)."""

    def norm_fn(batch, keys):
        return jnp.maximum(jnp.sum(batch["weight"]), 1.0)

    def loss_fn(params, batch, keys, norm):
        out = codec.model(params)(batch["wsi"], batch["wsi_mask"], batch["omics"], key=keys)
        return jnp.sum(task_loss(out, batch) * batch["weight"]) / norm, {}

    return make_update_step(loss_fn, norm_fn, tx, schedule, accum_steps=accum_steps)


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
