"""Finding, reading and writing the checkpoints that export and import work on.

A checkpoint is named by a run folder (its latest checkpoint), a ``checkpoints`` folder (its
latest step) or one step folder. Reading gives the config, the layouts, the flat float32
parameters and the spec; writing (import) produces a step folder with ``state``
(step + parameters) and ``spec``, the layout `morpheus_jax.ckpt.store.Checkpointer`
writes, so `morpheus_jax.load` and `morpheus export` read it like any other.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np

from morpheus_jax.ckpt import legacy
from morpheus_jax.ckpt.store import Checkpointer, check_step, read_spec, restore_params
from morpheus_jax.core.config import Config, from_dict, model_modalities
from morpheus_jax.core.errors import CheckpointNotFound, OutputExists
from morpheus_jax.core.spec import BUCKETED_LAYOUT, CANONICAL_LAYOUT, GroupLayout, ModelSpec
from morpheus_jax.model.params import has_decoders


def _is_step_dir(path: Path) -> bool:
    return (path / "spec" / "metadata").is_file() and (path / "state").is_dir()


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """A run folder, a checkpoints folder or a step folder → the step folder to read."""
    path = Path(path)
    if _is_step_dir(path):
        return path.resolve()
    if not path.exists():
        raise CheckpointNotFound(f"{path}: no such file or folder")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(d.name), d) for d in folder.iterdir() if d.name.isdigit() and _is_step_dir(d))
    if not steps:
        raise CheckpointNotFound(f"{path}: not a MORPHEUS checkpoint, checkpoints folder or run folder "
                                 "(expected <run>/checkpoints/<step>/{state,spec})")
    return steps[-1][1].resolve()


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's parameters (host float32, canonical layout) and what rebuilds its model."""

    step_dir: Path
    step: int
    config: Config
    spec: ModelSpec
    layouts: dict[str, GroupLayout]
    params: dict[str, np.ndarray]

    @property
    def decoders(self) -> bool:
        return has_decoders(self.params)

    @property
    def groups(self) -> dict[str, dict[str, list[str]]]:
        return {m: dict(self.spec.groups[m]) for m in self.layouts}

    @property
    def features(self) -> dict[str, list[str]]:
        return {m: list(self.spec.features[m]) for m in self.layouts}


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Parameters and spec of a checkpoint (no optimizer state is read); checkpoints in the
    bucketed layout of morpheus-jax 0.1 are converted on the way (`legacy`)."""
    step_dir = resolve_step_dir(path)
    check_step(step_dir)
    spec = read_spec(step_dir)
    cfg = from_dict(spec.config)
    layouts = spec.layouts(model_modalities(cfg.model, spec.groups), cfg.model.group_buckets)
    params = {k: np.asarray(v, np.float32) for k, v in restore_params(step_dir).items()}
    if spec.param_layout == BUCKETED_LAYOUT or legacy.is_bucketed(params):
        params = legacy.canonical_params(params, layouts)
    step = int(step_dir.name) if step_dir.name.isdigit() else 0
    return Checkpoint(step_dir, step, cfg, dataclasses.replace(spec, param_layout=CANONICAL_LAYOUT), layouts, params)


def write_checkpoint(out: str | os.PathLike, step: int, params: Mapping[str, np.ndarray], spec: ModelSpec,
                     *, overwrite: bool = False) -> Path:
    """Write ``<out>/<step>/{state,spec}`` (state = step + parameters, no optimizer state).

    ``out`` is a checkpoints folder; it must be absent or empty unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExists(f"{out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    ckpt = Checkpointer(out, keep=1, async_save=False)
    try:
        state = {"step": np.asarray(step, np.int32),
                 "params": {k: np.asarray(v, np.float32) for k, v in params.items()}}
        ckpt.save(step, state, None, spec)
    finally:
        ckpt.close()
    return out.resolve() / str(step)
