"""The one training loop: a compiled step driven over a batch stream, with hooks.

`Trainer.run(state, batches)` feeds batches to the step until ``steps``; every ``log_every``
steps (and at evaluation and stop steps) it reads the step's metrics back and
hands a row to ``on_row``; every ``eval_every`` steps it calls ``evaluate``; every
``checkpoint_every`` steps, at the end and on a stop it calls ``save``. Pretraining and
fine-tuning are two uses of it (`morpheus_jax.apps`).

SIGTERM/SIGINT: the current step finishes, ``save`` runs, and `run` returns with
``stopped_by`` set. In a multi-process job every process must stop at the same step, so the
signal is agreed by an all-gather — a host-blocking collective, so it runs only every
``preemption_every`` steps and at steps that read metrics back anyway (a process signalled
between two checks stops at the next one). A single process checks after every step.

A non-finite loss or gradient norm stops the run with `TrainingDiverged` naming the step:
the metrics are read back (and checked) before every save, so no diverged state is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from morpheus_jax.core import log
from morpheus_jax.core.errors import TrainingDiverged


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks after steps."""

    def __init__(self, every: int = 10):
        self.signal: int | None = None
        self.every = max(1, int(every))
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def poll(self, step: int, syncing: bool) -> int | None:
        """The signal to stop on at ``step``, the same in every process. ``syncing``: the
        loop reads results back at this step anyway, so agreeing costs nothing extra."""
        if jax.process_count() == 1:
            return self.signal
        if not syncing and step % self.every:
            return None
        flags = multihost_utils.process_allgather(np.int32(self.signal or 0))
        return int(np.max(flags)) or None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred(what: str):
    """While ``what`` runs (a run's last checkpoint being written, its workers stopping), a
    SIGTERM/SIGINT (a second Ctrl-C) is answered with one line and waits for it to finish:
    interrupting it would lose the checkpoint the first signal asked for. SIGKILL still
    stops everything (the checkpoints before are intact)."""
    def handle(signum, frame):
        log.warning(f"{signal.Signals(signum).name}: already stopping; {what} first")

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, handle)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _check_finite(step: int, pending: list, skipped_before: int, max_in_a_row: int) -> int:
    """A non-finite loss or gradient norm among the steps since the last check stops the run,
    naming the first such step (the last checkpoint saved before it is kept). Steps whose
    update was skipped (``train.nonfinite=skip``: metric ``skipped``) are counted instead and
    stop the run only after ``max_in_a_row`` in a row. Returns the skipped steps in a row."""
    values = jax.device_get([(m["loss"], m.get("grad_norm", 0.0), m.get("skipped", 0.0)) for m in pending])
    in_a_row = skipped_before
    for i, (loss, grad_norm, skipped) in enumerate(values):
        at = step - len(pending) + 1 + i
        in_a_row = in_a_row + 1 if skipped else 0
        if skipped and in_a_row >= max_in_a_row:
            raise TrainingDiverged(f"steps {at - in_a_row + 1}-{at}: {in_a_row} updates in a row skipped (non-finite "
                                   "loss or gradient norm, train.nonfinite=skip); the run stopped, its checkpoints "
                                   "hold no skipped update (lower train.learning_rate or set train.grad_clip_norm)")
        if not skipped and not (np.isfinite(loss) and np.isfinite(grad_norm)):
            raise TrainingDiverged(f"step {at}: the loss is {float(loss)} and the gradient norm {float(grad_norm)}; "
                                   "the run stopped there, its last checkpoint is the one before (lower "
                                   "train.learning_rate, set train.grad_clip_norm, or train.nonfinite=skip)")
    if any(v[2] for v in values):
        log.warning(f"step {step}: {int(sum(v[2] for v in values))} of the last {len(values)} updates skipped "
                    "(non-finite loss or gradient norm)")
    return in_a_row


@dataclasses.dataclass
class TrainResult:
    state: Any
    step: int
    last_eval: dict                     # the latest evaluation row ({} if none)
    stopped_by: str | None              # "SIGTERM" / "SIGINT", or None when all steps ran


@dataclasses.dataclass
class Trainer:
    """Hooks: ``evaluate(state) → {name: value}``; ``on_row(row)`` receives every metrics row
    (``step``, the step's metrics, ``samples_per_s`` and ``extra_row``'s fields, evaluation
    results on evaluation steps); ``save(step, state, eval_row_or_None)``."""

    step_fn: Callable                   # (state, device batch) -> (state, metrics)
    steps: int
    samples_per_step: int
    to_device: Callable = lambda batch: batch
    log_every: int = 10
    eval_every: int = 0
    evaluate: Callable | None = None
    on_row: Callable | None = None
    extra_row: Callable | None = None   # (row) -> more fields (throughput, MFU)
    checkpoint_every: int = 0
    save: Callable | None = None
    preemption_every: int = 10
    max_skipped_in_a_row: int = 20      # train.nonfinite=skip: skipped updates in a row that stop the run
    progress: bool = False
    desc: str = "train"

    def _due(self, every: int, step: int) -> bool:
        return every > 0 and (step % every == 0 or step == self.steps)

    def run(self, state, batches: Iterator[dict], start: int = 0, last_eval: dict | None = None) -> TrainResult:
        last_eval = dict(last_eval or {})
        bar = tqdm(total=self.steps, initial=start, desc=self.desc, unit="step", dynamic_ncols=True,
                   disable=log.progress_off(self.progress and jax.process_index() == 0))
        pending, t_window, step, stopped, in_a_row, checked = [], time.perf_counter(), start, None, 0, 0
        with Preemption(self.preemption_every) as pre:
            while step < self.steps:
                state, metrics = self.step_fn(state, self.to_device(next(batches)))
                step += 1
                pending.append(metrics)
                if len(pending) > 2:
                    # Bound dispatch run-ahead (each queued step pins its input batch on device).
                    jax.block_until_ready(pending[-3]["loss"])
                is_log = self._due(self.log_every, step)
                is_eval = self.evaluate is not None and self._due(self.eval_every, step)
                is_save = self.save is not None and (self._due(self.checkpoint_every, step) or step == self.steps)
                stop = pre.poll(step, syncing=is_log or is_eval)
                if is_save or stop or is_log or is_eval:   # never save a diverged state
                    in_a_row = _check_finite(step, pending[checked:], in_a_row, self.max_skipped_in_a_row)
                    checked = len(pending)
                if is_log or is_eval or stop:
                    row = self._row(step, pending, t_window)
                    if is_eval:
                        last_eval = {"step": step, **self.evaluate(state)}
                        row.update(last_eval)
                    if self.on_row is not None:
                        self.on_row(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}",
                                    **({"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}))
                    pending, checked, t_window = [], 0, time.perf_counter()
                bar.update(1)
                if is_save or (self.save is not None and stop):
                    self.save(step, state, last_eval if last_eval.get("step") == step else None)
                if stop:
                    stopped = signal.Signals(stop).name
                    break
        bar.close()
        return TrainResult(state, step, last_eval, stopped)

    def _row(self, step: int, pending: list, t_window: float) -> dict:
        """The metrics row of ``step`` (its metrics; throughput over the steps since the last row)."""
        values = jax.device_get(pending[-1])
        elapsed = time.perf_counter() - t_window
        row = {"step": step, **{k: float(v) for k, v in values.items()},
               "samples_per_s": len(pending) * self.samples_per_step / max(elapsed, 1e-9)}
        if self.extra_row is not None:
            row.update(self.extra_row(row))
        return row
