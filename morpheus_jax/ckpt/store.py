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
import os
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from morpheus_jax.core import log
from morpheus_jax.core.errors import CheckpointError, CheckpointNotFound
from morpheus_jax.core.spec import ModelSpec


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

    def save(self, step: int, state: dict, data_iter, spec: ModelSpec, metrics: dict | None = None) -> bool:
        items = {"state": ocp.args.StandardSave(state), "spec": ocp.args.JsonSave(spec.to_json())}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: dict, data_iter=None) -> tuple[dict, bool]:
        """(state, whether the data iterator was restored). The iterator state is per process:
        if this checkpoint was written by a different number of processes, it is left for
        the caller to reposition (see `pretrain`)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        data_ok = data_iter is not None and self._data_path(step).exists()
        if data_ok:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], data_ok

    def _data_path(self, step: int) -> Path:
        return self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def _data_problem(self, step: int) -> str | None:
        """Why this process's data-iterator state in ``step`` is unreadable, if it is."""
        path = self._data_path(step)
        try:
            if path.exists():
                json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"{path.name}: {type(e).__name__}"
        return None

    def restore_latest(self, abstract_state: dict, data_iter=None, check=None) -> tuple[int, dict, bool] | None:
        """The newest checkpoint that restores; unreadable or corrupted ones are skipped with
        a warning. ``check(step_dir)`` may raise to refuse a checkpoint outright (an
        incompatible config). Returns (step, state, data restored) or None.

        In a multi-process job each process has its own data-iterator state file, so one
        may be damaged where the others are not: the processes first agree that every one
        of them can read its file, or they would resume from different steps. (Orbax's
        restore of the arrays is itself collective: a failure there is everyone's.)
        Skipped checkpoints are renamed ``<step>.damaged`` (kept for inspection), so the
        run can save those steps again."""
        for step in reversed(self.steps()):
            step_dir = self.directory / str(step)
            if check is not None:
                check(step_dir)
            problem = self._data_problem(step) if data_iter is not None else None
            failed = _failed_processes(problem is not None)
            if failed:
                self._set_aside(step, problem or f"unreadable in process(es) {', '.join(map(str, failed))}")
                continue
            try:
                state, data_ok = self.restore(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 — any failure to read means "not a good checkpoint"
                log.warning(f"checkpoint {step_dir} does not restore ({type(e).__name__}: {str(e)[:300]})")
                self._set_aside(step, type(e).__name__)
                continue
            return step, state, data_ok
        return None

    def _set_aside(self, step: int, why: str) -> None:
        """Warn, rename ``<step>`` to ``<step>.damaged`` (process 0; every process calls
        this for the same steps) and drop it from the manager's step list."""
        src = self.directory / str(step)
        log.warning(f"checkpoint {src} is incomplete or corrupted ({why}); trying the previous one")
        if jax.process_index() == 0:
            dst, n = src.with_name(f"{step}.damaged"), 0
            while dst.exists():
                n += 1
                dst = src.with_name(f"{step}.damaged-{n}")
            os.replace(src, dst)
            log.warning(f"moved {src} to {dst.name}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("morpheus:damaged checkpoint set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _failed_processes(failed_here: bool) -> list[int]:
    """Indices of the processes that report a failure (collective over all processes)."""
    if jax.process_count() == 1:
        return [0] if failed_here else []
    flags = np.asarray(multihost_utils.process_allgather(np.array([failed_here], np.int32))).reshape(-1)
    return [int(i) for i in np.flatnonzero(flags)]


def read_spec(step_dir: str | Path) -> ModelSpec:
    path = Path(step_dir) / "spec" / "metadata"
    if not path.exists():
        raise CheckpointNotFound(f"{step_dir}: not a morpheus checkpoint (no spec/metadata)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return ModelSpec.from_json(data, str(path))


def restore_params(step_dir: str | Path) -> dict[str, np.ndarray]:
    """Parameters only (``{name: array}``, host NumPy) from a checkpoint step folder; the
    optimizer state and the rest of the train state are not read (a partial restore)."""
    path = Path(step_dir).resolve() / "state"
    with ocp.PyTreeCheckpointer() as reader:
        tree = reader.metadata(path).item_metadata.tree
        names = list(tree["params"])
        item = {"params": {n: np.zeros((), np.float32) for n in names}}
        args = {"params": {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names}}
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                     partial_restore=True))
    return dict(restored["params"])
