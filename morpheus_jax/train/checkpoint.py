"""Orbax checkpoints of a run: ``<run_dir>/checkpoints/<step>/``.

Each checkpoint holds ``state`` (step, parameters, optimizer state, RNG), ``data`` (the
Grain iterator state of every process), and ``spec`` (JSON: the resolved config and the
model's modality groups and feature names, enough to rebuild the model without the
dataset).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


class Checkpointer:
    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, every), max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "spec": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iter, spec: dict, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state), "spec": ocp.args.JsonSave(spec)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict, data_iter=None) -> dict:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_spec(step_dir: str | Path) -> dict[str, Any]:
    path = Path(step_dir) / "spec" / "metadata"
    if not path.exists():
        raise FileNotFoundError(f"{step_dir}: not a morpheus checkpoint (no spec/metadata)")
    with open(path) as f:
        return json.loads(f.read())


def restore_params(step_dir: str | Path) -> dict[str, Any]:
    """Parameters only (``{name: array}``) from a checkpoint step folder."""
    restored = ocp.StandardCheckpointer().restore(Path(step_dir).resolve() / "state")
    return dict(restored["params"])
