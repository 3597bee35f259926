"""`morpheus export` and `morpheus import-torch`: thin shells over `morpheus_jax.apps.export`.

The main parser adds them with ``register(subparsers)``.
"""

from __future__ import annotations

from morpheus_jax.cli.common import CKPT_HELP, modality_paths


def cmd_export(args) -> int:
    from morpheus_jax.apps.export import export_checkpoint  # lazy: start-up time

    mods = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else None
    path, side = export_checkpoint(args.checkpoint, args.out, encoder_only=args.encoder_only, modalities=mods,
                                   dtype=args.dtype, overwrite=args.overwrite)
    kind = "encoder only" if side["encoder_only"] else "full model"
    print(f"wrote {path} ({kind}, {side['dtype']}, step {side['step']}, modalities {','.join(side['modalities'])}, "
          f"{path.stat().st_size / 2**20:.1f} MiB) and {path.name}.json")
    return 0


def cmd_import(args) -> int:
    from morpheus_jax.apps.export import import_weights  # lazy: start-up time
    from morpheus_jax.data.prepare import read_mapping  # lazy: start-up time

    mappings = {m: read_mapping(p) for m, p in modality_paths(args.mapping, '--mapping').items()}
    mods = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else None
    step_dir = import_weights(args.file, args.out, mappings=mappings, num_heads=args.num_heads,
                              decoder_num_heads=args.decoder_num_heads, modalities=mods, config=args.config,
                              step=args.step, overwrite=args.overwrite)
    print(f"wrote checkpoint {step_dir}")
    return 0


def register(subparsers) -> None:
    """Add ``export`` and ``import-torch`` to the ``morpheus`` subcommands."""
    s = subparsers.add_parser(
        "export", help="export a checkpoint as a PyTorch state dict (the authors' layout) + sidecar JSON",
        description="Write a checkpoint's weights in the authors' PyTorch layout (keys and shapes of "
                    "MorpheusProto / MorpheusProtoEncoder, loadable with load_state_dict(strict=True)) and a "
                    "sidecar FILE.json with the config, modality order, group names and canonical feature names.")
    s.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    s.add_argument("--out", required=True,
                   help="output file; the suffix picks the format: .safetensors, or .pt / .pth "
                        "(torch.save of a state dict)")
    s.add_argument("--encoder-only", action="store_true",
                   help="keep only what a fine-tuning model (MorpheusProtoEncoder) loads: no decoders, no head")
    s.add_argument("--modalities", default=None,
                   help="with --encoder-only: comma-separated omics modalities whose tokenizers to keep "
                        "(e.g. rna for a WSI+RNA model; default: all of the checkpoint's)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stored parameter dtype (default float32; bfloat16 halves the file, import widens it back)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.set_defaults(fn=cmd_export)

    s = subparsers.add_parser(
        "import-torch", help="import a PyTorch state dict (ours or the authors') as a checkpoint",
        description="Read a MorpheusProto / MorpheusProtoEncoder state dict (.safetensors, .pt or .pth), infer the "
                    "sizes from its shapes, and write a checkpoint folder OUT/<step>/ that morpheus_jax.load and "
                    "morpheus export read. Group order and feature names come from --mapping (or from the "
                    "sidecar FILE.json of a morpheus export).")
    s.add_argument("file", help="state dict file (.safetensors, .pt or .pth); a sidecar FILE.json beside it "
                                "is used if present")
    s.add_argument("--mapping", nargs="+", metavar="M=JSON",
                   help="group mappings {group: [feature names]} per modality, e.g. rna=hallmarks.json "
                        "dnam=dnam.json cnv=cnv.json (required unless FILE.json provides them)")
    s.add_argument("--out", required=True, help="checkpoints folder to create (must be absent or empty)")
    s.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of the encoder (and decoders); shapes cannot tell "
                        "(default: the sidecar's, else 8 as in the paper)")
    s.add_argument("--decoder-num-heads", type=int, default=None,
                   help="attention heads of the decoders if they differ from --num-heads")
    s.add_argument("--modalities", default=None,
                   help="comma-separated model modality order, e.g. rna,dnam,cnv (default: the sidecar's, "
                        "else the order of --mapping, else rna,dnam,cnv)")
    s.add_argument("--config", default=None,
                   help="YAML config (or a name in configs/) for the settings shapes do not fix "
                        "(dropout, group_buckets, training); default: the sidecar's, else the built-in defaults")
    s.add_argument("--step", type=int, default=None,
                   help="step number to give the checkpoint (default: the sidecar's, else 0)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    s.set_defaults(fn=cmd_import)
