"""`morpheus synth`, `prepare` and `inspect`: thin shells over `morpheus_jax.data`."""

from __future__ import annotations

import shlex
from pathlib import Path

from morpheus_jax.cli.common import modality_paths
from morpheus_jax.core.errors import ConfigError, DatasetError


def cmd_synth(args) -> int:
    if args.format == "tcga-public":
        return _synth_tcga_public(args)
    if args.methylation_probes is not None:
        raise ConfigError("--methylation-probes only applies to --format tcga-public")
    from morpheus_jax.data.synth import write_synthetic_cohort  # lazy: start-up time
    info = write_synthetic_cohort(args.out_dir, n_patients=500 if args.patients is None else args.patients,
                                  seed=args.seed, feature_dim=args.feature_dim,
                                  mean_patches_per_slide=args.patches_per_slide, overwrite=args.overwrite)
    print({k: v for k, v in info.items() if not isinstance(v, (dict, list)) or k == "counts"})
    return 0


def _synth_tcga_public(args) -> int:
    from morpheus_jax.data.tcga.synth import write_public_download  # lazy: start-up time
    info = write_public_download(args.out_dir, n_patients=120 if args.patients is None else args.patients,
                                 seed=args.seed, feature_dim=args.feature_dim,
                                 mean_patches_per_slide=args.patches_per_slide,
                                 methylation_probes=args.methylation_probes, overwrite=args.overwrite)
    print(f"wrote a synthetic public TCGA download of {info['n_patients']} patients "
          f"({', '.join(info['projects'])}) to {info['out_dir']}; planted edge cases: {info['truth_json']}")
    print("build a raw cohort from it with:")
    print("  morpheus tcga build OUT_BUILD " + shlex.join(info["build_args"]))
    return 0


def cmd_prepare(args) -> int:
    from morpheus_jax.core.modality import read_spec_file  # lazy: start-up time
    from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare, summary  # lazy: start-up time
    opts = PrepareOptions(records_per_shard=args.records_per_shard, patch_dtype=args.patch_dtype, workers=args.workers,
                          chunk_rows=args.chunk_rows, wsi_dim=args.wsi_dim, seed=args.seed, strict=args.strict,
                          allow_missing_modalities=args.allow_missing_modalities, overwrite=args.overwrite,
                          max_skipped=args.max_skipped, progress=not args.no_progress,
                          modality_specs=read_spec_file(args.modality_spec) if args.modality_spec else {})
    if args.raw:
        cohort = RawCohort.from_dir(args.raw)
    else:
        needed = {"--metadata": args.metadata, "--features-dir": args.features_dir, "--omics": args.omics,
                  "--mapping": args.mapping}
        missing = [k for k, v in needed.items() if not v]
        if missing:
            raise ConfigError(f"give --raw DIR or all of {', '.join(missing)}")
        cohort = RawCohort(Path(args.metadata), Path(args.features_dir), modality_paths(args.omics, "--omics"),
                           modality_paths(args.mapping, "--mapping"))
    manifest = prepare(cohort, args.out, opts)
    print(summary(manifest))
    print(f"wrote {args.out} in {manifest.seconds} s")
    return 0


def cmd_inspect(args) -> int:
    from morpheus_jax.data import records  # lazy: start-up time
    from morpheus_jax.data.prepare import summary  # lazy: start-up time
    manifest = records.load_manifest(args.dataset, check_files=False)
    print(summary(manifest))
    problems = (records.file_problems(args.dataset, manifest) if args.no_verify
                else records.verify_dataset(args.dataset, manifest))
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:4])})" if len(problems) > 1 else ""
        raise DatasetError(f"{problems[0]}{more}; the dataset is damaged (`morpheus prepare --overwrite` rewrites it)")
    if not args.no_verify:
        print(f"checksums: {len(manifest.shards)} shards verified")
    return 0


def register(sub) -> None:
    """Add ``synth``, ``prepare`` and ``inspect`` to the ``morpheus`` subcommands."""
    s = sub.add_parser("synth", help="write a synthetic cohort in the raw TCGA file layout (or as public downloads)",
                       description="Write a synthetic cohort (metadata.csv, features/**.h5, omics/*.csv, "
                                   "mappings/*.json) whose modalities share latent patient factors; with "
                                   "--format tcga-public, the same cohort as the public TCGA downloads (Xena "
                                   "matrices, GDC files and sample sheets, clinical.tsv, …) that "
                                   "`morpheus tcga build` reads, with truth.json naming its planted edge cases.")
    s.add_argument("out_dir", help="output folder (must be empty or absent)")
    s.add_argument("--format", choices=["raw", "tcga-public"], default="raw",
                   help="raw: the layout `prepare --raw` reads (default); tcga-public: public TCGA download files")
    s.add_argument("--patients", type=int, default=None,
                   help="number of patients (default 500 for raw, 120 for tcga-public)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    s.add_argument("--feature-dim", type=int, default=1536, help="patch feature dimension (default 1536, UNI2-h)")
    s.add_argument("--patches-per-slide", type=int, default=300, help="mean patches per slide (default 300)")
    s.add_argument("--methylation-probes", type=int, default=None, metavar="K",
                   help="tcga-public only: pad each HM450 methylation file to K lines (485577: full-size files, "
                        "for benchmarks); default: only the probes that carry signal")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty out_dir")
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("prepare", help="validate a raw cohort and write the sharded training records",
                       description="Raw TCGA-layout files → a prepared dataset (ArrayRecord omics/metadata "
                                   "shards, zarr3 patch arrays, manifest.json).")
    s.add_argument("--raw", help="a raw cohort folder in the synth layout (replaces the four flags below)")
    s.add_argument("--metadata", help="metadata CSV (submitter_id, project_id, split, WSI, task columns)")
    s.add_argument("--features-dir", help="folder the WSI column's slide paths are relative to")
    s.add_argument("--omics", nargs="+", metavar="M=CSV", help="omics CSVs by modality name, e.g. rna=rna.csv dnam=dnam.csv cnv=cnv.csv protein=rppa.csv")
    s.add_argument("--mapping", nargs="+", metavar="M=JSON", help="group mappings, e.g. rna=rna.json …")
    s.add_argument("--modality-spec", metavar="FILE",
                   help="YAML {modality: {fill, transform, min, max, value}} for modalities beyond rna, dnam, cnv "
                        "(or to change theirs); transforms: identity, log10(cn/2+1), log2(x+1), log1p")
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
    s.add_argument("--max-skipped", type=float, default=0.5, metavar="FRACTION",
                   help="fail when more than this fraction of the metadata's patients would be skipped (no slide, "
                        "no split, missing omics); default 0.5")
    s.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are also off when stderr is not a terminal)")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("inspect", help="summarise a prepared dataset and verify its checksums",
                       description="Print patients per split, modalities, groups and patches; verify every "
                                   "shard's size and SHA-256 against the manifest (a damaged shard: one line "
                                   "naming it, exit 2).")
    s.add_argument("dataset", help="prepared dataset folder")
    s.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    s.set_defaults(fn=cmd_inspect)
