"""`morpheus embed`, `generate`, `evaluate reconstruction`, `finetune survival|classify|regress`: thin
shells over `morpheus_jax.apps.downstream` and `morpheus_jax.apps.finetune`.

The main parser adds them with ``register(subparsers)``.
"""

from __future__ import annotations

from morpheus_jax.cli.common import CKPT_HELP, DATASET_HELP
from morpheus_jax.core.errors import ConfigError


def _done(_result) -> int:
    return 0


def cmd_embed(args) -> int:
    from morpheus_jax.apps.downstream import run_embed  # lazy: start-up time
    return _done(run_embed(args.checkpoint, args.dataset, args.out, modalities=args.modalities,
                                           split=args.split, batch_size=args.batch_size))


def cmd_generate(args) -> int:
    from morpheus_jax.apps.downstream import run_generate  # lazy: start-up time
    return _done(run_generate(args.checkpoint, args.dataset, args.target, args.out,
                                                 sources=args.sources, split=args.split, batch_size=args.batch_size))


def cmd_reconstruction(args) -> int:
    from morpheus_jax.apps.downstream import run_reconstruction  # lazy: start-up time
    return _done(run_reconstruction(
        args.checkpoint, args.dataset, args.target, args.out, split=args.split, group_column=args.group_column,
        min_std=args.min_std, batch_size=args.batch_size))


def _settings(args, protocol: str):
    """`FinetuneConfig`: the protocol's defaults, the flags given, then the finetune.<key>=value overrides."""
    from morpheus_jax.apps.finetune.trainer import protocol_settings  # lazy: start-up time
    return protocol_settings(protocol, args.overrides, epochs=args.epochs, batch_size=args.batch_size,
                             learning_rate=args.lr, weight_decay=args.weight_decay, dropout=args.dropout,
                             warmup_epochs=args.warmup_epochs, cosine_period_epochs=args.cosine_period,
                             num_patches=args.num_patches, eval_batch_size=args.eval_batch_size, seed=args.seed,
                             pretrained=False if args.no_pretrain else None, schedule=args.schedule,
                             grad_accum_steps=args.grad_accum_steps)


def cmd_survival(args) -> int:
    from morpheus_jax.apps.finetune.survival import run_survival  # lazy: start-up time
    return _done(run_survival(
        args.checkpoint, args.dataset, args.out, modalities=args.modalities, split=args.split, folds=args.folds,
        bins=args.bins, bins_fit=args.bins_fit, folds_column=args.folds_column, time_column=args.time_column,
        censorship_column=args.censorship_column,
        settings=_settings(args, "survival")))


def cmd_classify(args) -> int:
    from morpheus_jax.apps.finetune.classify import run_classify  # lazy: start-up time
    settings = _settings(args, "full" if args.full else "few-shot")
    if args.linear_probe and not settings.pretrained:
        raise ConfigError("--linear-probe and --no-pretrain (finetune.pretrained=false) are two baselines; give one")
    method = "linear_probe" if args.linear_probe else "finetune" if settings.pretrained else "no_pretrain"
    return _done(run_classify(
        args.checkpoint, args.dataset, args.out, task=args.task, modalities=args.modalities, split=args.split,
        k=args.k, draws=args.draws, full=args.full, folds=args.folds, method=method, settings=settings))


def cmd_regress(args) -> int:
    from morpheus_jax.apps.finetune.regress import run_regress  # lazy: start-up time
    return _done(run_regress(args.checkpoint, args.dataset, args.out, task=args.task, modalities=args.modalities,
                             split=args.split, folds=args.folds, settings=_settings(args, "survival")))


def _common(s, *, modalities: bool = True, split: str = "all", batch_size: bool = False) -> None:
    """The checkpoint, dataset, split (and inputs, and the inference batch size) flags."""
    s.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    s.add_argument("--dataset", required=True, help=DATASET_HELP)
    if modalities:
        s.add_argument("--modalities", default="wsi",
                       help="comma-separated inputs to encode: wsi and/or the checkpoint's omics, e.g. wsi,rna "
                            "(default wsi); patients lacking one are excluded and counted")
    s.add_argument("--split", default=split,
                   help=f"dataset split: pretrain, val-pretrain, fine-tune{', or all' if split == 'all' else ''} "
                        f"(default {split})")
    if batch_size:
        s.add_argument("--batch-size", type=int, default=None,
                       help="patients per batch (default: the pretraining data.eval_batch_size)")


def _finetune_flags(s) -> None:
    _common(s, split="fine-tune")
    s.add_argument("--out", required=True,
                   help="output folder: predictions.csv, results.json, and a checkpoint of each fold's or draw's "
                        "fine-tuned model in fold_<k>/ or draw_<i>/ (morpheus export turns it into the authors' "
                        "fine-tuning layout)")
    s.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    s.add_argument("--epochs", type=int, default=None,
                   help="training epochs per fold or draw (default: the authors' for the task: survival 20, "
                        "few-shot 5, full-data classification 5)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="patients per training step (default: survival 32, few-shot 1, full-data 32)")
    s.add_argument("--grad-accum-steps", type=int, default=None,
                   help="micro-batches per update: the gradients of --batch-size / k patients at a time are "
                        "summed into the update of the whole batch (memory of one micro-batch; default 1)")
    s.add_argument("--schedule", choices=["paper", "constant"], default=None,
                   help="learning rate: the per-epoch warm-up + cosine factor (paper; survival's default) or "
                        "constant (the authors' classification scripts; classify's default)")
    s.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 5e-5)")
    s.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 1e-2)")
    s.add_argument("--dropout", type=float, default=None,
                   help="dropout in the encoder blocks and before the head (default 0.35)")
    s.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warm-up epochs of the per-epoch schedule (default 5)")
    s.add_argument("--cosine-period", type=int, default=None,
                   help="cosine period in epochs: factor min((e+1)/warmup, 0.5(1+cos(pi e/period))) (default 25)")
    s.add_argument("--num-patches", type=int, default=None,
                   help="patches sampled per training bag (default: the pretraining data.num_patches); "
                        "evaluation uses every patch")
    s.add_argument("--eval-batch-size", type=int, default=None,
                   help="patients per evaluation batch (default: the pretraining data.eval_batch_size)")
    s.add_argument("--seed", type=int, default=None,
                   help="seed of folds, draws, head init, patch sampling and dropout (default 1999)")
    s.add_argument("--no-pretrain", action="store_true",
                   help="baseline: the same model, folds and seeds from random weights instead of the checkpoint")
    s.add_argument("overrides", nargs="*", metavar="finetune.key=value",
                   help="fine-tuning settings as dotted overrides (they win over the flags, which are aliases), "
                        "e.g. finetune.epochs=3 finetune.learning_rate=1e-4 finetune.pretrained=false; keys: "
                        "epochs, batch_size, learning_rate, weight_decay, dropout, warmup_epochs, "
                        "cosine_period_epochs, num_patches, eval_batch_size, seed, pretrained, schedule, "
                        "grad_accum_steps")


def register(subparsers) -> None:
    """Add ``embed``, ``generate``, ``evaluate`` and ``finetune`` to the ``morpheus`` subcommands."""
    s = subparsers.add_parser(
        "embed", help="write each patient's global-token embedding (.parquet or .npz)",
        description="Encode each patient (every patch of the bag, plus the omics asked for) and write the final "
                    "embedding of the global token: a table with submitter_id, project_id, split and emb_* "
                    "columns (.parquet), or arrays submitter_id, project_id, split, embedding [n, H] (.npz).")
    _common(s, batch_size=True)
    s.add_argument("--out", required=True, help="output file; the suffix picks the format: .parquet or .npz")
    s.set_defaults(fn=cmd_embed)

    s = subparsers.add_parser(
        "generate", help="generate an omics modality from the slides (and other omics), one CSV row per patient",
        description="Any-to-any generation in decode mode: encode the --from inputs, let the --target decoder "
                    "predict every group, and write submitter_id then the target's features in canonical order "
                    "(a feature of several groups gets the mean of its predictions).")
    _common(s, modalities=False, batch_size=True)
    s.add_argument("--target", required=True, help="omics modality to generate: rna, dnam or cnv (the checkpoint's)")
    s.add_argument("--from", dest="sources", default="wsi",
                   help="comma-separated inputs, e.g. wsi or wsi,rna (default wsi); must not include --target")
    s.add_argument("--out", required=True, help="output CSV file (one row per patient)")
    s.set_defaults(fn=cmd_generate)

    s = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint (evaluate reconstruction …)",
        description="Evaluations of a pretrained checkpoint. `morpheus evaluate reconstruction --help` for details.")
    ev = s.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True,
                          help="what to evaluate: reconstruction (generation against the measured omics)")
    r = ev.add_parser(
        "reconstruction", help="per-feature Pearson r of generated vs measured omics, per input combination",
        description="Generate --target from WSI alone and from WSI + each subset of the other omics; per feature "
                    "(std > --min-std) the Pearson r over patients; the median and the number of features above "
                    "0.01 … 0.9. Writes reconstruction.csv, per_feature_r.csv, reconstruction.png and "
                    "reconstruction.json into --out.")
    _common(r, modalities=False, split="fine-tune", batch_size=True)
    r.add_argument("--target", required=True, help="omics modality to generate and compare: rna, dnam or cnv")
    r.add_argument("--out", required=True, help="output folder for the CSVs, the plot and the JSON")
    r.add_argument("--group-column", default=None,
                   help="binary metadata column (e.g. IDH): also report the share of features significant in the "
                        "measured data (Welch t-test, p < 0.05) whose sign the generated data reproduces")
    r.add_argument("--min-std", type=float, default=0.15,
                   help="keep features whose measured std over the patients exceeds this (default 0.15, the paper's)")
    r.set_defaults(fn=cmd_reconstruction)

    s = subparsers.add_parser(
        "finetune", help="fine-tune the encoder on a task (finetune survival | classify | regress)",
        description="Fine-tune the pretrained encoder + a Dropout → Linear head on the global token, with the "
                    "paper's settings by default (AdamW lr 5e-5, wd 1e-2, dropout 0.35, 20 epochs, batch 32, "
                    "warm-up 5, cosine period 25). `morpheus finetune survival --help` / `classify --help` / "
                    "`regress --help`; settings also as finetune.<key>=value overrides.")
    ft = s.add_subparsers(dest="task_kind", metavar="TASK", required=True,
                          help="survival (c-index by k-fold CV), classify (few-shot or full-data) or regress "
                               "(a continuous column, k-fold CV)")
    v = ft.add_parser(
        "survival", help="discrete-time survival (logistic hazard), k-fold cross-validated c-index",
        description="The authors' discrete-time labels (pycox LabTransDiscreteTime(--bins, scheme='quantiles'): "
                    "cuts at Kaplan-Meier quantiles, one output per cut), logistic-hazard NLL, risk = sum of the "
                    "outputs (higher = worse); censored c-index on the held-out fold. Writes predictions.csv "
                    "(submitter_id, fold, risk, time, event, bin) and results.json (c_index_per_fold, c_index_mean, "
                    "c_index_std, time_cuts).")
    _finetune_flags(v)
    v.add_argument("--bins", type=int, default=5, help="cut points of the quantile scheme = outputs (default 5; "
                                                       "fewer when cuts coincide)")
    v.add_argument("--bins-fit", choices=["fold", "all"], default="fold",
                   help="fit the cuts on each training fold (default: no leakage) or once on the whole cohort "
                        "(all: the authors' protocol)")
    v.add_argument("--folds-column", metavar="NAME",
                   help="metadata column holding each patient's fold (the authors' precomputed folds); "
                        "overrides --folds")
    v.add_argument("--time-column", default="survival_months", help="metadata column of the follow-up times")
    v.add_argument("--censorship-column", default="censorship",
                   help="metadata column, 1 = censored, 0 = event observed (default censorship)")
    v.set_defaults(fn=cmd_survival)

    c = ft.add_parser(
        "classify", help="few-shot (k per class, repeated draws) or full-data classification of a column",
        description="Classify a metadata column. Few-shot: --k patients per class for training, the rest for "
                    "testing, --draws times; --full: k-fold CV. ROC AUC (macro one-vs-rest above two classes) "
                    "and balanced accuracy per draw/fold and summarised in results.json, predictions in "
                    "predictions.csv. Baselines: --linear-probe, --no-pretrain.")
    _finetune_flags(c)
    c.add_argument("--task", required=True, help="metadata column to predict, e.g. IDH or oncotree_code")
    c.add_argument("--k", type=int, default=5, help="few-shot training patients per class (default 5)")
    c.add_argument("--draws", type=int, default=10, help="few-shot random draws (default 10)")
    c.add_argument("--full", action="store_true", help="full-data classification by --folds cross-validation "
                                                         "instead of few-shot draws")
    c.add_argument("--linear-probe", action="store_true",
                   help="baseline: frozen pretrained encoder, logistic regression on the embeddings")
    c.set_defaults(fn=cmd_classify)

    g = ft.add_parser(
        "regress", help="a continuous metadata column (MSE), k-fold cross-validated Pearson r, MAE and R²",
        description="Regress a numeric metadata column: one output trained with MSE on the target standardised "
                    "by its training fold's mean and std (prediction = output · std + mean, both in the head spec); "
                    "per held-out fold Pearson r, MAE and R². Writes predictions.csv (submitter_id, fold, target, "
                    "prediction) and results.json (pearson_r_per_fold, mae_per_fold, r2_per_fold and their means "
                    "and stds). Settings default to survival's (20 epochs, batch 32, paper schedule).")
    _finetune_flags(g)
    g.add_argument("--task", required=True, help="numeric metadata column to predict, e.g. age_at_diagnosis")
    g.set_defaults(fn=cmd_regress)
