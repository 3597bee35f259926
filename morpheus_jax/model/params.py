"""The model's parameters as a flat ``{dotted name: array}`` dict.

The flat dict is what the train state, checkpoints and exports hold (names like
``encoder_blocks.0.attn.qkv.kernel``); `ParamCodec` turns it back into the NNX model inside
jitted code.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx


class ParamCodec:
    """Flat parameter dict ↔ NNX model (static: graph, tree structure, names, logical axes)."""

    def __init__(self, model: nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError("the model holds non-parameter state; ParamCodec expects parameters only")
        self.graphdef = graphdef
        self.treedef = jax.tree.structure(params)
        flat = list(nnx.to_flat_state(params))
        leaves = jax.tree.leaves(params)
        if len(flat) != len(leaves) or any(a is not v[...] for a, (_, v) in zip(leaves, flat)):
            raise AssertionError("flat state order differs from the pytree leaf order")
        self.names = [".".join(str(p) for p in path) for path, _ in flat]
        self.axes = {n: tuple(v.get_metadata().get("axes") or (None,) * v[...].ndim) for n, (_, v) in zip(self.names, flat)}
        self.shapes = {n: tuple(leaf.shape) for n, leaf in zip(self.names, leaves)}
        self.dtypes = {n: leaf.dtype for n, leaf in zip(self.names, leaves)}

    def flatten(self, model: nnx.Module) -> dict[str, jax.Array]:
        params = nnx.state(model, nnx.Param)
        return dict(zip(self.names, jax.tree.leaves(params)))

    def model(self, flat: dict[str, Any]) -> nnx.Module:
        missing = [n for n in self.names if n not in flat]
        if missing:
            raise KeyError(f"parameters missing: {missing[:5]}")
        params = jax.tree.unflatten(self.treedef, [flat[n] for n in self.names])
        return nnx.merge(self.graphdef, params)

    def stored_size(self) -> int:
        """Stored parameter elements (the canonical layout holds no padding)."""
        return sum(math.prod(s) for s in self.shapes.values())


def has_decoders(names) -> bool:
    """Whether flat parameter names include the omics decoders (else an encoder-only model)."""
    return any(n.startswith("omics_decoders.") for n in names)
