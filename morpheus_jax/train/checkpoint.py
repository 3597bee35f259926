"""Orbax checkpoints of a run: ``<run_dir>/checkpoints/<step>/``.

Each checkpoint holds ``state`` (step, parameters, optimizer state, RNG key), ``data`` (the
Grain iterator state of every process: ``process_<i>-of-<n>.json``), and ``spec`` (JSON:
the resolved config and the model's modality groups and feature names, enough to rebuild
the model without the dataset). Saves are asynchronous; Orbax writes each checkpoint
under a temporary name and renames it when complete, so a save killed midway leaves no
checkpoint. The latest ``keep`` checkpoints are kept, and the ``keep_best`` with the
lowest validation loss among those saved at evaluation steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger("morpheus_jax")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int, keep_best: int = 1, async_save: bool = True):
        self.directory = Path(directory).resolve()
        policy = ocm.AnyPreservationPolicy([
            ocm.LatestN(n=max(1, keep)),
            ocm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=keep_best,
                      keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save,
                                               preservation_policy=policy)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "spec": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, data_iter, spec: dict, metrics: dict | None = None) -> bool:
        items = {"state": ocp.args.StandardSave(state), "spec": ocp.args.JsonSave(spec)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: dict, data_iter=None) -> tuple[dict, bool]:
        """(state, whether the data iterator was restored). The iterator state is per process:
        if this checkpoint was written by a different number of processes, it is left for
        the caller to reposition (see `pretrain`)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        data_ok = data_iter is not None and self._has_data_for_this_process(step)
        if data_ok:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], data_ok

    def _has_data_for_this_process(self, step: int) -> bool:
        import jax
        path = self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return path.exists()

    def restore_latest(self, abstract_state: dict, data_iter=None, check=None) -> tuple[int, dict, bool] | None:
        """The newest checkpoint that restores; unreadable or corrupted ones are skipped with
        a warning. ``check(step_dir)`` may raise to refuse a checkpoint outright (an
        incompatible config). Returns (step, state, data restored) or None."""
        for step in reversed(self.steps()):
            step_dir = self.directory / str(step)
            if check is not None:
                check(step_dir)
            try:
                state, data_ok = self.restore(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 — any failure to read means "not a good checkpoint"
                log.warning("checkpoint %s is incomplete or corrupted (%s: %s); trying the previous one",
                            step_dir, type(e).__name__, str(e).splitlines()[0][:200])
                print(f"warning: checkpoint {step_dir} is incomplete or corrupted "
                      f"({type(e).__name__}); trying the previous one", flush=True)
                continue
            return step, state, data_ok
        return None

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
