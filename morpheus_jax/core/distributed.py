"""Multi-process start-up (JAX's multi-controller runtime).

One process per host (TPU VM worker, SLURM task, or a local process from
``launch/local.sh``); every process runs the same program and JAX stitches their devices
into one mesh. `initialize` must run before anything touches a device.
"""

from __future__ import annotations

import os
import sys
import traceback

import jax

from morpheus_jax.core.errors import ConfigError


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
        given = [f for f, v in zip(("--coordinator", "--num-processes", "--process-id"), explicit) if v is not None]
        raise ConfigError(f"--coordinator, --num-processes and --process-id go together (got only {', '.join(given)})")
    if coordinator is not None and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise ConfigError(f"--num-processes {num_processes} --process-id {process_id}: need at least one process "
                          "and a process id in 0 … num-processes-1")
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


def leave_job(code: int, prefix: str, *, print_traceback: bool = False) -> None:
    """End this process of a failed multi-process job now (``os._exit(code)``), without
    JAX's shutdown barrier; does nothing outside ``jax.distributed``.

    Exiting normally would wait up to five minutes at that barrier for peers that are
    themselves blocked in a collective waiting for this process: the job would hang, then
    die with a coordination-service abort that hides the real error. After ``os._exit``
    the others stop as soon as the coordination service notices (at once if this is
    process 0, which hosts it; within the heartbeat timeout otherwise), or sooner when the
    launcher kills the rest on the first failure (``launch/local.sh``, ``srun
    --kill-on-bad-exit``). The caller has printed the error, or it is the exception being
    handled (``print_traceback``)."""
    if not jax.distributed.is_initialized():
        return
    if print_traceback:
        traceback.print_exc()
    print(f"{prefix}: process {jax.process_index()} of {jax.process_count()} failed; leaving the job",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
