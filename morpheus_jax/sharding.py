"""The device mesh and the one place logical axis names become mesh axes.

Parameters carry logical axis names (``axes`` metadata, e.g. ``("embed", "mlp")``); the
config's ``mesh.rules`` maps each logical name to mesh axes (``data``, ``fsdp``,
``tensor``). Batches are sharded over ``batch``'s mesh axes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from morpheus_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
        raise ValueError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} does not fit {num_devices} devices")
    if free:
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) > num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{num_devices} are present")
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
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} must use all {len(devices)} devices "
                         "when running several processes")
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
