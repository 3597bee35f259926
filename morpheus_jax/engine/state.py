"""Training state, AdamW and learning-rate schedules.

Parameters are the flat ``{dotted name: array}`` dict of `morpheus_jax.model.params.ParamCodec`.
The state is a plain pytree::

    {"step": int32 [], "params": {name: array}, "opt_state": optax state, "rng": uint32 [2]}
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from morpheus_jax.core.config import Config, TrainConfig


def paper_schedule(lr: float, steps_per_epoch: int, warmup_epochs: int, period_epochs: int):
    """The authors' per-epoch factor ``min((e+1)/warmup, 0.5(1 + cos(π e / period)))``."""
    def schedule(step):
        epoch = jnp.floor_divide(step, steps_per_epoch).astype(jnp.float32)
        warm = (epoch + 1.0) / max(warmup_epochs, 1)
        cos = 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / period_epochs))
        return lr * jnp.minimum(warm, cos)
    return schedule


def make_schedule(tc: TrainConfig, total_steps: int, steps_per_epoch: int):
    if tc.schedule == "constant":
        return optax.constant_schedule(tc.learning_rate)
    if tc.schedule == "paper":
        return paper_schedule(tc.learning_rate, steps_per_epoch, tc.warmup_epochs, tc.cosine_period_epochs)
    decay = tc.decay_steps or total_steps
    warmup = min(tc.warmup_steps, max(decay - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.learning_rate, warmup_steps=warmup,
        decay_steps=max(decay, warmup + 1), end_value=tc.learning_rate * tc.end_lr_factor)


def make_optimizer(tc: TrainConfig, schedule, lr_multipliers: dict[str, float] | None = None
                   ) -> optax.GradientTransformation:
    """AdamW (after global-norm clipping when set). ``lr_multipliers`` ``{parameter: factor}``
    (µP, `model.mup.learning_rate_multipliers`) scale each parameter's update, hence its rate
    and its decoupled weight decay; all-ones or None adds nothing (the same optimizer state)."""
    adamw = optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=1e-8, weight_decay=tc.weight_decay,
                        mu_dtype=jnp.dtype(tc.mu_dtype))
    parts = [optax.clip_by_global_norm(tc.grad_clip_norm)] if tc.grad_clip_norm else []
    parts.append(adamw)
    if lr_multipliers and any(v != 1.0 for v in lr_multipliers.values()):
        mults = dict(lr_multipliers)
        parts.append(optax.stateless(lambda updates, params=None: {
            k: u * mults[k] if mults.get(k, 1.0) != 1.0 else u for k, u in updates.items()}))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def init_state(params: dict[str, jax.Array], tx: optax.GradientTransformation, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def total_steps(cfg: Config, num_train_records: int) -> int:
    if cfg.train.epochs:
        return cfg.train.epochs * math.ceil(num_train_records / cfg.train.global_batch_size)
    return cfg.train.steps
