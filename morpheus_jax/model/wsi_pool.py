"""The WSI tokenizer's attention pooling, computed from the raw patches.

The function (reference §2, single head, P prototype queries)::

    kv = LayerNorm(x) = xhat * w + b            xhat = (x - mean) * rstd, per patch
    A  = softmax_n(s · kv qkᵀ)  (masked)         qk = LN(prototypes) Wkᵀ   [P, D]
    pooled = A kv                                 [B, P, D]

is computed without materialising ``kv`` or ``xhat`` (``[B, N, D]``, the largest tensors of
the model): with ``Q = w ⊙ qk``, ``kv qkᵀ = rstd·(x Qᵀ − mean·ΣQ) + b·qk`` (the last term is
constant over patches and drops out of the softmax), and since rows of A sum to one,
``A kv = ((A·rstd) x − A·rstd·mean) ⊙ w + b``. The custom VJP reuses the same algebra, so
forward and backward read the patches four times in all (statistics, scores, pooling;
scores' and pooling's gradients), against about ten reads and writes of a float32
``[B, N, D]`` tensor when the normalised patches are materialised. Patches get no
gradient (they are data).

Precision: ``x Qᵀ − mean·ΣQ`` subtracts the patch mean after the product; with float32
accumulation this matches the direct form to ~1e-6 relative unless patch means are many
orders of magnitude above their spread (not the case for foundation-model features).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from morpheus_jax.model.layers import einsum_f32

Array = jax.Array
_NEG = jnp.finfo(jnp.float32).min


def _stats(x: Array, eps: float) -> tuple[Array, Array]:
    mean = jnp.mean(x, axis=-1)
    var = jnp.mean(jnp.square(x - mean[..., None]), axis=-1)
    return mean, jax.lax.rsqrt(var + eps)


def _forward(x, mask, w, b, qk, scale, eps, dtype):
    x = x.astype(dtype)
    mean, rstd = _stats(x.astype(jnp.float32), eps)                 # [B, N]
    q = w[None, :] * qk                                             # [P, D]
    xq = einsum_f32("bnd,pd->bnp", x, q.astype(dtype))
    scores = scale * rstd[..., None] * (xq - mean[..., None] * q.sum(-1))
    if mask is not None:
        scores = jnp.where(mask[..., None], scores, _NEG)
    a = jax.nn.softmax(scores, axis=1)                              # [B, N, P], over patches
    ar = a * rstd[..., None]
    pooled_hat = (einsum_f32("bnp,bnd->bpd", ar.astype(dtype), x)
                  - jnp.einsum("bnp,bn->bp", ar, mean)[..., None])  # A · xhat, [B, P, D]
    return pooled_hat * w + b, (mean, rstd, a, pooled_hat, q)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def attention_pool(x: Array, mask: Array | None, w: Array, b: Array, qk: Array, scale: float,
                   eps: float, dtype=jnp.float32) -> Array:
    """x ``[B, N, D]`` patches (any float dtype), mask ``[B, N]`` (True = real patch, or
    None), LayerNorm weight/bias ``w, b`` ``[D]``, queries through the key projection ``qk``
    ``[P, D]`` → ``A · LN(x)`` ``[B, P, D]`` (float32). ``dtype``: the products' input dtype
    (statistics, softmax and accumulation stay float32)."""
    return _forward(x, mask, w, b, qk, scale, eps, dtype)[0]


def _fwd(x, mask, w, b, qk, scale, eps, dtype):
    out, res = _forward(x, mask, w, b, qk, scale, eps, dtype)
    return out, (x, mask, w, qk, *res)


def _bwd(scale, eps, dtype, res, g):
    x, mask, w, qk, mean, rstd, a, pooled_hat, q = res
    x = x.astype(dtype)
    d_b = g.sum((0, 1))
    d_w = (g * pooled_hat).sum((0, 1))
    gw = g * w                                                      # d pooled_hat
    d_a = rstd[..., None] * (einsum_f32("bnd,bpd->bnp", x, gw.astype(dtype))
                             - mean[..., None] * gw.sum(-1)[:, None, :])
    d_s = a * (d_a - jnp.sum(a * d_a, axis=1, keepdims=True))       # softmax over patches
    dsr = d_s * rstd[..., None]
    d_q = scale * (einsum_f32("bnp,bnd->pd", dsr.astype(dtype), x)
                   - jnp.einsum("bnp,bn->p", dsr, mean)[:, None])
    d_w = d_w + (d_q * qk).sum(0)
    return None, None, d_w, d_b, d_q * w


attention_pool.defvjp(_fwd, _bwd)


def attention_pool_reference(x, mask, w, b, qk, scale, eps):
    """The same function written directly (normalised patches materialised), for tests."""
    x = x.astype(jnp.float32)
    mean, rstd = _stats(x, eps)
    kv = (x - mean[..., None]) * rstd[..., None] * w + b
    scores = scale * jnp.einsum("bnd,pd->bpn", kv, qk)
    if mask is not None:
        scores = jnp.where(mask[:, None, :], scores, _NEG)
    return jnp.einsum("bpn,bnd->bpd", jax.nn.softmax(scores, axis=-1), kv)
