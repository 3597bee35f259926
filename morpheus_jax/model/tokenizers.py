"""Tokenizers: WSI prototype pooling and the per-group omics MLPs (forward and reverse).

Per-group MLP weights are stored in the *canonical* layout, a function of the group mapping
alone: the matrices whose shape depends on the group size are stacked over the group
entries in mapping order (``w1 [S, Dh]`` of a tokenizer, row ``offset(g) + j`` = input
feature j of group g; ``w2 [S, Dh]`` and ``b2 [S]`` of a reverse tokenizer, torch's
``[out, in]``), the others over groups (``[G, …]``). The step computes per bucket of similar
group sizes (`GroupLayout`, ``model.group_buckets``): `bucket_view` gathers a bucket's
zero-padded ``[Gb, Wb, Dh]`` stack from the canonical rows (its gradient is the inverse
gather, no scatter). So bucketing is how the step computes, never what a checkpoint holds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morpheus_jax.core.sharding import constrain
from morpheus_jax.core.spec import GroupLayout
from morpheus_jax.model.layers import (
    Dense,
    LayerNorm,
    einsum_f32,
    normal_init,
    torch_linear_init,
)
from morpheus_jax.model.wsi_pool import attention_pool

Array = jax.Array


def _stacked_init(rng: np.random.Generator, layout: GroupLayout, b: int, hidden: int, *, fan: str, pad_axis: int):
    """torch-default init of one bucket of per-group Linears, padding zeroed.

    pad_axis 1: kernels ``[Gb, Wb, hidden]`` (input = the group's features, fan_in = size);
    pad_axis 2: kernels ``[Gb, hidden, Wb]`` (output = the group's features, fan_in = hidden).
    """
    bucket = layout.buckets[b]
    width = layout.bucket_width(b)
    sizes = np.asarray([len(layout.feature_index[g]) for g in bucket])
    valid = (np.arange(width)[None, :] < sizes[:, None]).astype(np.float32)     # [Gb, Wb]
    fan_in = sizes.astype(np.float32) if fan == "size" else np.full(len(bucket), hidden, np.float32)
    bound = (1.0 / np.sqrt(fan_in))
    if pad_axis == 1:
        kernel = rng.uniform(-1.0, 1.0, (len(bucket), width, hidden)) * (bound[:, None, None] * valid[:, :, None])
        bias = rng.uniform(-1.0, 1.0, (len(bucket), hidden)) * bound[:, None]
    else:
        kernel = rng.uniform(-1.0, 1.0, (len(bucket), hidden, width)) * (bound[:, None, None] * valid[:, None, :])
        bias = rng.uniform(-1.0, 1.0, (len(bucket), width)) * (bound[:, None] * valid)
    return kernel.astype(np.float32), bias.astype(np.float32)


def pack_buckets(stacks: list[np.ndarray], layout: GroupLayout) -> np.ndarray:
    """Per-bucket ``[Gb, Wb, …]`` stacks → canonical ``[S, …]`` rows (padding dropped)."""
    flat = np.concatenate([s.reshape((-1,) + s.shape[2:]) for s in stacks])
    return flat[layout.flat_from_buckets()]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def bucket_view(rows: Array, layout: GroupLayout) -> tuple[Array, ...]:
    """Canonical ``[S, D]`` rows → per-bucket ``[Gb, Wb, D]`` stacks, zero rows as padding."""
    full = jnp.concatenate([rows, jnp.zeros((1,) + rows.shape[1:], rows.dtype)])
    return tuple(full[layout.bucket_entries(b)] for b in range(len(layout.buckets)))


def _bucket_view_fwd(rows, layout):
    return bucket_view(rows, layout), None


def _bucket_view_bwd(layout, _, grads):
    # Each canonical row appears once among the stacks: its gradient is a gather.
    flat = jnp.concatenate([g.reshape((-1,) + g.shape[2:]) for g in grads])
    return (flat[layout.flat_from_buckets()],)


bucket_view.defvjp(_bucket_view_fwd, _bucket_view_bwd)


def elu(x):
    return jax.nn.elu(x)


class WSITokenizer(nnx.Module):
    """Single-head cross-attention pooling of a patch bag onto P learned prototypes.

    Computes ``LN(softmax(LN(proto) K^T / sqrt(H)) V Wo + bo)`` with ``K, V = LN(x) Wk/v + b``
    without projecting patches: scores use ``(q Wk^T)`` against the normalised patches and the
    pooled patches are projected once, ``(A kv) Wv + bv`` (rows of A sum to 1; ``q·bk`` is
    constant per row). About H/P times fewer FLOPs than the literal form, same function;
    `attention_pool` also avoids materialising the normalised patches.
    """

    def __init__(self, wsi_dim: int, hidden: int, num_prototypes: int, *, eps: float,
                 rng: np.random.Generator, dtype=jnp.float32, prototype_init: str = "zeros",
                 q_factor: float = 1.0):
        protos = normal_init(rng, (num_prototypes, hidden))       # drawn either way: the same stream
        if prototype_init == "zeros":                             # the authors' (all queries start equal)
            protos = jnp.zeros_like(protos)
        self.prototypes = nnx.Param(protos, axes=("prototypes", "embed"))
        self.kv_norm = LayerNorm(wsi_dim, axis_name="wsi_feature", eps=eps, dtype=dtype)
        self.k_proj = Dense(wsi_dim, hidden, axes=("wsi_feature", "embed"), rng=rng, dtype=dtype)
        self.v_proj = Dense(wsi_dim, hidden, axes=("wsi_feature", "embed"), rng=rng, dtype=dtype)
        self.q_norm = LayerNorm(hidden, eps=eps, dtype=dtype)
        self.output_proj = Dense(hidden, hidden, axes=("embed", "embed_out"), rng=rng, dtype=dtype)
        self.out_norm = LayerNorm(hidden, eps=eps, dtype=dtype)
        self.dtype = dtype
        self.q_factor = q_factor          # µP: scores × sqrt(H_base / H) (`model.mup`); 1 = standard

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x ``[B, N, D]`` patch features, mask ``[B, N]`` (True = real patch) → ``[B, P, H]``."""
        q = self.q_norm(self.prototypes[...])                            # [P, H]
        qk = jnp.dot(q.astype(jnp.float32), self.k_proj.kernel[...].T)   # [P, D]
        pooled = attention_pool(constrain(x, ("batch", None, None)), mask, self.kv_norm.weight[...],
                                self.kv_norm.bias[...], qk, q.shape[-1] ** -0.5 * self.q_factor, self.kv_norm.eps,
                                self.dtype)                              # A · LN(x), [B, P, D]
        return self.out_norm(self.output_proj(self.v_proj(pooled)))


class GroupTokenizer(nnx.Module):
    """One 2-layer SNN MLP per group (``Linear→ELU→Linear→ELU``), one token per group.

    Parameters (canonical): ``w1 [S, Dh]`` (group entries in mapping order), ``b1 [G, Dh]``,
    ``w2 [G, Dh, H]``, ``b2 [G, H]``. Layer 1 computes per bucket (`bucket_view`).
    """

    def __init__(self, layout: GroupLayout, group_hidden: int, hidden: int, *, rng: np.random.Generator,
                 dtype=jnp.float32):
        self.layout = layout
        self.dtype = dtype
        w1, b1 = [], []
        for b in range(len(layout.buckets)):   # drawn per bucket: the same values for any mapping order
            kernel, bias = _stacked_init(rng, layout, b, group_hidden, fan="size", pad_axis=1)
            w1.append(kernel)
            b1.append(bias)
        self.w1 = nnx.Param(jnp.asarray(pack_buckets(w1, layout)), axes=("group_entries", "group_hidden"))
        unsort = np.argsort(layout.bucket_order())
        self.b1 = nnx.Param(jnp.asarray(np.concatenate(b1)[unsort]), axes=("groups", "group_hidden"))
        g = layout.num_groups
        self.w2 = nnx.Param(torch_linear_init(rng, (g, group_hidden, hidden), group_hidden),
                            axes=("groups", "group_hidden", "embed"))
        self.b2 = nnx.Param(torch_linear_init(rng, (g, hidden), group_hidden), axes=("groups", "embed"))

    def __call__(self, x: Array) -> Array:
        """x ``[B, F]`` canonical features → tokens ``[B, G, H]`` in mapping group order."""
        dt = self.dtype
        xp = jnp.concatenate([x.astype(dt), jnp.zeros((x.shape[0], 1), dt)], axis=1)
        hs = []
        for b, w in enumerate(bucket_view(self.w1[...], self.layout)):
            xb = xp[:, self.layout.bucket_gather(b)]                   # [B, Gb, Wb]
            hs.append(einsum_f32("bgi,gio->bgo", xb, w.astype(dt)))
        unsort = np.argsort(self.layout.bucket_order())
        h = elu(jnp.concatenate(hs, axis=1)[:, unsort] + self.b1[...]).astype(dt)   # [B, G, Dh]
        out = einsum_f32("bgi,gio->bgo", h, self.w2[...].astype(dt))
        return elu(out + self.b2[...]).astype(dt)


class ReverseTokenizer(nnx.Module):
    """Per group ``Linear H→group_hidden → ELU → Linear group_hidden→size``.

    Parameters (canonical): ``w1 [G, H, Dh]``, ``b1 [G, Dh]``, ``w2 [S, Dh]`` (one row per
    output entry, torch's ``[out, in]``), ``b2 [S]``. Layer 2 computes per bucket.
    """

    def __init__(self, layout: GroupLayout, group_hidden: int, hidden: int, *, rng: np.random.Generator,
                 dtype=jnp.float32):
        self.layout = layout
        self.dtype = dtype
        g = layout.num_groups
        self.w1 = nnx.Param(torch_linear_init(rng, (g, hidden, group_hidden), hidden),
                            axes=("groups", "embed", "group_hidden"))
        self.b1 = nnx.Param(torch_linear_init(rng, (g, group_hidden), hidden), axes=("groups", "group_hidden"))
        w2, b2 = [], []
        for b in range(len(layout.buckets)):
            kernel, bias = _stacked_init(rng, layout, b, group_hidden, fan="hidden", pad_axis=2)
            w2.append(kernel.transpose(0, 2, 1))            # [Gb, Wb, Dh]
            b2.append(bias)
        self.w2 = nnx.Param(jnp.asarray(pack_buckets(w2, layout)), axes=("group_entries", "group_hidden"))
        self.b2 = nnx.Param(jnp.asarray(pack_buckets(b2, layout)), axes=("group_entries",))

    def __call__(self, x: Array) -> Array:
        """x ``[B, G, H]`` decoded group tokens → ``[B, S]`` predictions, groups in mapping order."""
        dt = self.dtype
        h = einsum_f32("bgi,gio->bgo", x.astype(dt), self.w1[...].astype(dt))
        h = elu(h + self.b1[...]).astype(dt)                         # [B, G, Dh]
        outs = []
        for groups, w in zip(self.layout.buckets, bucket_view(self.w2[...], self.layout)):
            o = einsum_f32("bgi,goi->bgo", h[:, np.asarray(groups)], w.astype(dt))
            outs.append(o.reshape(o.shape[0], -1))
        out = jnp.concatenate(outs, axis=1)[:, self.layout.flat_from_buckets()] + self.b2[...]
        return out.astype(jnp.float32)
