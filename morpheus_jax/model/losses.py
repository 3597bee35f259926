"""The masked-reconstruction objective (§3) as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def group_l1(pred: Array, target: Array, group_mean: Array) -> Array:
    """Per-group mean absolute error.

    pred, target ``[B, S]`` (group entries concatenated in mapping order), group_mean
    ``[S, G]`` (entry → its group, weight 1/size) → ``[B, G]``.
    """
    return jnp.dot(jnp.abs(pred.astype(jnp.float32) - target), group_mean)


def masked_sum_count(errors: Array, loss_mask: Array) -> tuple[Array, Array]:
    """errors ``[B, G]``, loss_mask ``[B, G]`` (1 = counts) → (Σ masked errors, Σ mask)."""
    w = loss_mask.astype(jnp.float32)
    return jnp.sum(errors * w), jnp.sum(w)


def masked_mean(errors: Array, loss_mask: Array) -> Array:
    """Average of ``errors`` over the masked groups of the batch (0 when none)."""
    total, count = masked_sum_count(errors, loss_mask)
    return total / jnp.maximum(count, 1.0)
