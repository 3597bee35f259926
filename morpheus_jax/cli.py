"""The ``morpheus`` command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def modality_paths(values: list[str] | None, flag: str) -> dict[str, Path]:
    """``["rna=a.csv", …]`` → ``{"rna": Path("a.csv"), …}`` (shared by the subcommands)."""
    from morpheus_jax.config import ConfigError
    out = {}
    for item in values or []:
        if "=" not in item:
            raise ConfigError(f"{flag} expects MODALITY=PATH, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = Path(v)
    return out


CKPT_HELP = "a run folder (its latest checkpoint), a checkpoints folder or one checkpoint step folder"


def user_errors(*extra: type[Exception]) -> tuple[type[Exception], ...]:
    """Exceptions that report bad input (config, files, datasets, checkpoints): printed as
    one line ``morpheus COMMAND: error: …`` with exit status 2 instead of a traceback.
    Subcommands that validate with ``ValueError`` pass it as ``extra``."""
    from morpheus_jax.config import ConfigError
    from morpheus_jax.data.prepare import PrepareError
    from morpheus_jax.data.records import DatasetError

    # FileNotFoundError covers export.checkpoints.CheckpointNotFound.
    return (ConfigError, PrepareError, DatasetError, FileNotFoundError, FileExistsError, *extra)


def add_config_flags(s: argparse.ArgumentParser, example: str) -> None:
    """``--config`` and the positional dotted overrides, as every config-driven command takes them."""
    s.add_argument("--config", help="YAML config file or a name in configs/ (default: demo)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted config overrides, e.g. {example}")


def cmd_synth(args) -> int:
    from morpheus_jax.data.synth import write_synthetic_cohort
    info = write_synthetic_cohort(args.out_dir, n_patients=args.patients, seed=args.seed,
                                  feature_dim=args.feature_dim, mean_patches_per_slide=args.patches_per_slide,
                                  overwrite=args.overwrite)
    print({k: v for k, v in info.items() if not isinstance(v, (dict, list)) or k == "counts"})
    return 0


def cmd_prepare(args) -> int:
    from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare, summary
    if args.raw:
        cohort = RawCohort.from_dir(args.raw)
    else:
        needed = {"--metadata": args.metadata, "--features-dir": args.features_dir, "--omics": args.omics,
                  "--mapping": args.mapping}
        missing = [k for k, v in needed.items() if not v]
        if missing:
            raise SystemExit(f"morpheus prepare: error: give --raw DIR or all of {', '.join(missing)}")
        cohort = RawCohort(Path(args.metadata), Path(args.features_dir), modality_paths(args.omics, "--omics"),
                           modality_paths(args.mapping, "--mapping"))
    opts = PrepareOptions(records_per_shard=args.records_per_shard, patch_dtype=args.patch_dtype, workers=args.workers,
                          chunk_rows=args.chunk_rows, wsi_dim=args.wsi_dim, seed=args.seed, strict=args.strict,
                          allow_missing_modalities=args.allow_missing_modalities, overwrite=args.overwrite)
    manifest = prepare(cohort, args.out, opts)
    print(summary(manifest))
    print(f"wrote {args.out} in {manifest['seconds']} s")
    return 0


def cmd_inspect(args) -> int:
    from morpheus_jax.data import records
    from morpheus_jax.data.prepare import summary
    manifest = records.load_manifest(args.dataset)
    print(summary(manifest))
    if not args.no_verify:
        problems = records.verify_dataset(args.dataset, manifest)
        if problems:
            for p in problems:
                print(f"morpheus inspect: {p}", file=sys.stderr)
            return 1
        print(f"checksums: {len(manifest['shards'])} shards verified")
    return 0


def cmd_pretrain(args) -> int:
    from morpheus_jax.config import load_config
    cfg = load_config(args.config, args.overrides)
    from morpheus_jax import distributed
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from morpheus_jax.train.loop import pretrain
    report = pretrain(cfg, progress=not args.no_progress)
    return 0 if report else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="morpheus",
        description="MORPHEUS in JAX: masked omics modelling over H&E patch features, RNA, DNA methylation "
                    "and copy number. Subcommands run the data flow: synth → prepare → pretrain.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("synth", help="write a synthetic cohort in the raw TCGA file layout",
                       description="Write a synthetic cohort (metadata.csv, features/**.h5, omics/*.csv, "
                                   "mappings/*.json) whose modalities share latent patient factors.")
    s.add_argument("out_dir", help="output folder (must be empty or absent)")
    s.add_argument("--patients", type=int, default=500, help="number of patients (default 500)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    s.add_argument("--feature-dim", type=int, default=1536, help="patch feature dimension (default 1536, UNI2-h)")
    s.add_argument("--patches-per-slide", type=int, default=300, help="mean patches per slide (default 300)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty out_dir")
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("prepare", help="validate a raw cohort and write the sharded training records",
                       description="Raw TCGA-layout files → a prepared dataset (ArrayRecord omics/metadata "
                                   "shards, zarr3 patch arrays, manifest.json).")
    s.add_argument("--raw", help="a raw cohort folder in the synth layout (replaces the four flags below)")
    s.add_argument("--metadata", help="metadata CSV (submitter_id, project_id, split, WSI, task columns)")
    s.add_argument("--features-dir", help="folder the WSI column's slide paths are relative to")
    s.add_argument("--omics", nargs="+", metavar="M=CSV", help="omics CSVs, e.g. rna=rna.csv dnam=dnam.csv cnv=cnv.csv")
    s.add_argument("--mapping", nargs="+", metavar="M=JSON", help="group mappings, e.g. rna=rna.json …")
    s.add_argument("--out", required=True, help="output dataset folder")
    s.add_argument("--records-per-shard", type=int, default=128, help="patients per shard (default 128)")
    s.add_argument("--workers", type=int, default=1,
                   help="processes writing shards in parallel (default 1); rerunning an interrupted prepare "
                        "with the same inputs skips the shards already written and verified")
    s.add_argument("--patch-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="stored patch dtype (default float16)")
    s.add_argument("--chunk-rows", type=int, default=128, help="patch rows per zarr chunk (default 128)")
    s.add_argument("--wsi-dim", type=int, default=1536, help="expected patch feature dimension (default 1536)")
    s.add_argument("--seed", type=int, default=0, help="seed of the stored per-patient patch shuffle (default 0)")
    s.add_argument("--strict", action="store_true", help="a patient lacking a modality or a slide is an error")
    s.add_argument("--allow-missing-modalities", action="store_true",
                   help="keep patients with at least one omics modality (missing ones are always masked)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("inspect", help="summarise a prepared dataset and verify its checksums",
                       description="Print patients per split, modalities, groups and patches; verify every "
                                   "shard's SHA-256 against the manifest (exit 1 on mismatch).")
    s.add_argument("dataset", help="prepared dataset folder")
    s.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    s.set_defaults(fn=cmd_inspect)

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

    from morpheus_jax.eval.cli import register as register_downstream
    from morpheus_jax.export.cli import register as register_export
    from morpheus_jax.scaling.cli import register as register_scaling
    register_downstream(sub)
    register_export(sub)
    register_scaling(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except user_errors() as e:
        print(f"morpheus {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        _leave_failed_job(1, args.command, print_traceback=True)
        raise
    if code:
        _leave_failed_job(code, args.command)
    return code


def _leave_failed_job(code: int, command: str, *, print_traceback: bool = False) -> None:
    """In a multi-process job, a failed process leaves at once (`distributed.leave_job`)."""
    if "jax" in sys.modules:  # else JAX never started: not part of a job
        from morpheus_jax.distributed import leave_job
        leave_job(code, f"morpheus {command}", print_traceback=print_traceback)


if __name__ == "__main__":
    sys.exit(main())
