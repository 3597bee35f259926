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
from typing import Any, Mapping

import numpy as np

from morpheus_jax.ckpt.store import Checkpointer, read_spec, restore_params
from morpheus_jax.core.config import Config, from_dict, to_dict
from morpheus_jax.core.errors import CheckpointNotFound
from morpheus_jax.core.spec import GroupLayout


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


def layouts_from_spec(spec: Mapping[str, Any], cfg: Config) -> dict[str, GroupLayout]:
    mods = spec.get("modalities") or {}
    missing = [m for m in cfg.model.modalities if m not in mods]
    if missing:
        raise ValueError(f"checkpoint spec has no groups for modalities {missing}")
    return {m: GroupLayout.from_mapping(mods[m]["groups"], mods[m]["features"], cfg.model.group_buckets)
            for m in cfg.model.modalities}


@dataclasses.dataclass
class Checkpoint:
    step_dir: Path
    step: int
    config: Config
    spec: dict
    layouts: dict[str, GroupLayout]
    params: dict[str, np.ndarray]

    @property
    def decoders(self) -> bool:
        return any(n.startswith("omics_decoders.") for n in self.params)

    @property
    def groups(self) -> dict[str, dict[str, list[str]]]:
        return {m: dict(self.spec["modalities"][m]["groups"]) for m in self.layouts}

    @property
    def features(self) -> dict[str, list[str]]:
        return {m: list(self.spec["modalities"][m]["features"]) for m in self.layouts}


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:

    step_dir = resolve_step_dir(path)
    spec = read_spec(step_dir)
    cfg = from_dict(spec["config"])
    layouts = layouts_from_spec(spec, cfg)
    params = {k: np.asarray(v, np.float32) for k, v in restore_params(step_dir).items()}
    step = int(step_dir.name) if step_dir.name.isdigit() else 0
    return Checkpoint(step_dir, step, cfg, spec, layouts, params)


def make_spec(cfg: Config, groups: Mapping[str, Mapping[str, list[str]]],
              features: Mapping[str, list[str]]) -> dict:
    """The checkpoint spec: resolved config + per-modality mapping and canonical features."""
    return {"config": to_dict(cfg),
            "modalities": {m: {"groups": {g: list(f) for g, f in groups[m].items()},
                               "features": list(features[m])} for m in cfg.model.modalities}}


def write_checkpoint(out: str | os.PathLike, step: int, params: Mapping[str, np.ndarray], spec: Mapping[str, Any],
                     *, overwrite: bool = False) -> Path:
    """Write ``<out>/<step>/{state,spec}`` (state = step + parameters, no optimizer state).

    ``out`` is a checkpoints folder; it must be absent or empty unless ``overwrite``.
    """


    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    ckpt = Checkpointer(out, keep=1, async_save=False)
    try:
        state = {"step": np.asarray(step, np.int32),
                 "params": {k: np.asarray(v, np.float32) for k, v in params.items()}}
        ckpt.save(step, state, None, dict(spec))
    finally:
        ckpt.close()
    return out.resolve() / str(step)
