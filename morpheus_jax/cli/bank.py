"""`morpheus bank plan`: a thin shell over `morpheus_jax.engine.bank.plan_report`."""

from __future__ import annotations

import json

from morpheus_jax.cli.common import DATASET_HELP, add_config_flags


def cmd_plan(args) -> int:
    from morpheus_jax.core.config import load_config  # lazy: start-up time
    from morpheus_jax.engine.bank import plan_report  # lazy: start-up time
    cfg = load_config(args.config, [*args.overrides, f"data.dir={args.dataset}"])
    report = plan_report(cfg, args.devices, args.memory_gb, args.dtype)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    gib = 1 / 2**30
    print(f"{report['patients']} training patients in {args.devices} banks of {report['bank_rows_per_device']} rows "
          f"(largest bag {report['max_bag']} patches), {args.dtype}")
    print(f"per device: bank {report['bank_bytes_per_device'] * gib:.3f} GiB, train state "
          f"{report['state_bytes'] * gib:.3f} GiB, step (arguments + temporaries, compiled on "
          f"{report['step_compiled_on']}) {(report['step_bytes'] or 0) * gib:.3f} GiB")
    print(f"{'fits' if report['fits'] else 'does not fit'}: {report['reason']}")
    return 0


def register(sub) -> None:
    """Add ``bank plan`` to the ``morpheus`` subcommands."""
    b = sub.add_parser("bank", help="plan a device-resident patch bank (data.patch_source=device)",
                       description="Size the device-resident patch bank of data.patch_source=device.")
    bsub = b.add_subparsers(dest="bank_command", metavar="COMMAND", required=True, parser_class=type(b),
                            help="plan: bank bytes per device and whether it fits")
    p = bsub.add_parser("plan", help="bank bytes per device, headroom after the model's state and step, fits or not",
                        description="Deal the dataset's training patients to --devices data-parallel banks and "
                                    "report bank bytes per device, the train state's and the step's bytes (the step "
                                    "compiled here for one device's rows) and the headroom in --memory-gb.")
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument("--devices", type=int, required=True, help="data-parallel devices (one bank each)")
    p.add_argument("--memory-gb", type=float, required=True, help="memory of one device in GB (1e9 bytes)")
    p.add_argument("--dtype", default="float16", choices=["float16", "int8"],
                   help="bank dtype (int8: per-patch absmax scale; default float16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_config_flags(p, "train.global_batch_size=32 data.num_patches=1024")
    p.set_defaults(fn=cmd_plan)
