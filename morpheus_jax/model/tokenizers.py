"""Tokenizers: WSI prototype pooling and the per-group omics MLPs (forward and reverse).

Per-group MLP weights are stored *stacked*: groups are sorted by size and split into a few
buckets (`GroupLayout`); inside a bucket, input weights are zero-padded to the bucket's
largest group. Padded rows/columns only ever meet zero inputs or ignored outputs, so they
get zero gradients and stay zero under AdamW. `morpheus_jax.export` converts this layout
to and from the authors' one-MLP-per-group layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morpheus_jax.model.layers import Dense, LayerNorm, einsum_f32, normal_init, torch_linear_init
from morpheus_jax.model.wsi_pool import attention_pool
from morpheus_jax.sharding import constrain

Array = jax.Array


def bucket_partition(sizes: list[int], num_buckets: int) -> list[list[int]]:
    """Split groups into ≤ num_buckets buckets minimising the padded size Σ |bucket|·max size.

    Groups are sorted by size (stable); buckets are contiguous runs of that order (optimal
    for this cost). Returns lists of original group indices, buckets in ascending size.
    """
    order = sorted(range(len(sizes)), key=lambda g: sizes[g])
    s = [sizes[g] for g in order]
    n, nb = len(s), max(1, min(num_buckets, len(s)))
    inf = float("inf")
    # cost[j][i]: best padded total covering the first i sorted groups with j buckets.
    cost = [[inf] * (n + 1) for _ in range(nb + 1)]
    back = [[0] * (n + 1) for _ in range(nb + 1)]
    cost[0][0] = 0
    for j in range(1, nb + 1):
        for i in range(1, n + 1):
            for h in range(j - 1, i):
                c = cost[j - 1][h] + (i - h) * s[i - 1]
                if c < cost[j][i]:
                    cost[j][i], back[j][i] = c, h
    j = min(range(1, nb + 1), key=lambda jj: cost[jj][n])
    bounds, i = [], n
    while j > 0:
        h = back[j][i]
        bounds.append((h, i))
        i, j = h, j - 1
    return [order[a:b] for a, b in reversed(bounds)]


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Static description of one modality's groups and their stacked-bucket storage.

    feature_index[g]: canonical feature indices (into the modality's flat ``[F]`` vector) of
    group g, in mapping order. Buckets hold groups sorted by size.
    """

    group_names: tuple[str, ...]
    feature_index: tuple[tuple[int, ...], ...]
    num_features: int
    buckets: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, group_names, feature_index, num_features: int, num_buckets: int) -> "GroupLayout":
        sizes = [len(f) for f in feature_index]
        if any(s == 0 for s in sizes):
            empty = [n for n, s in zip(group_names, sizes) if s == 0]
            raise ValueError(f"groups with no features: {empty[:5]}")
        buckets = bucket_partition(sizes, num_buckets)
        return cls(tuple(group_names), tuple(tuple(int(i) for i in f) for f in feature_index),
                   int(num_features), tuple(tuple(b) for b in buckets))

    @classmethod
    def from_mapping(cls, groups: dict[str, list[str]], features: list[str], num_buckets: int) -> "GroupLayout":
        """Layout from a ``{group: [feature names]}`` mapping and the canonical feature list."""
        index = {f: i for i, f in enumerate(features)}
        missing = [f for members in groups.values() for f in members if f not in index]
        if missing:
            raise ValueError(f"mapping features not in the feature list: {missing[:5]}")
        return cls.build(list(groups), [[index[f] for f in m] for m in groups.values()],
                         len(features), num_buckets)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def sizes(self) -> list[int]:
        return [len(f) for f in self.feature_index]

    @property
    def total_size(self) -> int:
        return sum(self.sizes)

    def bucket_width(self, b: int) -> int:
        return max(len(self.feature_index[g]) for g in self.buckets[b])

    def bucket_gather(self, b: int) -> np.ndarray:
        """``[Gb, Wb]`` feature indices; padding points at index F (a zero column)."""
        idx = np.full((len(self.buckets[b]), self.bucket_width(b)), self.num_features, np.int32)
        for slot, g in enumerate(self.buckets[b]):
            idx[slot, : len(self.feature_index[g])] = self.feature_index[g]
        return idx

    def bucket_order(self) -> np.ndarray:
        """Group index at each position of the bucket-concatenated order ``[G]``."""
        return np.asarray([g for bucket in self.buckets for g in bucket], np.int32)

    def entry_index(self) -> np.ndarray:
        """``[S]`` canonical feature index of each group entry, groups in mapping order."""
        return np.asarray([i for f in self.feature_index for i in f], np.int32)

    def flat_from_buckets(self) -> np.ndarray:
        """``[S]`` positions in the concatenation of flattened bucket outputs of each entry."""
        pos, base = {}, 0
        for b, bucket in enumerate(self.buckets):
            w = self.bucket_width(b)
            for slot, g in enumerate(bucket):
                pos[g] = base + slot * w
            base += len(bucket) * w
        return np.asarray([pos[g] + j for g in range(self.num_groups)
                           for j in range(len(self.feature_index[g]))], np.int32)

    def group_mean_matrix(self) -> np.ndarray:
        """``[S, G]``: entry → its group, weighted 1/size (per-group means by one matmul)."""
        mat = np.zeros((self.total_size, self.num_groups), np.float32)
        row = 0
        for g, f in enumerate(self.feature_index):
            mat[row: row + len(f), g] = 1.0 / len(f)
            row += len(f)
        return mat


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
