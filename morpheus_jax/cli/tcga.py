"""`morpheus tcga build`: a thin shell over `morpheus_jax.data.tcga.build`."""

from __future__ import annotations

from pathlib import Path

from morpheus_jax.cli.common import modality_paths


def cmd_build(args) -> int:
    from morpheus_jax.data.tcga.build import BuildOptions, build  # lazy: start-up time
    opts = BuildOptions(
        features=Path(args.features), rna=[Path(p) for p in args.rna], cnv=Path(args.cnv), dnam=Path(args.dnam),
        sample_sheets=[Path(p) for p in args.sample_sheet], clinical=Path(args.clinical),
        probe_manifest=Path(args.probe_manifest), gene_sets=Path(args.gene_sets) if args.gene_sets else None,
        mappings=modality_paths(args.mapping, "--mapping"),
        gene_types=Path(args.gene_types) if args.gene_types else None, cnv_features=args.cnv_features,
        dnam_features=args.dnam_features, cnv_pipeline=args.cnv_pipeline, seed=args.seed,
        fine_tune_fraction=args.fine_tune_fraction, val_fraction=args.val_fraction, workers=args.workers,
        progress=not args.no_progress)
    summary = build(args.out, opts)
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    print(f"{summary['patients']} patients ({splits})")
    for m in ("rna", "dnam", "cnv"):
        s = summary[m]
        print(f"  {m}: {s['patients']} patients, {s['features']} features in {s['groups']} groups")
    print(f"wrote {args.out} (provenance.json says what was chosen and why); next: "
          f"morpheus prepare --raw {args.out} --out DATASET")
    return 0


def register(sub) -> None:
    """Add ``tcga build`` to the ``morpheus`` subcommands."""
    t = sub.add_parser("tcga", help="turn public TCGA downloads into the raw layout (the authors' cohort rules)",
                       description="Public TCGA downloads → the raw layout `morpheus prepare --raw` reads.")
    tsub = t.add_subparsers(dest="tcga_command", metavar="COMMAND", required=True, parser_class=type(t),
                            help="build: the raw layout from the downloads")
    b = tsub.add_parser("build", help="build OUT (metadata.csv, omics/, mappings/, features/ links, provenance.json)",
                        description="Offline and reproducible: UNI2-h slide features, UCSC Xena RNA matrices, GDC "
                                    "copy-number and methylation files with their sample sheets and a clinical table "
                                    "→ the raw layout, by the authors' rules (README: Pretraining on TCGA).")
    b.add_argument("out", help="output folder (absent, empty, or an earlier build; written beside and renamed)")
    b.add_argument("--features", required=True, help="folder searched recursively for slide .h5 files (UNI2-h)")
    b.add_argument("--rna", required=True, nargs="+", metavar="FILE",
                   help="Xena HiSeqV2_PANCAN matrices (gzipped or not), one per project")
    b.add_argument("--cnv", required=True, metavar="DIR", help="gdc-client folder of gene-level copy-number files")
    b.add_argument("--dnam", required=True, metavar="DIR", help="gdc-client folder of methylation beta files")
    b.add_argument("--sample-sheet", required=True, nargs="+", metavar="TSV",
                   help="GDC sample sheets describing those files (old or 2025 layout; several allowed)")
    b.add_argument("--clinical", required=True, metavar="FILE",
                   help="CSV/TSV with a patient id column (submitter_id, case_submitter_id, cases.submitter_id or "
                        "case_id), optional project_id and label columns (copied into metadata.csv)")
    b.add_argument("--gene-sets", metavar="GMT_OR_CSV", help="RNA groups: gene sets (GMT, or a genes × sets 0/1 table)")
    b.add_argument("--mapping", nargs="+", metavar="M=JSON",
                   help="given groups instead of derived ones, e.g. rna=rna.json cnv=cnv.json dnam=dnam.json "
                        "(features the data lacks are reported and dropped)")
    b.add_argument("--probe-manifest", required=True, metavar="TSV",
                   help="methylation probe positions (InfiniumAnnotation HM450.hg38.manifest.gencode.v36.tsv)")
    b.add_argument("--gene-types", metavar="FILE", help="a GDC STAR counts file: keep protein-coding CNV genes only")
    b.add_argument("--cnv-features", type=int, default=6750, help="CNV genes kept by standard deviation (default 6750)")
    b.add_argument("--dnam-features", type=int, default=7150, help="DNAm probes kept by standard deviation (default 7150)")
    b.add_argument("--cnv-pipeline", default="ascat2", choices=["ascat2", "ascat3", "absolute"],
                   help="which copy-number files to use (default ascat2, as the authors)")
    b.add_argument("--seed", type=int, default=42, help="random_state of both splits (default 42)")
    b.add_argument("--fine-tune-fraction", type=float, default=0.4,
                   help="share of patients held out for fine-tuning, stratified by project (default 0.4)")
    b.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the rest held out as val-pretrain (default 0.05)")
    b.add_argument("--workers", type=int, default=1, help="processes reading files in parallel (default 1)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars (also off when stderr is no terminal)")
    b.set_defaults(fn=cmd_build)
