"""Which omics tokens the encoder sees: random masking (§3) and explicit masks.

Omics tokens are indexed ``0..T-1``: the groups of each modality present, in model modality
order, each in mapping group order. WSI tokens are never masked and are not indexed here.

A `KeepPlan` says, per sample, which omics tokens are hidden (``token_mask``, 1 = masked)
and lists the kept ones (``keep_idx``; entries with ``keep_valid`` False are padding) so the
encoder runs on ``1 + P + K`` tokens with static shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from morpheus_jax.model.layers import uniform

Array = jax.Array


class KeepPlan(NamedTuple):
    token_mask: Array   # [B, T] int32, 1 = masked
    keep_idx: Array     # [B, K] int32 token indices, kept tokens first in index order
    keep_valid: Array   # [B, K] bool


def num_kept(num_tokens: int, ratio: float) -> int:
    """``k = int(T · (1 - ratio))`` (37 of 150 at the paper's 0.75)."""
    return int(num_tokens * (1.0 - ratio))


def _split_counts(u_share: Array, u_settle: Array, group_counts: tuple[int, ...], k: int,
                  available: Array) -> Array:
    """Per-modality kept counts for one sample ``[M]``: Dirichlet(1,…,1) shares of k
    (normalised Exp(1) draws), rounded, capped by group counts, then the excess or
    deficit settled one unit at a time on a uniformly chosen eligible modality.

    u_share ``[M]`` and u_settle ``[k + M, M]`` are uniform [0, 1) noise.
    """
    m = len(group_counts)
    caps = jnp.where(available, jnp.asarray(group_counts), 0)
    expo = -jnp.log1p(-u_share) * available
    share = expo / jnp.maximum(expo.sum(), 1e-30)
    counts = jnp.clip(jnp.round(share * k).astype(jnp.int32), 0, caps)
    target = jnp.minimum(k, caps.sum())
    gumbel = -jnp.log(-jnp.log(jnp.clip(u_settle, 1e-12, 1.0 - 1e-7)))

    def settle(i, n):
        diff = target - n.sum()
        eligible = jnp.where(diff > 0, n < caps, n > 0)
        pick = jnp.argmax(jnp.where(eligible, gumbel[i], -jnp.inf))
        return n + (jnp.sign(diff) * (jnp.arange(m) == pick)).astype(jnp.int32)

    return jax.lax.fori_loop(0, k + m, settle, counts)


def random_keep(key, group_counts: tuple[int, ...], ratio: float, batch_size: int,
                available: Array | None = None) -> KeepPlan:
    """Random masking of §3 for a batch.

    group_counts: groups per modality present (static). available ``[B, M]`` bool: modalities
    a sample has (missing ones are always masked); default all. Exactly
    ``k = num_kept(T, ratio)`` tokens are kept per sample (fewer only if a sample has fewer
    available tokens). Returns a plan with ``K = k``. All randomness comes from one
    uniform draw (each PRNG call costs XLA compile time).
    """
    t, m = sum(group_counts), len(group_counts)
    k = num_kept(t, ratio)
    if available is None:
        available = jnp.ones((batch_size, m), bool)
    offsets = [sum(group_counts[:i]) for i in range(m)]
    sizes = [m, (k + m) * m, t]
    u = uniform(key, (batch_size, sum(sizes)))          # per-sample keys: row by row

    def one(u, avail):
        u_share, u_settle, u_pick = u[:m], u[m: m + (k + m) * m].reshape(k + m, m), u[m + (k + m) * m:]
        counts = _split_counts(u_share, u_settle, group_counts, k, avail)
        kept = []
        for mi, (off, g) in enumerate(zip(offsets, group_counts)):
            rank = jnp.argsort(jnp.argsort(u_pick[off: off + g]))
            kept.append(rank < counts[mi])
        kept = jnp.concatenate(kept)
        keep_idx = jnp.argsort(~kept, stable=True)[:k].astype(jnp.int32)
        return (~kept).astype(jnp.int32), keep_idx, jnp.arange(k) < counts.sum()

    mask, keep_idx, valid = jax.vmap(one)(u, available)
    return KeepPlan(mask, keep_idx, valid)


def explicit_keep(token_mask: Array) -> KeepPlan:
    """Plan from a caller's mask ``[B, T]`` (1 = masked): every unmasked token kept, K = T."""
    token_mask = jnp.asarray(token_mask).astype(jnp.int32)
    keep_idx = jnp.argsort(token_mask, axis=1, stable=True).astype(jnp.int32)
    valid = jnp.take_along_axis(token_mask, keep_idx, axis=1) == 0
    return KeepPlan(token_mask, keep_idx, valid)


def token_positions(plan: KeepPlan) -> Array:
    """``[B, T]`` position of each token in ``keep_idx`` (-1 where not kept)."""
    b, t = plan.token_mask.shape
    k = plan.keep_idx.shape[1]
    pos = jnp.where(plan.keep_valid, jnp.arange(k, dtype=jnp.int32)[None, :], -1)
    out = jnp.full((b, t), -1, jnp.int32)
    return out.at[jnp.arange(b)[:, None], plan.keep_idx].max(pos)
