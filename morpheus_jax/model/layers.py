"""Transformer building blocks shared by the encoder and the omics decoders.

Every parameter carries logical axis names (metadata ``axes``); `morpheus_jax.core.sharding`
maps them to mesh axes. Initialisers follow PyTorch's defaults (``nn.Linear``:
U(±1/sqrt(fan_in)) for weight and bias; ``nn.LayerNorm``: ones and zeros) so training
dynamics match the authors' model.

Dropout takes an explicit PRNG key; ``key=None`` means evaluation (no dropout). A block
draws the uniform noise of all its dropout sites in one PRNG call (`block_noise`): each
partitionable threefry call costs seconds of XLA compile time on CPU, so one call per
block instead of one per site keeps the training step's compile short.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morpheus_jax.core.sharding import constrain

Array = jax.Array


def torch_linear_init(rng: np.random.Generator, shape, fan_in) -> jax.Array:
    """U(±1/sqrt(fan_in)), drawn with NumPy (no per-shape XLA compile at init)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32))


def normal_init(rng: np.random.Generator, shape, std: float = 0.02) -> jax.Array:
    return jnp.asarray((std * rng.standard_normal(shape)).astype(np.float32))


# Keys: a single key, or one key per sample (``[B]``, `row_keys`). With per-sample keys every
# random draw of a sample (masking, dropout) comes from its own key, so it is the same whether
# the sample is computed in the whole batch or in a micro-batch (gradient accumulation).

def row_keys(key, b: int, start: int = 0):
    """``[b]`` per-sample keys ``fold_in(key, start + i)``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(b))


def split_key(key, n: int):
    """``n`` sub-keys (each ``[B]`` for per-sample keys), or ``n`` Nones when ``key`` is None
    (evaluation)."""
    if key is None:
        return [None] * n
    if key.ndim == 1:
        parts = jax.vmap(lambda k: jax.random.split(k, n))(key)
        return [parts[:, i] for i in range(n)]
    return list(jax.random.split(key, n))


def uniform(key, shape: tuple[int, ...]) -> Array:
    """Uniform [0, 1) of ``shape`` (leading batch axis); per-sample keys draw row by row."""
    if key.ndim == 1:
        return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)
    return jax.random.uniform(key, shape)


def block_noise(key, rate: float, shapes: list[tuple[int, ...]]) -> list[Array | None]:
    """Uniform [0, 1) arrays of the given shapes (leading batch axis shared) from one PRNG
    call; Nones in evaluation (key None) or when rate is 0."""
    if key is None or rate <= 0.0:
        return [None] * len(shapes)
    b = shapes[0][0]
    sizes = [math.prod(s[1:]) for s in shapes]
    u = uniform(key, (b, sum(sizes)))
    offsets = np.cumsum([0] + sizes)
    return [u[:, offsets[i]: offsets[i + 1]].reshape(s) for i, s in enumerate(shapes)]


def dropout(x: Array, rate: float, noise: Array | None) -> Array:
    """Inverted dropout; ``noise`` is uniform [0, 1) of x's shape (None: identity)."""
    if noise is None or rate <= 0.0:
        return x
    return jnp.where(noise >= rate, x / (1.0 - rate), jnp.zeros((), x.dtype))


def einsum_f32(spec: str, a: Array, b: Array) -> Array:
    """``jnp.einsum`` accumulating and returning float32 whatever the operands' dtype
    (bfloat16 operands multiply in bfloat16 on GPU/TPU). XLA:CPU has no bfloat16 x bfloat16
    -> float32 dot, so there the operands are widened first (exact: bf16 -> f32 is lossless).
    The choice is made per platform when the program is lowered (`lax.platform_dependent`),
    not from the tracing host's backend: a step exported from a CPU host for TPU keeps its
    bfloat16 products."""
    def native(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    if jnp.bfloat16 not in (a.dtype, b.dtype):
        return native(a, b)
    return jax.lax.platform_dependent(
        a, b, cpu=lambda a, b: native(a.astype(jnp.float32), b.astype(jnp.float32)), default=native)


class Dense(nnx.Module):
    """``y = x @ kernel + bias``; kernel ``[in, out]`` (the transpose of a torch weight)."""

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str, str], rng: np.random.Generator,
                 dtype=jnp.float32):
        self.kernel = nnx.Param(torch_linear_init(rng, (d_in, d_out), d_in), axes=axes)
        self.bias = nnx.Param(torch_linear_init(rng, (d_out,), d_in), axes=(axes[1],))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = einsum_f32("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return (y + self.bias[...]).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32 (eps 1e-5 as torch)."""

    def __init__(self, dim: int, *, axis_name: str = "embed", eps: float = 1e-5,
                 dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=(axis_name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(self.dtype)


def attend(q: Array, k: Array, v: Array, key_mask: Array | None, rate: float, noise) -> Array:
    """Multi-head scaled dot-product attention.

    q ``[B, Lq, nh, hd]``, k/v ``[B, Lk, nh, hd]``, key_mask ``[B, Lk]`` (True = attend) →
    ``[B, Lq, nh, hd]``. Dropout (rate, noise ``[B, nh, Lq, Lk]``) applies to the attention
    weights as in torch.
    """
    if noise is None or rate <= 0.0:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    scale = q.shape[-1] ** -0.5
    logits = einsum_f32("bqhd,bkhd->bhqk", q, k) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    weights = dropout(jax.nn.softmax(logits, axis=-1), rate, noise).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _scaled(x: Array, factor: float) -> Array:
    return x if factor == 1.0 else x * jnp.asarray(factor, x.dtype)


class SelfAttention(nnx.Module):
    """Fused-qkv self-attention (torch key names ``attn.qkv``, ``attn.out_proj``).

    The qkv output dimension is ordered (q|k|v, head, head_dim), as the authors' layout.
    """

    def __init__(self, dim: int, heads: int, dropout_rate: float, *, rng: np.random.Generator, dtype,
                 q_factor: float = 1.0):
        self.heads = heads
        self.dropout_rate = dropout_rate
        self.q_factor = q_factor          # µP: queries × sqrt(d_base / d) (`model.mup`); 1 = standard
        self.qkv = Dense(dim, 3 * dim, axes=("embed", "qkv"), rng=rng, dtype=dtype)
        self.out_proj = Dense(dim, dim, axes=("heads_merged", "embed"), rng=rng, dtype=dtype)

    def noise_shapes(self, b: int, lq: int, lk: int, d: int) -> list[tuple[int, ...]]:
        return [(b, self.heads, lq, lk), (b, lq, d)]

    def __call__(self, x: Array, key_mask: Array | None = None, noise=(None, None)) -> Array:
        """x ``[B, L, D]``, key_mask ``[B, L]`` → ``[B, L, D]``."""
        b, l, d = x.shape
        qkv = constrain(self.qkv(x).reshape(b, l, 3, self.heads, d // self.heads),
                        ("batch", None, None, "act_heads", None))
        out = attend(_scaled(qkv[:, :, 0], self.q_factor), qkv[:, :, 1], qkv[:, :, 2], key_mask, self.dropout_rate,
                     noise[0])
        return dropout(self.out_proj(out.reshape(b, l, d)), self.dropout_rate, noise[1])


class CrossAttention(nnx.Module):
    """Cross-attention with separate q/k/v projections; the context is not normalised."""

    def __init__(self, dim: int, heads: int, dropout_rate: float, *, rng: np.random.Generator, dtype,
                 q_factor: float = 1.0):
        self.heads = heads
        self.dropout_rate = dropout_rate
        self.q_factor = q_factor
        self.to_q = Dense(dim, dim, axes=("embed", "heads_merged"), rng=rng, dtype=dtype)
        self.to_k = Dense(dim, dim, axes=("embed", "heads_merged"), rng=rng, dtype=dtype)
        self.to_v = Dense(dim, dim, axes=("embed", "heads_merged"), rng=rng, dtype=dtype)
        self.out_proj = Dense(dim, dim, axes=("heads_merged", "embed"), rng=rng, dtype=dtype)

    def noise_shapes(self, b: int, lq: int, lk: int, d: int) -> list[tuple[int, ...]]:
        return [(b, self.heads, lq, lk), (b, lq, d)]

    def __call__(self, x: Array, context: Array, context_mask: Array | None, noise=(None, None)) -> Array:
        """x ``[B, Lq, D]``, context ``[B, Lk, D]``, context_mask ``[B, Lk]`` → ``[B, Lq, D]``."""
        b, lq, d = x.shape
        lk = context.shape[1]
        hd = d // self.heads
        q = _scaled(self.to_q(x), self.q_factor).reshape(b, lq, self.heads, hd)
        k = self.to_k(context).reshape(b, lk, self.heads, hd)
        v = self.to_v(context).reshape(b, lk, self.heads, hd)
        out = attend(q, k, v, context_mask, self.dropout_rate, noise[0])
        return dropout(self.out_proj(out.reshape(b, lq, d)), self.dropout_rate, noise[1])


class MLP(nnx.Module):
    """``Linear → GELU (exact) → Dropout → Linear → Dropout`` (torch ``mlp.linear1/2``)."""

    def __init__(self, dim: int, mlp_dim: int, dropout_rate: float, *, rng: np.random.Generator, dtype):
        self.dropout_rate = dropout_rate
        self.linear1 = Dense(dim, mlp_dim, axes=("embed", "mlp"), rng=rng, dtype=dtype)
        self.linear2 = Dense(mlp_dim, dim, axes=("mlp", "embed"), rng=rng, dtype=dtype)

    def noise_shapes(self, b: int, l: int, d: int) -> list[tuple[int, ...]]:
        return [(b, l, self.linear1.kernel.shape[1]), (b, l, d)]

    def __call__(self, x: Array, noise=(None, None)) -> Array:
        h = constrain(jax.nn.gelu(self.linear1(x), approximate=False), ("batch", None, "act_mlp"))
        h = dropout(h, self.dropout_rate, noise[0])
        return dropout(self.linear2(h), self.dropout_rate, noise[1])


class EncoderBlock(nnx.Module):
    """Pre-norm block: ``x += SelfAttn(LN(x)); x += MLP(LN(x))``."""

    def __init__(self, dim, heads, mlp_dim, dropout_rate, *, eps, rng: np.random.Generator, dtype,
                 q_factor: float = 1.0):
        self.norm1 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.attn = SelfAttention(dim, heads, dropout_rate, rng=rng, dtype=dtype, q_factor=q_factor)
        self.norm2 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.mlp = MLP(dim, mlp_dim, dropout_rate, rng=rng, dtype=dtype)

    def __call__(self, x: Array, key_mask: Array | None = None, key=None) -> Array:
        b, l, d = x.shape
        x = constrain(x, ("batch", None, "act_embed"))
        noise = block_noise(key, self.attn.dropout_rate,
                            self.attn.noise_shapes(b, l, l, d) + self.mlp.noise_shapes(b, l, d))
        x = x + self.attn(self.norm1(x), key_mask, noise[0:2])
        return x + self.mlp(self.norm2(x), noise[2:4])


class DecoderBlock(nnx.Module):
    """``x += SelfAttn(LN(x)); x += CrossAttn(LN(x), context); x += MLP(LN(x))``."""

    def __init__(self, dim, heads, mlp_dim, dropout_rate, *, eps, rng: np.random.Generator, dtype,
                 q_factor: float = 1.0):
        self.norm1 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.attn = SelfAttention(dim, heads, dropout_rate, rng=rng, dtype=dtype, q_factor=q_factor)
        self.norm_cross_attn = LayerNorm(dim, eps=eps, dtype=dtype)
        self.cross_attn = CrossAttention(dim, heads, dropout_rate, rng=rng, dtype=dtype, q_factor=q_factor)
        self.norm2 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.mlp = MLP(dim, mlp_dim, dropout_rate, rng=rng, dtype=dtype)

    def __call__(self, x: Array, context: Array, context_mask: Array | None, key=None) -> Array:
        b, l, d = x.shape
        x = constrain(x, ("batch", None, "act_embed"))
        shapes = (self.attn.noise_shapes(b, l, l, d) + self.cross_attn.noise_shapes(b, l, context.shape[1], d)
                  + self.mlp.noise_shapes(b, l, d))
        noise = block_noise(key, self.attn.dropout_rate, shapes)
        x = x + self.attn(self.norm1(x), None, noise[0:2])
        x = x + self.cross_attn(self.norm_cross_attn(x), context, context_mask, noise[2:4])
        return x + self.mlp(self.norm2(x), noise[4:6])
