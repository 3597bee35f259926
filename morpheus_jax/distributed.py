"""Multi-process start-up (JAX's multi-controller runtime).

One process per host (TPU VM worker, SLURM task, or a local process from
``launch/local.sh``); every process runs the same program and JAX stitches their devices
into one mesh. `initialize` must run before anything touches a device.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Iterator

import jax


def detect() -> str | None:
    """The cluster environment JAX can initialise from by itself, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the job's processes. Explicit arguments win (all three are needed); otherwise
    TPU VM slices and SLURM are auto-detected; otherwise single-process. Returns whether
    ``jax.distributed`` was initialised. CPU-only jobs use gloo collectives."""
    explicit = [coordinator, num_processes, process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or os.environ.get("MORPHEUS_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:
        if num_processes <= 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if detect() is not None:
        jax.distributed.initialize()
        return True
    return False


@contextlib.contextmanager
def fail_fast(prefix: str, user_errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """In a multi-process job, a process whose work raises exits at once, without JAX's
    shutdown barrier.

    Exiting normally would wait up to five minutes at that barrier for peers that are
    themselves blocked in a collective waiting for this process: the job would hang, then
    die with a coordination-service abort that hides the real error. Here the error is
    printed (one line ``PREFIX: error: …`` for ``user_errors``, else a traceback) and the
    process leaves with ``os._exit``; the others stop as soon as the coordination service
    notices (at once if this is process 0, which hosts it; within the heartbeat timeout
    otherwise; a launcher that kills the rest on the first failure, as ``launch/local.sh``
    and ``srun --kill-on-bad-exit`` do, is quicker). Single-process runs are unaffected:
    exceptions propagate."""
    if jax.process_count() == 1:
        yield
        return
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - every failure must leave the same way
        if isinstance(e, user_errors):
            print(f"{prefix}: error: {e}", file=sys.stderr)
            code = 2
        elif isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else 1
        else:
            traceback.print_exc()
            code = 1
        print(f"{prefix}: process {jax.process_index()} of {jax.process_count()} failed; leaving the job",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
