"""The training step's parts, each compiled alone (forward + backward, or the update), for
`train_step.py`: where the step's time goes, measured in the same run as the whole step.

Parts, at the step's shapes (the encoder sees ``1 + P + k`` tokens, each decoder that many
context tokens and one query per group):

  wsi_tokenizer   prototype pooling of the patch bag, gradients of its parameters
  tokenizers      the per-group omics MLPs of every modality
  encoder         the encoder blocks and final norm, with dropout
  decoders        every omics decoder (blocks + reverse tokenizer) on an encoded sequence
  optimizer       the optax update over all parameters and the gradient-norm metric

Each part's backward starts from a fixed random cotangent; parts overlap in the real step
(XLA schedules across them), so the sum is an upper bound of the step, not its breakdown.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from morpheus_jax.model.layers import row_keys


def _median_time(fn, args, reps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _grad_time(module, call, inputs, reps: int, seed: int) -> float:
    """Median time of ``grad_params Σ(call(module, *inputs) · c)``, c a fixed random cotangent."""
    graphdef, params = nnx.split(module, nnx.Param)
    out_shape = jax.eval_shape(lambda p, *a: call(nnx.merge(graphdef, p), *a), params, *inputs)
    cts = jax.tree.map(lambda s, k: jax.random.normal(k, s.shape, s.dtype), out_shape,
                       _keys_like(out_shape, seed))

    def loss(p, *a):
        out = call(nnx.merge(graphdef, p), *a)
        return sum(jnp.vdot(o, c) for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cts)))

    return _median_time(jax.jit(jax.grad(loss)), (params, *inputs), reps)


def _keys_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(seed), len(leaves))))


def part_times(model, batch: dict, state: dict, tx: optax.GradientTransformation, kept: int,
               reps: int = 5) -> dict[str, float]:
    """Seconds per call of each part (median of ``reps``), keyed as in the module docstring.
    ``kept``: omics tokens the encoder sees per sample (``k``)."""
    b = batch["wsi"].shape[0]
    h = model.hidden_size
    p = model.wsi_tokenizer.prototypes.shape[0]
    rng = np.random.default_rng(0)
    keys = row_keys(jax.random.key(0), b)
    seq = 1 + p + kept
    x = jnp.asarray(rng.normal(size=(b, seq, h)).astype(np.float32))
    valid = jnp.ones((b, seq), bool)
    out = {}
    out["wsi_tokenizer"] = _grad_time(model.wsi_tokenizer, lambda m, w, mk: m(w, mk),
                                      (batch["wsi"], batch["wsi_mask"]), reps, 1)
    out["tokenizers"] = _grad_time(model.omics_tokenizers,
                                   lambda m, om: [m[k](om[k]) for k in om], (batch["omics"],), reps, 2)

    def encoder(m, x, valid, keys):
        for block in m.encoder_blocks:
            x = block(x, valid, keys)
        return m.norm(x)

    out["encoder"] = _grad_time(model, encoder, (x, valid, keys), reps, 3)
    pos = {m: jnp.asarray(np.where(rng.random((b, lay.num_groups)) < 0.25,
                                   rng.integers(1 + p, seq, (b, lay.num_groups)), -1).astype(np.int32))
           for m, lay in model.layouts.items()}
    out["decoders"] = _grad_time(model.omics_decoders,
                                 lambda m, e, v, ps: [m[k](e, v, ps[k]) for k in ps], (x, valid, pos), reps, 4)
    params = state["params"]
    grads = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), params)

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    out["optimizer"] = _median_time(jax.jit(update), (params, state["opt_state"], grads), reps)
    return out
