"""The device mesh and the one place logical axis names become mesh axes.

Parameters carry logical axis names (``axes`` metadata, e.g. ``("embed", "mlp")``); the
config's ``mesh.rules`` maps each logical name to mesh axes (``data``, ``fsdp``,
``tensor``). Batches are sharded over ``batch``'s mesh axes.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from morpheus_jax.core.config import MeshConfig
from morpheus_jax.core.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def _mesh_keys(sizes) -> str:
    return " ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` sizes for ``num_devices`` devices (one axis may be -1: the rest);
    a `ConfigError` naming the ``mesh.*`` keys and the device count when they do not fit."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    given = _mesh_keys(sizes)
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ConfigError(f"{given}: at most one mesh axis may be -1 (all the devices the others leave)")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{given}: mesh axis sizes must be positive, or -1 for one axis")
    fixed = math.prod(s for s in sizes if s != -1)
    if free and num_devices % fixed:
        raise ConfigError(f"{given}: the fixed axes ({fixed} devices) do not divide the {num_devices} devices present")
    if free:
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) > num_devices:
        raise ConfigError(f"{given}: the mesh needs {math.prod(sizes)} devices, {num_devices} are present")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """Mesh over all devices, or over the first ones when the axes ask for fewer (one
    process only: every process must own a part of a multi-process mesh)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 3
    if math.prod(shape) == len(devices):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    if jax.process_count() > 1:
        raise ConfigError(f"{_mesh_keys(shape)}: uses {math.prod(shape)} of the {len(devices)} devices; with "
                          f"{jax.process_count()} processes the mesh must use them all")
    return jax.sharding.Mesh(np.asarray(devices[: math.prod(shape)]).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(axes: tuple, shape: tuple[int, ...], rules: dict[str, list[str]],
                    mesh: jax.sharding.Mesh) -> PartitionSpec:
    """PartitionSpec of one array from its logical axes (see module docstring)."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axes = [a for a in rules.get(name, []) if mesh.shape[a] > 1] if name else []
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or used & set(mesh_axes) or dim % size:
            spec.append(None)
            continue
        used |= set(mesh_axes)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else mesh_axes[0])
    return PartitionSpec(*spec)


def tree_shardings(axes: dict[str, tuple], shapes: dict[str, tuple], rules, mesh) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, logical_to_spec(axes[k], shapes[k], rules, mesh)) for k in axes}


def batch_sharding(mesh: jax.sharding.Mesh, rules: dict[str, list[str]], ndim: int) -> NamedSharding:
    mesh_axes = tuple(a for a in rules.get("batch", []) if a in mesh.shape)
    lead = mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def batch_divisor(mesh: jax.sharding.Mesh, rules: dict[str, list[str]]) -> int:
    return math.prod(mesh.shape[a] for a in rules.get("batch", []) if a in mesh.shape)


def host_to_global(batch, mesh: jax.sharding.Mesh, rules: dict[str, list[str]]):
    """This process's rows of a batch (NumPy pytree) → global ``jax.Array``s on the batch axes."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x)
    return jax.tree.map(put, batch)


def global_from_full(batch, mesh: jax.sharding.Mesh, rules: dict[str, list[str]]):
    """A batch every process holds in full → global arrays sharded on the batch axes."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, batch_sharding(mesh, rules, x.ndim), lambda idx: x[idx])
    return jax.tree.map(put, batch)


def state_shardings(abstract_state, param_shardings: dict[str, NamedSharding], param_shapes: dict[str, tuple],
                    mesh: jax.sharding.Mesh):
    """Shardings of a train state: each parameter and every optimizer leaf that mirrors it
    (same name, same shape) by the rules; the rest (step, counts, RNG) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        name = getattr(path[-1], "key", None) if path else None
        if name in param_shardings and tuple(leaf.shape) == param_shapes[name]:
            return param_shardings[name]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


# -- activations ---------------------------------------------------------------------------------
# The model names the axes of its main activations; inside `activation_sharding(mesh, rules)`
# (entered while tracing the train step) those names become sharding constraints, elsewhere
# `constrain` does nothing, so the model runs unchanged on one device or in tests.

_ACTIVE: list[tuple[jax.sharding.Mesh, dict]] = []


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules: dict[str, list[str]]):
    _ACTIVE.append((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names, when rules are active."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, rules, mesh)))


def describe(names: list[str], shapes: dict[str, tuple], shardings: dict[str, NamedSharding]) -> str:
    """The table of parameter → shape → partition spec logged at start."""
    width = max(len(n) for n in names)
    lines = [f"{'parameter':<{width}}  {'shape':<20}  partition spec"]
    for n in names:
        spec = ", ".join("-" if a is None else (a if isinstance(a, str) else "+".join(a))
                         for a in shardings[n].spec) or "replicated"
        lines.append(f"{n:<{width}}  {str(list(shapes[n])):<20}  ({spec})")
    return "\n".join(lines)
