"""Tokenizers: WSI prototype pooling and the per-group omics MLPs (forward and reverse).

Per-group MLP weights are stored *stacked*: groups are sorted by size and split into a few
buckets (`GroupLayout`); inside a bucket, input weights are zero-padded to the bucket's
largest group. Padded rows/columns only ever meet zero inputs or ignored outputs, so they
get zero gradients and stay zero under AdamW. `morpheus_jax.export` converts this layout
to and from the authors' one-MLP-per-group layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morpheus_jax.core.sharding import constrain
from morpheus_jax.core.spec import GroupLayout
from morpheus_jax.model.layers import Dense, LayerNorm, einsum_f32, normal_init, torch_linear_init
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
    return jnp.asarray(kernel.astype(np.float32)), jnp.asarray(bias.astype(np.float32))


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
                 rng: np.random.Generator, dtype=jnp.float32):
        self.prototypes = nnx.Param(normal_init(rng, (num_prototypes, hidden)),
                                    axes=("prototypes", "embed"))
        self.kv_norm = LayerNorm(wsi_dim, axis_name="wsi_feature", eps=eps, dtype=dtype)
        self.k_proj = Dense(wsi_dim, hidden, axes=("wsi_feature", "embed"), rng=rng, dtype=dtype)
        self.v_proj = Dense(wsi_dim, hidden, axes=("wsi_feature", "embed"), rng=rng, dtype=dtype)
        self.q_norm = LayerNorm(hidden, eps=eps, dtype=dtype)
        self.output_proj = Dense(hidden, hidden, axes=("embed", "embed_out"), rng=rng, dtype=dtype)
        self.out_norm = LayerNorm(hidden, eps=eps, dtype=dtype)
        self.dtype = dtype

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x ``[B, N, D]`` patch features, mask ``[B, N]`` (True = real patch) → ``[B, P, H]``."""
        q = self.q_norm(self.prototypes[...])                            # [P, H]
        qk = jnp.dot(q.astype(jnp.float32), self.k_proj.kernel[...].T)   # [P, D]
        pooled = attention_pool(constrain(x, ("batch", None, None)), mask, self.kv_norm.weight[...],
                                self.kv_norm.bias[...], qk, q.shape[-1] ** -0.5, self.kv_norm.eps,
                                self.dtype)                              # A · LN(x), [B, P, D]
        return self.out_norm(self.output_proj(self.v_proj(pooled)))


class GroupTokenizer(nnx.Module):
    """One 2-layer SNN MLP per group (``Linear→ELU→Linear→ELU``), one token per group.

    Layer 1 (group size → group_hidden) is stored per bucket, layer 2 (group_hidden → H)
    stacked over all groups in mapping order.
    """

    def __init__(self, layout: GroupLayout, group_hidden: int, hidden: int, *, rng: np.random.Generator,
                 dtype=jnp.float32):
        self.layout = layout
        self.dtype = dtype
        w1, b1 = [], []
        for b, bucket in enumerate(layout.buckets):
            kernel, bias = _stacked_init(rng, layout, b, group_hidden, fan="size", pad_axis=1)
            w1.append(nnx.Param(kernel, axes=("groups", "group_in", "group_hidden")))
            b1.append(nnx.Param(bias, axes=("groups", "group_hidden")))
        self.w1 = nnx.List(w1)
        self.b1 = nnx.List(b1)
        g = layout.num_groups
        self.w2 = nnx.Param(torch_linear_init(rng, (g, group_hidden, hidden), group_hidden),
                            axes=("groups", "group_hidden", "embed"))
        self.b2 = nnx.Param(torch_linear_init(rng, (g, hidden), group_hidden), axes=("groups", "embed"))

    def __call__(self, x: Array) -> Array:
        """x ``[B, F]`` canonical features → tokens ``[B, G, H]`` in mapping group order."""
        dt = self.dtype
        xp = jnp.concatenate([x.astype(dt), jnp.zeros((x.shape[0], 1), dt)], axis=1)
        hs = []
        for b, (w, bias) in enumerate(zip(self.w1, self.b1)):
            xb = xp[:, self.layout.bucket_gather(b)]                   # [B, Gb, Wb]
            h = einsum_f32("bgi,gio->bgo", xb, w[...].astype(dt))
            hs.append(h + bias[...])
        unsort = np.argsort(self.layout.bucket_order())
        h = elu(jnp.concatenate(hs, axis=1)[:, unsort]).astype(dt)   # [B, G, Dh]
        out = einsum_f32("bgi,gio->bgo", h, self.w2[...].astype(dt))
        return elu(out + self.b2[...]).astype(dt)


class ReverseTokenizer(nnx.Module):
    """Per group ``Linear H→group_hidden → ELU → Linear group_hidden→size``.

    Layer 1 stacked over groups in mapping order, layer 2 per bucket (zero-padded columns).
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
        for b, bucket in enumerate(layout.buckets):
            kernel, bias = _stacked_init(rng, layout, b, group_hidden, fan="hidden", pad_axis=2)
            w2.append(nnx.Param(kernel, axes=("groups", "group_hidden", "group_in")))
            b2.append(nnx.Param(bias, axes=("groups", "group_in")))
        self.w2 = nnx.List(w2)
        self.b2 = nnx.List(b2)

    def __call__(self, x: Array) -> Array:
        """x ``[B, G, H]`` decoded group tokens → ``[B, S]`` predictions, groups in mapping order."""
        dt = self.dtype
        h = einsum_f32("bgi,gio->bgo", x.astype(dt), self.w1[...].astype(dt))
        h = elu(h + self.b1[...]).astype(dt)                         # [B, G, Dh]
        outs = []
        for groups, w, bias in zip(self.layout.buckets, self.w2, self.b2):
            o = einsum_f32("bgi,gio->bgo", h[:, np.asarray(groups)], w[...].astype(dt)) + bias[...]
            outs.append(o.reshape(o.shape[0], -1))
        return jnp.concatenate(outs, axis=1)[:, self.layout.flat_from_buckets()].astype(jnp.float32)
