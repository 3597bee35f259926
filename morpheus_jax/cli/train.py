"""`morpheus pretrain`: a thin shell over `morpheus_jax.apps.pretrain`."""

from __future__ import annotations

from morpheus_jax.cli.common import add_config_flags


def cmd_pretrain(args) -> int:
    from morpheus_jax.core.config import load_config  # lazy: start-up time
    cfg = load_config(args.config, args.overrides)
    from morpheus_jax.core import distributed  # lazy: start-up time
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from morpheus_jax.apps.pretrain import pretrain  # lazy: start-up time
    report = pretrain(cfg, progress=not args.no_progress)
    return 0 if report else 1


def register(sub) -> None:
    """Add ``pretrain`` to the ``morpheus`` subcommands."""
    s = sub.add_parser("pretrain", help="pretrain MORPHEUS (no arguments: the demo)",
                       description="Pretrain by masked omics modelling. With no arguments: configs/demo.yaml, "
                                   "which synthesises and prepares a demo cohort if absent. Rerunning with the "
                                   "same run_dir resumes from its latest checkpoint.")
    add_config_flags(s, "train.steps=100 model.hidden_size=64")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--coordinator", help="multi-process: address host:port of process 0 (TPU VMs and SLURM are "
                                         "detected without it)")
    s.add_argument("--num-processes", type=int, help="multi-process: number of processes in the job")
    s.add_argument("--process-id", type=int, help="multi-process: this process's index, 0 … num-processes-1")
    s.set_defaults(fn=cmd_pretrain)
