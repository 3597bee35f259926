"""`morpheus sweep` and `morpheus scaling {fit,forecast,flops}`: thin shells over `morpheus_jax.apps.scaling`.

The main parser adds them with ``register(subparsers)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from morpheus_jax.cli.common import add_config_flags
from morpheus_jax.core.atomic import write_json
from morpheus_jax.core.errors import ConfigError


def cmd_sweep(args) -> int:
    from morpheus_jax.apps.scaling import sweep as sw  # lazy: start-up time
    from morpheus_jax.apps.scaling.ladder import load_ladder, shell  # lazy: start-up time

    ladder = load_ladder(args.ladder, out=args.out, seeds=args.seeds)
    local = args.launcher == "local"
    rows = sw.plan(ladder, need_dataset=local and not args.dry_run)
    if args.only:
        unknown = set(args.only) - {r["run"].name for r in rows}
        if unknown:
            raise ConfigError(f"--only names runs not in the ladder: {sorted(unknown)}")
        rows = [r for r in rows if r["run"].name in args.only]
    print(sw.describe(ladder, rows))
    if local:
        if args.dry_run:
            return 0
        outcome = sw.run_local(ladder, rows, subprocesses=args.subprocess, progress=not args.no_progress)
        bad = {k: v for k, v in outcome.items() if v in ("failed", "stopped")}
        done = sum(v in ("done", "skipped") for v in outcome.values())
        print(f"sweep {ladder.name}: {done} of {len(rows)} runs done" + (f"; {bad}" if bad else ""))
        return 1 if bad else 0
    cmds = sw.remote_commands(args.launcher, ladder, rows, zone=args.zone, accelerator=args.accelerator)
    if args.dry_run or not args.submit:
        for cmd in cmds:
            print(shell(cmd))
        return 0
    return 1 if sw.submit(cmds) else 0


def _rows(args, exclude: Path | None = None) -> list[dict]:
    from morpheus_jax.apps.scaling import sweep as sw  # lazy: start-up time

    if bool(args.runs_dir) == bool(args.table):
        raise ConfigError("give a runs folder or --table FILE.csv (one of them)")
    rows = sw.collect(args.runs_dir, args.group_sizes, exclude) if args.runs_dir else sw.read_table(args.table)
    if args.params_column not in rows[0]:
        raise ConfigError(f"the table has no column {args.params_column!r}")
    return rows


def _kind(args) -> str:
    return "data-constrained" if args.data_constrained else "plain" if args.plain else "auto"


def _fit(args, rows, relation=None):
    """The study of ``rows`` and its report, warning (stderr) about every wider run that ends
    above a smaller one and, under the plain law, every run that repeats its data."""
    from morpheus_jax.apps.scaling import study as st  # lazy: start-up time
    from morpheus_jax.core import log  # lazy: start-up time

    study = st.fit_study(rows, kind=_kind(args), params_column=args.params_column, n_boot=args.bootstrap,
                         seed=args.seed, confidence=args.confidence, relation=relation)
    report = st.report(study, rows, args.params_column, args.confidence)
    for line in report["width_violations"]:
        log.warning(f"not monotone in width: {line} (an untuned learning rate or an unconverged run?)")
    for line in report["repeated_data"]:
        log.warning(f"repeated data: {line}; the plain law counts fresh samples (--data-constrained, a larger "
                    "cohort, or shorter runs)")
    return study, report


def _warn_past_ladder(kind: str, epochs: float | None, report: dict) -> None:
    from morpheus_jax.apps.scaling import study as st  # lazy: start-up time
    from morpheus_jax.core import log  # lazy: start-up time

    line = st.past_the_ladder(kind, epochs, report.get("ladder_epochs"), report.get("intervals", {}).get("r_star_d"))
    if line:
        log.warning(f"past the ladder: {line}")


def _law_text(study) -> str:
    law = study.law
    text = f"L(N, D) = {law.E:.4g} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f}"
    if study.kind == "data-constrained":
        text += f" with D' of R*_D = {law.r_star_d:.3g}" + (f", N' of R*_N = {law.r_star_n:.3g}"
                                                           if law.r_star_n is not None else "")
    return text


def _held_out(args) -> tuple[dict | None, list[dict]]:
    """The fit's rows, and ``--held-out RUN`` (a run folder, or a run's name among the rows)
    left out of them: it is forecast, not fitted."""
    from morpheus_jax.apps.scaling import sweep as sw  # lazy: start-up time

    if args.held_out is None:
        if args.params is None or args.samples is None:
            raise ConfigError("give --params N and --samples D, or --held-out RUN (they are read from the run)")
        return None, _rows(args)
    if args.params is not None or args.samples is not None:
        raise ConfigError("--held-out reads N and D from the run: leave out --params and --samples")
    path = Path(args.held_out)
    if (path / "final.json").exists():
        held = sw.collect_run(path, args.group_sizes)
        if held is None:
            raise ConfigError(f"--held-out {path}: the run has no final validation loss")
        rest = _rows(args, exclude=path)
    else:
        rows = _rows(args)
        named = [r for r in rows if str(r.get("run")) == args.held_out]
        if len(named) != 1:
            raise ConfigError(f"--held-out {args.held_out}: not a finished run folder, nor the name of exactly one "
                              f"run of the {'table' if args.table else 'runs folder'} ({len(named)} match)")
        held, rest = named[0], [r for r in rows if r is not named[0]]
    return held, rest


def cmd_forecast(args) -> int:
    from morpheus_jax.apps.scaling import study as st  # lazy: start-up time

    held, rows = _held_out(args)
    study, report = _fit(args, rows)
    n = held[args.params_column] if held else args.params
    d = held["samples"] if held else args.samples
    u = args.patients or (held.get("U") if held else None)
    if u is None and study.kind == "data-constrained" and len(report["U"]) == 1:
        u = report["U"][0]
    fc = st.forecast(study, n, d, u, confidence=args.confidence, seed=args.seed)
    _warn_past_ladder(study.kind, d / u if u else None, report)
    fc["fit"] = {k: report[k] for k in ("law", "E", "A", "B", "alpha", "beta", "n_points", "residual_rms_log")}
    fc["fit"].update({k: report[k] for k in ("r_star_d", "r_star_n") if k in report})
    if held:
        fc = {"run": held.get("run"), **st.score(fc, held["loss"])}
    if args.plot:
        from morpheus_jax.apps.scaling import plots  # lazy: start-up time

        if study.kind == "data-constrained":
            plain = st.fit_study(rows, kind="plain", params_column=args.params_column, n_boot=0)
            plots.loss_vs_epochs(study, args.plot, forecast=fc, plain=plain)
        else:
            plots.loss_vs_compute(rows, study.law, study.relation, args.plot, args.params_column,
                                  forecast={**fc, "flops": held.get("flops") if held else None})
    if args.json:
        print(json.dumps(fc))
        return 0
    interval = (f", {fc['confidence']:.0%} prediction interval [{fc['interval'][0]:.4g}, {fc['interval'][1]:.4g}]"
                if "interval" in fc else " (no interval: --bootstrap 0)")
    at = f"N = {n:.4g} params, D = {d:.4g} samples" + (f" of U = {u:.4g} ({d / u:.3g} epochs)" if u else "")
    print(f"forecast at {at}: loss {fc['loss']:.4g}{interval}; from {_law_text(study)} on {report['n_points']} "
          f"points ({report['n_runs']} runs)")
    if held:
        where = {True: "inside the interval", False: "outside the interval"}.get(fc.get("inside_interval"), "")
        print(f"held-out run {fc['run']}: loss {fc['actual']:.4g}, {fc['error']:+.1%} from the forecast"
              + (f", {where}" if where else ""))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def cmd_fit(args) -> int:
    from morpheus_jax.apps.scaling import fit as ft  # lazy: start-up time
    from morpheus_jax.apps.scaling import plots  # lazy: start-up time
    from morpheus_jax.apps.scaling import sweep as sw  # lazy: start-up time

    rows = _rows(args)
    relation = ft.ComputeRelation() if args.compute == "6nd" else None
    study, report = _fit(args, rows, relation)
    rel = study.relation
    out = Path(args.out)
    sw.write_table(rows, out / "table.csv")
    write_json(out / "fit.json", report)
    written = [out / "fit.json", out / "table.csv"]
    if not args.no_plots and study.kind == "plain":
        written.append(plots.loss_vs_compute(rows, study.law, rel, out / "loss_vs_compute.png", args.params_column))
        written.append(plots.optimal_allocation_plot(study.law, rel, out / "optimal_allocation.png",
                                                     [f["compute"] for f in report["frontier"]], study.boot, rows,
                                                     args.confidence, args.params_column))
    elif not args.no_plots:
        written.append(plots.loss_vs_epochs(study, out / "loss_vs_epochs.png"))
    ci = report["intervals"]

    def show(k):
        v = f"{report[k]:.4g}"
        return v + (f" [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if k in ci else "")

    print(f"{report['law']} law ({report['law_reason']}): {_law_text(study)} on {report['n_points']} points "
          f"({report['n_runs']} runs; rms log residual {report['residual_rms_log']:.4f}; "
          f"{report['bootstrap_samples']} bootstrap fits, {report['confidence']:.0%} intervals)")
    for k in ("E", "A", "B", "alpha", "beta", "r_star_d", "r_star_n"):
        if k in report and report[k] is not None:
            print(f"  {k:<8} = {show(k)}")
    if study.kind == "plain":
        ex = report["optimal_exponents"]
        print(f"compute C = {rel.k:.4g} * N^{rel.gamma:.3f} * D ({rel.source}): "
              f"N_opt ~ C^{ex['params']:.3f}, D_opt ~ C^{ex['samples']:.3f}")
    else:
        print(f"  {report['r_star_n_note']}")
        print(f"compute C = {rel.k:.4g} * N^{rel.gamma:.3f} * D ({rel.source}); `morpheus scaling plan --patients U "
              f"--compute C --fit {out}` for the best width and epochs")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_plan(args) -> int:
    from morpheus_jax.apps.scaling import study as st  # lazy: start-up time

    study, fit = st.load_study(args.fit)
    plan = st.plan(study, args.patients, args.compute, confidence=fit["confidence"])
    _warn_past_ladder(study.kind, plan["epochs"], fit)
    plan["width"] = st.width_for(plan["params"], fit.get("widths") or [])
    plan.update(law=study.kind, fit=str(args.fit), U=float(args.patients))
    if args.json:
        print(json.dumps(plan))
        return 0

    def ci(k, fmt):
        return f" [{format(plan[k + '_ci'][0], fmt)}, {format(plan[k + '_ci'][1], fmt)}]" if k + "_ci" in plan else ""

    rel = study.relation
    print(f"plan for U = {args.patients:g} patients at C = {args.compute:.4g} FLOPs (C = {rel.k:.4g} * "
          f"N^{rel.gamma:.3f} * D), {study.kind} law of {args.fit}:")
    print(f"  params  N = {plan['params']:.4g}{ci('params', '.4g')}")
    w = plan["width"]
    if w:
        print(f"  width     hidden size {w['hidden_size']:.0f} in the fit's family of shapes (its widths "
              f"{', '.join(f'{h:g}' for h in w['ladder_hidden_sizes'])}"
              + ("" if w["inside_ladder"] else "; outside them: an extrapolation") + ")")
    print(f"  epochs    {plan['epochs']:.4g}{ci('epochs', '.4g')} ({plan['samples']:.4g} samples)")
    print(f"  loss      {plan['loss']:.4g}{ci('loss', '.4g')} ({fit['confidence']:.0%} bootstrap intervals)")
    return 0


def cmd_flops(args) -> int:
    from morpheus_jax.apps.scaling.ladder import dataset_layouts  # lazy: start-up time
    from morpheus_jax.core.config import load_config  # lazy: start-up time
    from morpheus_jax.model import flops as fl  # lazy: start-up time

    cfg = load_config(args.config, args.overrides)
    layouts = dataset_layouts(cfg, args.group_sizes)
    if layouts is None:
        raise ConfigError(f"no dataset at {cfg.data.dir}: pass --group-sizes JSON (e.g. "
                         "the shipped paper_group_sizes)")
    batch = args.batch or cfg.train.global_batch_size
    f = fl.step_flops(cfg.model, layouts, batch, cfg.data.num_patches, cfg.masking.ratio)
    p = fl.param_counts(cfg.model, layouts)
    print(json.dumps({"flops": f, "params": p}, indent=1) if args.json else fl.summary(f, p))
    return 0


def _source_args(f) -> None:
    """The runs (or table) a fit reads, and the fit's settings: shared by fit and forecast."""
    f.add_argument("runs_dir", nargs="?",
                   help="folder of runs (any depth): each finished run (final.json) gives one row")
    f.add_argument("--table", help="instead of a runs folder: a CSV with columns params, samples, loss "
                                   "(and optionally flops: training FLOPs of the run; run: its name)")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200)")
    f.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    f.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    f.add_argument("--params-column", default="params",
                   help="the column used as N: params (default, all parameters) or params_without_group_mlps")
    f.add_argument("--group-sizes", help="JSON {modality: [group sizes]} for runs whose dataset is not reachable")
    law = f.add_mutually_exclusive_group()
    law.add_argument("--data-constrained", action="store_true",
                     help="fit the data-constrained law (repeated samples worth less: R*_D, and R*_N where the "
                          "runs pin it); needs U, the unique pretraining patients, of every run (default: this "
                          "law when some run repeats its data more than 1.5 times)")
    law.add_argument("--plain", action="store_true", help="fit the plain L(N, D) even when runs repeat their data")


def register(subparsers) -> None:
    """Add ``sweep`` and ``scaling`` (``fit``, ``forecast``, ``plan``, ``flops``) to the ``morpheus`` subcommands."""
    s = subparsers.add_parser(
        "sweep", help="expand a scaling ladder into runs and run them (or print/submit their launch commands)",
        description="Expand a ladder YAML (base config, fixed overrides, axes; see configs/scaling/) into "
                    "runs, one run folder each (OUT/<run name>). Finished runs (final.json) are skipped, "
                    "interrupted ones (checkpoints, no final.json) resume.")
    s.add_argument("ladder", help="ladder YAML file, or a name in configs/scaling/ (e.g. tiny)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the expanded runs, their status and steps (and launch commands) without running")
    s.add_argument("--launcher", default="local", choices=["local", "tpu_vm", "slurm"],
                   help="local: run here one after another (default); tpu_vm / slurm: print the "
                        "launch/tpu_vm.sh or sbatch launch/slurm_gpu.sbatch command of each unfinished run")
    s.add_argument("--submit", action="store_true",
                   help="with --launcher tpu_vm or slurm: run the launch commands instead of printing them")
    s.add_argument("--out", help="output root of the run folders (default: the ladder's 'out')")
    s.add_argument("--seeds", type=int, metavar="K",
                   help="run each point of the ladder with K seeds (the config's seed and the next K-1; default: "
                        "the ladder's 'seeds', else 1); scaling fit averages them and widens its intervals by "
                        "their spread")
    s.add_argument("--only", nargs="+", metavar="RUN", help="run only these runs of the ladder (by name)")
    s.add_argument("--subprocess", action="store_true",
                   help="local: each run in its own `morpheus pretrain` process (default: in this process)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar during local runs")
    s.add_argument("--zone", help="tpu_vm: the TPU zone (default: the ladder's launch.zone)")
    s.add_argument("--accelerator", help="tpu_vm: the accelerator type, e.g. v5litepod-32 (default: the "
                                         "ladder's launch.accelerator, else launch/tpu_vm.sh's default)")
    s.set_defaults(fn=cmd_sweep)

    s = subparsers.add_parser("scaling", help="scaling laws: fit L(N, D) to runs, forecast a run, plan a width "
                                               "and epochs, count FLOPs and parameters",
                              description="Scaling-law tools. `scaling fit` fits L(N, D) = E + A/N^alpha + "
                                          "B/D^beta (or its data-constrained form, where repeated samples are "
                                          "worth less) to a sweep's runs or a table; `scaling forecast` prints the "
                                          "fit's loss at N params and D samples with a prediction interval; "
                                          "`scaling plan` the width and epochs for U patients and a budget; "
                                          "`scaling flops` prints the analytic training FLOPs and parameter "
                                          "counts of a config.")
    sub = s.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND", required=True,
                           help="fit (law, intervals, frontier, plots), forecast (a run's loss from a fit), plan "
                                "(width and epochs for a cohort and budget) or flops (FLOP and parameter counts)")

    f = sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta with bootstrap intervals and plots",
                       description="Fit Chinchilla's parametric law (Huber loss on log residuals, L-BFGS-B from a "
                                   "grid of initialisations), bootstrap confidence intervals and the "
                                   "compute-optimal frontier. Writes OUT/fit.json, OUT/table.csv, "
                                   "OUT/loss_vs_compute.png and OUT/optimal_allocation.png.")
    _source_args(f)
    f.add_argument("--out", required=True, help="output folder for fit.json, table.csv and the plots")
    f.add_argument("--compute", default="measured", choices=["measured", "6nd"],
                   help="compute relation of the frontier: measured (C = k N^gamma D fitted to the runs' analytic "
                        "FLOPs; 6ND when the table has no flops column) or 6nd (C = 6 N D)")
    f.add_argument("--no-plots", action="store_true", help="write fit.json and table.csv only")
    f.set_defaults(fn=cmd_fit)

    f = sub.add_parser("forecast", help="forecast the loss of a run at N params and D samples from a fit",
                       description="Fit L(N, D) to a sweep's runs (or a table) as `scaling fit` does and print the "
                                   "law's loss at --params N and --samples D with a prediction interval "
                                   "(bootstrap laws times the runs' own scatter around the fit); with "
                                   "--held-out RUN, the run is left out of the fit, forecast at its own N and D "
                                   "and scored against its final loss.")
    _source_args(f)
    f.add_argument("--params", type=float, help="N: parameters of the run to forecast (e.g. 2.4e6)")
    f.add_argument("--samples", type=float, help="D: its training samples (steps x global batch)")
    f.add_argument("--patients", type=float, help="U: its unique pretraining patients (data-constrained law; "
                                                  "default: the held-out run's, or the runs' when they share one)")
    f.add_argument("--held-out", metavar="RUN",
                   help="instead of --params/--samples: a finished run folder (or a run's name in the runs folder "
                        "or table), left out of the fit, forecast from N and D, and scored against its loss")
    f.add_argument("--plot", metavar="PNG", help="also draw the ladder, the law, the forecast with its interval "
                                                 "and the held-out run's loss")
    f.add_argument("--json", action="store_true", help="print the forecast as JSON")
    f.set_defaults(fn=cmd_forecast)

    f = sub.add_parser("plan", help="the width and epochs that minimise the forecast loss for U patients and a "
                                    "compute budget",
                       description="From a fit (`scaling fit --out DIR`; the data-constrained law for a fixed cohort), "
                                   "the model size, its hidden size in the fit's family of shapes, and the epochs "
                                   "over U patients that minimise the forecast loss under C = k N^gamma D, with "
                                   "bootstrap intervals.")
    f.add_argument("--patients", type=float, required=True, help="U: unique pretraining patients of the cohort")
    f.add_argument("--compute", type=float, required=True, help="C: the training budget in FLOPs (e.g. 1e18)")
    f.add_argument("--fit", default="runs/scaling/epochs/fit",
                   help="folder of a fit (fit.json from `scaling fit --out`; default runs/scaling/epochs/fit)")
    f.add_argument("--json", action="store_true", help="print the plan as JSON")
    f.set_defaults(fn=cmd_plan)

    f = sub.add_parser("flops", help="analytic training FLOPs per step and parameter counts of a config",
                       description="Matmul FLOPs of one training step (forward + backward, useful and as executed "
                                   "with bucket padding) and parameter counts, from a config and the group sizes "
                                   "of its dataset (or --group-sizes).")
    add_config_flags(f, "model.hidden_size=128")
    f.add_argument("--group-sizes", help="JSON {modality: [sizes]} or the layout of paper_group_sizes.json; "
                                         "default: the dataset manifest at data.dir")
    f.add_argument("--batch", type=int, help="global batch size (default: train.global_batch_size)")
    f.add_argument("--json", action="store_true", help="print the full breakdown as JSON")
    f.set_defaults(fn=cmd_flops)
