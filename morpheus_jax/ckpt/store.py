"""Orbax checkpoints of a run: ``<run_dir>/checkpoints/<step>/``.

Each checkpoint holds ``state`` (step, parameters, optimizer state, RNG key), ``data`` (the
Grain iterator state of every process: ``process_<i>-of-<n>.json``), and ``spec`` (JSON:
the resolved config and the model's modality groups and feature names, enough to rebuild
the model without the dataset). Saves are asynchronous; Orbax writes each checkpoint
under a temporary name and renames it when complete, so a save killed midway leaves no
checkpoint. The latest ``keep`` checkpoints are kept, and the ``keep_best`` with the
lowest validation loss among those saved at evaluation steps.

Integrity: once Orbax has finalised a step, ``<step>/checksums.json`` records the size and
SHA-256 of every file in it (`seal`). Everything that reads a checkpoint verifies it first
(`verify_step`): resuming sets a damaged step aside and takes the previous one; export,
fine-tuning and `morpheus_jax.load` refuse it with one line naming the damaged file. A step
without checksums (written by morpheus-jax ≤ 0.2, or finalised moments before a kill) is
read unverified.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from morpheus_jax.core import log
from morpheus_jax.core.atomic import sha256_file, write_json
from morpheus_jax.core.errors import CheckpointError, CheckpointNotFound, ResourceError
from morpheus_jax.core.spec import ModelSpec


CHECKSUMS = "checksums.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def seal(step_dir: str | Path) -> None:
    """Write ``checksums.json``: size and SHA-256 of every file of a finalised step."""
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, sha256_file(p)]
             for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != CHECKSUMS}
    write_json(step_dir / CHECKSUMS, {"algorithm": "sha256", "files": files})


def verify_step(step_dir: str | Path) -> str | None:
    """What is damaged in a checkpoint step (a missing, truncated or altered file, naming it),
    or None when it verifies or has no checksums to verify against."""
    step_dir = Path(step_dir)
    path = step_dir / CHECKSUMS
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        items = [(name, int(size), str(digest)) for name, (size, digest) in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{path}: unreadable ({type(e).__name__})"
    for name, size, digest in items:
        p = step_dir / name
        if not p.is_file():
            return f"{p}: missing"
        if p.stat().st_size != size:
            return f"{p}: {p.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
        if sha256_file(p) != digest:
            return f"{p}: checksum mismatch (the file changed after it was saved)"
    return None


def check_step(step_dir: str | Path) -> None:
    """`verify_step`, raising `CheckpointError` naming the damaged file."""
    problem = verify_step(step_dir)
    if problem:
        raise CheckpointError(f"{problem}; the checkpoint {step_dir} is damaged (use an earlier step)")


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
        self._unsealed: list[int] = []
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
        self.manager.wait_until_finished()      # Orbax would wait here too: one save in flight at a time
        self.seal_finished()
        self._check_room(step, state)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        if saved:
            self._unsealed.append(step)
        return saved

    def _check_room(self, step: int, state: dict) -> None:
        """Refuse a save the disk cannot hold, before Orbax starts writing (a write that runs
        out midway fails inside Orbax's threads, noisily). The size expected is the newest
        checkpoint's on disk, else the state's bytes, with a margin; older checkpoints are
        removed only after a new one is complete, so the whole size must be free. Every
        process checks and they agree (a save is collective)."""
        needed = _tree_bytes(self.directory / str(self.steps()[-1])) if self.steps() else 0
        if not needed:
            needed = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
        needed = int(needed * 1.1) + (1 << 20)
        free = shutil.disk_usage(self.directory).free
        short = free < needed
        failed = _failed_processes(short)
        if failed:
            where = f"{self.directory}" if short else f"the checkpoint folder of process(es) {failed}"
            raise ResourceError(
                f"{where}: no space left for the checkpoint of step {step} (about {needed / 2**20:.1f} MB needed, "
                f"{free / 2**20:.1f} MB free); the checkpoints saved before are intact: free disk space, then rerun "
                "to resume")

    def seal_finished(self) -> None:
        """Write the checksums of the steps whose (asynchronous) save has finished (process 0)."""
        if not self._unsealed or self.manager.is_saving_in_progress():
            return
        steps, self._unsealed = self._unsealed, []
        if jax.process_index() != 0:
            return
        for step in steps:
            step_dir = self.directory / str(step)
            if step_dir.is_dir():               # not already removed by the preservation policy
                seal(step_dir)

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

    def _problem(self, step: int, data_iter) -> str | None:
        """Why ``step`` cannot be resumed from as it is on disk (a damaged file, named), if so."""
        step_dir = self.directory / str(step)
        problem = verify_step(step_dir)
        if problem:
            return problem
        try:
            read_spec(step_dir)
        except CheckpointError as e:
            return str(e)
        path = self._data_path(step)
        if data_iter is not None and path.exists():
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as e:
                return f"{path}: {type(e).__name__}"
        return None

    def restore_latest(self, abstract_state: dict, data_iter=None, check=None) -> tuple[int, dict, bool] | None:
        """The newest checkpoint that verifies and restores; damaged ones (a file that fails its
        checksum, an unreadable spec or data-iterator state) are set aside with a warning.
        ``check(step_dir)`` may raise to refuse a checkpoint outright (an incompatible config).
        Returns (step, state, data restored) or None.

        In a multi-process job each process has its own data-iterator state file, so one
        may be damaged where the others are not: the processes first agree that every one
        of them can read its step, or they would resume from different steps. (Orbax's
        restore of the arrays is itself collective: a failure there is everyone's.)
        Skipped checkpoints are renamed ``<step>.damaged`` (kept for inspection), so the
        run can save those steps again. A step that passes its checksums but does not
        restore is not damaged: that is an error (the run's state has another structure)."""
        for step in reversed(self.steps()):
            step_dir = self.directory / str(step)
            problem = self._problem(step, data_iter)
            failed = _failed_processes(problem is not None)
            if failed:
                self._set_aside(step, problem or f"unreadable in process(es) {', '.join(map(str, failed))}")
                continue
            if check is not None:
                check(step_dir)
            verified = (step_dir / CHECKSUMS).exists()
            try:
                state, data_ok = self.restore(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 — unverified: any failure to read means "damaged"
                if verified:
                    raise CheckpointError(f"{step_dir}: its files verify but it does not restore into this run's "
                                          f"state ({type(e).__name__}: {str(e).splitlines()[0][:200]}); was it "
                                          "written with another optimizer or train config?") from e
                self._set_aside(step, f"{type(e).__name__}: {str(e)[:200]}")
                continue
            return step, state, data_ok
        return None

    def _set_aside(self, step: int, why: str) -> None:
        """Warn, rename ``<step>`` to ``<step>.damaged`` (process 0; every process calls
        this for the same steps) and drop it from the manager's step list."""
        src = self.directory / str(step)
        log.warning(f"checkpoint {src} is damaged ({why}); setting it aside and trying the previous one")
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
        self.seal_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


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


class _NoItemMetadataNote(logging.Filter):
    """Orbax logs "Metadata file does not exist: <item>/_CHECKPOINT_METADATA" when a single
    item of a manager's step is read (that file lives one level up, in the step): not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Metadata file does not exist")


def restore_params(step_dir: str | Path) -> dict[str, np.ndarray]:
    """Parameters only (``{name: array}``, host NumPy) from a checkpoint step folder; the
    optimizer state and the rest of the train state are not read (a partial restore)."""
    path = Path(step_dir).resolve() / "state"
    quiet = _NoItemMetadataNote()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return _restore_params(path)
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _restore_params(path: Path) -> dict[str, np.ndarray]:
    with ocp.PyTreeCheckpointer() as reader:
        tree = reader.metadata(path).item_metadata.tree
        names = list(tree["params"])
        item = {"params": {n: np.zeros((), np.float32) for n in names}}
        args = {"params": {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names}}
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                     partial_restore=True))
    return dict(restored["params"])
