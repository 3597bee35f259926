"""Downstream use of a pretrained MORPHEUS (MORPHEUS.md §4): embeddings, any-to-any
generation and its reconstruction evaluation, plus the input checks fine-tuning shares.

Every function takes a checkpoint (or a loaded `morpheus_jax.api.MorpheusModel`) and a
prepared dataset; bags hold every patch of a patient (`pipeline.eval_batches`). Problems a
user can fix (unknown modality, missing split or column, a dataset prepared with other
mappings) raise `DownstreamError` with one line naming the fix.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.stats import ttest_ind

from morpheus_jax.api import MorpheusModel, load
from morpheus_jax.apps.plots import pyplot
from morpheus_jax.core.atomic import replacing, save_figure, write_csv, write_json
from morpheus_jax.core.errors import DownstreamError
from morpheus_jax.core.manifest import Manifest
from morpheus_jax.core.names import MODALITIES, SPLITS
from morpheus_jax.data import pipeline
from morpheus_jax.data import records as rec
from morpheus_jax.metrics.reconstruction import THRESHOLDS, kept_features, pearson_per_feature, summarise_r

WSI = "wsi"
Log = Callable[[str], None]



# -- inputs -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the encoder sees: the slides (``wsi``) and omics modalities in model order."""
    wsi: bool
    omics: tuple[str, ...]

    @property
    def label(self) -> str:
        return "+".join(([WSI] if self.wsi else []) + list(self.omics))


def parse_modalities(text: str | Sequence[str], model_modalities: Sequence[str], flag: str = "--modalities") -> Inputs:
    """``"wsi,rna"`` → `Inputs`; omics must be among the checkpoint's modalities."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if not items:
        raise DownstreamError(f"{flag} is empty: give e.g. wsi or wsi,rna")
    known = [WSI, *model_modalities]
    unknown = [s for s in items if s not in known]
    if unknown:
        other = [s for s in unknown if s in MODALITIES]
        if other:
            raise DownstreamError(f"{flag}: the checkpoint has no {', '.join(other)} tokenizer "
                                  f"(its modalities: {', '.join(model_modalities)})")
        raise DownstreamError(f"{flag}: unknown modality {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    return Inputs(WSI in items, tuple(m for m in model_modalities if m in items))


def open_dataset(path: str | os.PathLike) -> tuple[Path, Manifest]:
    root = Path(path)
    return root, rec.load_manifest(root)


def split_records(root: Path, manifest: Manifest, split: str) -> list[dict]:
    """Records of one split, or of every split (``"all"``) in `SPLITS` order."""
    counts = manifest.counts
    if split == "all":
        return [r for s in SPLITS if counts.get(s) for r in pipeline.read_split(root, s, manifest)]
    if not counts.get(split):
        have = ", ".join(f"{s} ({n})" for s, n in counts.items() if n) or "none"
        raise DownstreamError(f"{root}: no patients in split {split!r} (splits with patients: {have})")
    return pipeline.read_split(root, split, manifest)


def check_dataset(manifest: Manifest, root: Path, modalities: Sequence[str], features: dict[str, list[str]],
                  wsi_dim: int | None) -> None:
    """The dataset has each modality with the checkpoint's features (and the patch dimension)."""
    for m in modalities:
        if m not in manifest.modalities:
            raise DownstreamError(f"{root}: the dataset has no {m} data (it has {', '.join(manifest.modalities)})")
        if list(manifest.modalities[m].features) != list(features[m]):
            raise DownstreamError(f"{root}: {m} features differ from the checkpoint's (prepare the dataset with "
                                  "the mapping the model was pretrained with)")
    if wsi_dim is not None and manifest.patches.dim != wsi_dim:
        raise DownstreamError(f"{root}: patches have {manifest.patches.dim} dims, the model expects {wsi_dim}")


def keep_available(records: list[dict], inputs: Inputs, log: Log = print, why: str = "") -> list[dict]:
    """Patients with every omics modality of ``inputs`` (and patches, with WSI); prints the excluded count."""
    kept, lacking = [], {}
    for r in records:
        miss = [m for m in inputs.omics if not r["available"].get(m, False)]
        if inputs.wsi and r["patch_count"] <= 0:
            miss.append(WSI)
        if miss:
            for m in miss:
                lacking[m] = lacking.get(m, 0) + 1
        else:
            kept.append(r)
    if lacking:
        parts = ", ".join(f"{n} lacking {m}" for m, n in lacking.items())
        log(f"excluded {len(records) - len(kept)} of {len(records)} patients{why} ({parts})")
    if not kept:
        raise DownstreamError(f"no patient has all of {inputs.label}")
    return kept


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip())


def column_values(records: list[dict], manifest: Manifest, column: str) -> list:
    """``meta[column]`` per record (None where missing); an unknown column is an error."""
    cols = manifest.meta_columns or sorted({k for r in records for k in r["meta"]})
    if column not in cols:
        raise DownstreamError(f"the dataset has no column {column!r} (task columns: {', '.join(cols) or 'none'})")
    return [None if is_missing(r["meta"].get(column)) else r["meta"].get(column) for r in records]


# -- batches --------------------------------------------------------------------------------------

def iter_batches(root: Path, records: list[dict], inputs: Inputs, *, batch_size: int, min_bag: int) -> Iterator[dict]:
    """Full-bag batches (`pipeline.eval_batches`) with ``rows`` into records; without WSI,
    omics-only batches (``wsi`` None)."""
    if inputs.wsi:
        yield from pipeline.eval_batches(root, records, inputs.omics, batch_size=batch_size, min_bag=min_bag)
        return
    for start in range(0, len(records), batch_size):
        rows = list(range(start, min(start + batch_size, len(records))))
        omics = {m: np.zeros((batch_size, len(records[0]["omics"][m])), np.float32) for m in inputs.omics}
        for j, i in enumerate(rows):
            for m in inputs.omics:
                omics[m][j] = records[i]["omics"][m]
        yield {"wsi": None, "wsi_mask": None, "omics": omics,
               "rows": np.asarray(rows + [-1] * (batch_size - len(rows)))}


def _model(checkpoint):
    return checkpoint if isinstance(checkpoint, MorpheusModel) else load(checkpoint)


def _batching(model, batch_size: int | None) -> dict:
    if batch_size is not None and batch_size < 1:
        raise DownstreamError(f"--batch-size must be at least 1, got {batch_size}")
    data = model.config.data
    return {"batch_size": batch_size or data.eval_batch_size, "min_bag": data.eval_bag_bucket}


# -- embeddings ---------------------------------------------------------------------------------

def embed(model, root: Path, records: list[dict], inputs: Inputs, *, batch_size: int | None = None) -> np.ndarray:
    """``[n, H]`` final embedding of the global token per record, every patch used."""
    out = np.zeros((len(records), model.hidden_size), np.float32)
    for b in iter_batches(root, records, inputs, **_batching(model, batch_size)):
        z = model.encode(b["wsi"], b["omics"], b["wsi_mask"])[:, 0]
        valid = b["rows"] >= 0
        out[b["rows"][valid]] = z[valid]
    return out


def run_embed(checkpoint, dataset, out, *, modalities: str = WSI, split: str = "all",
              batch_size: int | None = None, log: Log = print) -> dict:
    """Write the global-token embedding of each patient to ``out`` (``.parquet`` or ``.npz``)."""
    out = Path(out)
    if out.suffix not in (".parquet", ".npz"):
        raise DownstreamError(f"--out {out}: the suffix picks the format, .parquet or .npz")
    model = _model(checkpoint)
    inputs = parse_modalities(modalities, model.modalities)
    root, manifest = open_dataset(dataset)
    check_dataset(manifest, root, inputs.omics, model.feature_names, model.config.model.wsi_dim if inputs.wsi else None)
    recs = keep_available(split_records(root, manifest, split), inputs, log)
    z = embed(model, root, recs, inputs, batch_size=batch_size)
    ids = [r["submitter_id"] for r in recs]
    if out.suffix == ".npz":
        with replacing(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, submitter_id=np.asarray(ids), project_id=np.asarray([r["project_id"] for r in recs]),
                     split=np.asarray([r["split"] for r in recs]), embedding=z, modalities=np.asarray(inputs.label))
    else:
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise DownstreamError("writing .parquet needs pyarrow (pip install pyarrow), or use --out FILE.npz") from e
        width = len(str(z.shape[1] - 1))
        frame = pd.DataFrame(z, columns=[f"emb_{i:0{width}d}" for i in range(z.shape[1])])
        frame.insert(0, "split", [r["split"] for r in recs])
        frame.insert(0, "project_id", [r["project_id"] for r in recs])
        frame.insert(0, "submitter_id", ids)
        with replacing(out) as tmp:
            frame.to_parquet(tmp, index=False)
    log(f"wrote {out}: {len(ids)} patients × {z.shape[1]} dims, inputs {inputs.label}, step {model.step}")
    return {"patients": len(ids), "dims": int(z.shape[1]), "inputs": inputs.label, "out": str(out)}


# -- generation ----------------------------------------------------------------------------------

def _check_target(model, target: str, sources: Inputs) -> None:
    if not model.has_decoders:
        raise DownstreamError("this checkpoint is encoder-only: it has no decoders to generate with")
    if target not in model.modalities:
        raise DownstreamError(f"--target {target!r}: the checkpoint has decoders for {', '.join(model.modalities)}")
    if target in sources.omics:
        raise DownstreamError(f"--target {target} is also an input (--from {sources.label}): generate it from the others")


def generate(model, root: Path, records: list[dict], target: str, inputs_list: Sequence[Inputs], *,
             batch_size: int | None = None) -> dict[Inputs, np.ndarray]:
    """``{inputs: [n, F_target]}`` canonical features of ``target`` generated in decode mode
    from each input combination (one pass over the bags)."""
    union = Inputs(any(i.wsi for i in inputs_list),
                   tuple(m for m in model.modalities if any(m in i.omics for i in inputs_list)))
    f = len(model.feature_names[target])
    out = {i: np.zeros((len(records), f), np.float32) for i in inputs_list}
    for b in iter_batches(root, records, union, **_batching(model, batch_size)):
        valid = b["rows"] >= 0
        for i in inputs_list:
            wsi, mask = (b["wsi"], b["wsi_mask"]) if i.wsi else (None, None)
            grouped = model.generate(target, wsi, {m: b["omics"][m] for m in i.omics}, mask)
            out[i][b["rows"][valid]] = model.to_features(target, grouped)[valid]
    return out


def run_generate(checkpoint, dataset, target: str, out, *, sources: str = WSI, split: str = "all",
                 batch_size: int | None = None, log: Log = print) -> dict:
    """Write ``out`` (CSV): submitter_id, then the target's features in canonical order."""

    model = _model(checkpoint)
    inputs = parse_modalities(sources, model.modalities, flag="--from")
    _check_target(model, target, inputs)
    root, manifest = open_dataset(dataset)
    check_dataset(manifest, root, inputs.omics, model.feature_names, model.config.model.wsi_dim if inputs.wsi else None)
    recs = keep_available(split_records(root, manifest, split), inputs, log)
    pred = generate(model, root, recs, target, [inputs], batch_size=batch_size)[inputs]
    frame = pd.DataFrame(pred, columns=model.feature_names[target])
    frame.insert(0, "submitter_id", [r["submitter_id"] for r in recs])
    out = Path(out)
    write_csv(out, frame, float_format="%.6g")
    log(f"wrote {out}: {target} ({pred.shape[1]} features) for {len(recs)} patients from {inputs.label}")
    return {"patients": len(recs), "features": int(pred.shape[1]), "inputs": inputs.label, "out": str(out)}


# -- reconstruction evaluation -------------------------------------------------------------------

def input_combinations(model_modalities: Sequence[str], target: str, available: Sequence[str]) -> list[Inputs]:
    """WSI alone, then WSI + each non-empty subset of the other omics (smaller subsets first)."""
    others = [m for m in model_modalities if m != target and m in available]
    return [Inputs(True, tuple(c)) for k in range(len(others) + 1) for c in itertools.combinations(others, k)]


def differential_agreement(pred: np.ndarray, truth: np.ndarray, group: np.ndarray, alpha: float = 0.05) -> dict:
    """The differential check between two groups of patients (Welch t-test per feature, p < alpha),
    pred, truth ``[n, F]``, group ``[n]`` bool:

    - ``significant``: features significant in the truth; ``sign_agreement``: the share of them
      whose mean difference the prediction reproduces in sign; ``sign_and_significance_agreement``:
      in sign and significance (ours);
    - ``authors_accuracy``: the authors' figure, sign agreement (TP + TN) / (TP + TN + FP + FN)
      over the ``significant_in_both`` features (significant in truth and prediction)."""

    group = np.asarray(group, bool)
    with np.errstate(all="ignore"):
        _, p_true = ttest_ind(truth[group], truth[~group], axis=0, equal_var=False)
        _, p_pred = ttest_ind(pred[group], pred[~group], axis=0, equal_var=False)
    d_true = truth[group].mean(0) - truth[~group].mean(0)
    d_pred = pred[group].mean(0) - pred[~group].mean(0)
    sig = np.nan_to_num(p_true, nan=1.0) < alpha
    sig_pred = np.nan_to_num(p_pred, nan=1.0) < alpha
    same = np.sign(d_pred) == np.sign(d_true)
    n, both = int(sig.sum()), sig & sig_pred
    return {"significant": n,
            "sign_agreement": float(same[sig].mean()) if n else float("nan"),
            "sign_and_significance_agreement": float((same & sig_pred)[sig].mean()) if n else float("nan"),
            "significant_in_both": int(both.sum()),
            "authors_accuracy": float(same[both].mean()) if both.any() else float("nan")}


def reconstruction_table(preds: dict[Inputs, np.ndarray], truth: np.ndarray, *, min_std: float = 0.15,
                         thresholds: Sequence[float] = THRESHOLDS, group: np.ndarray | None = None,
                         grouped: np.ndarray | None = None) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """One row per input combination (median r over the features with a correlation, features
    above each threshold, constant predictions counted; optionally the differential check over
    all features, on the patients ``grouped`` holding a ``group`` value), the per-feature r
    ``[combos, F_kept]`` (NaN: a constant prediction) and the kept-feature mask ``[F]``."""
    keep = kept_features(truth, min_std)
    rows, rs = [], []
    for inputs, pred in preds.items():
        r = pearson_per_feature(pred[:, keep], truth[:, keep])
        rs.append(r)
        summary = summarise_r(r, thresholds)
        row = {"inputs": inputs.label, "patients": int(truth.shape[0]), "features": int(keep.sum()),
               "median_r": summary["median_r"], "constant_predictions": summary["constant_predictions"],
               **{f"above_{t:g}": n for t, n in summary["above"].items()}}
        if group is not None:
            at = np.arange(truth.shape[0]) if grouped is None else grouped
            diff = differential_agreement(pred[at], truth[at], group)
            row.update({f"diff_{k}": v for k, v in diff.items()})
        rows.append(row)
    return rows, np.asarray(rs), keep


def reconstruction_plot(rows: list[dict], thresholds: Sequence[float], out: Path, title: str) -> None:
    """Features above threshold against threshold, one series per input combination."""

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in rows:
        ax.plot(thresholds, [row[f"above_{t:g}"] for t in thresholds], "o-", ms=3, lw=1.4,
                label=f"{row['inputs']} (median r {row['median_r']:.3f})")
    ax.set_xlabel("Pearson r threshold")
    ax.set_ylabel("features with r above threshold")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def binary_groups(values: list, column: str) -> tuple[np.ndarray, list]:
    """Two distinct values → ``[n]`` bool (True = the larger value) and the two values."""
    levels = sorted({str(v) for v in values})
    if len(levels) != 2:
        raise DownstreamError(f"--group-column {column} must hold exactly two values, it has {len(levels)}: "
                              f"{', '.join(levels[:6])}")
    return np.asarray([str(v) == levels[1] for v in values]), levels


def run_reconstruction(checkpoint, dataset, target: str, out_dir, *, split: str = "fine-tune",
                       group_column: str | None = None, min_std: float = 0.15,
                       thresholds: Sequence[float] = THRESHOLDS, batch_size: int | None = None,
                       log: Log = print) -> dict:
    """Generate ``target`` from WSI alone and WSI + each subset of the other omics; write
    ``reconstruction.csv`` (one row per combination), ``per_feature_r.csv``,
    ``reconstruction.png`` and ``reconstruction.json`` into ``out_dir``."""

    model = _model(checkpoint)
    _check_target(model, target, Inputs(True, ()))
    root, manifest = open_dataset(dataset)
    if target not in manifest.modalities:
        raise DownstreamError(f"{root}: the dataset has no {target} data to compare with")
    combos = input_combinations(model.modalities, target, list(manifest.modalities))
    used = tuple(m for m in model.modalities if m == target or any(m in c.omics for c in combos))
    check_dataset(manifest, root, used, model.feature_names, model.config.model.wsi_dim)
    recs = keep_available(split_records(root, manifest, split), Inputs(True, used), log,
                          why=" (the same patients for every combination)")
    group = levels = grouped = None
    if group_column:             # the differential check uses the patients with a value; r uses all
        values = column_values(recs, manifest, group_column)
        grouped = np.asarray([i for i, v in enumerate(values) if v is not None], np.int64)
        if grouped.size < len(recs):
            log(f"{len(recs) - grouped.size} of {len(recs)} patients lack {group_column}: left out of the "
                "differential check only")
        group, levels = binary_groups([values[i] for i in grouped], group_column)
    if len(recs) < 3:
        raise DownstreamError(f"{len(recs)} patients are too few for per-feature correlations")
    truth = np.stack([np.asarray(r["omics"][target], np.float32) for r in recs])
    preds = generate(model, root, recs, target, combos, batch_size=batch_size)
    rows, rs, keep = reconstruction_table(preds, truth, min_std=min_std, thresholds=thresholds, group=group,
                                          grouped=grouped)
    if not keep.any():
        log(f"no {target} feature has std > {min_std:g} over these {len(recs)} patients (largest "
            f"{truth.std(0, ddof=1).max():.3f}); lower --min-std")
    out_dir = Path(out_dir)
    write_csv(out_dir / "reconstruction.csv", pd.DataFrame(rows), float_format="%.6g")
    names = np.asarray(model.feature_names[target])[keep]
    per_feature = pd.DataFrame(rs.T if rs.size else np.zeros((0, len(rows))), columns=[r["inputs"] for r in rows])
    per_feature.insert(0, "feature", names)
    per_feature.insert(1, "std", truth.std(0, ddof=1)[keep])
    write_csv(out_dir / "per_feature_r.csv", per_feature, float_format="%.6g")
    title = (f"{target} generated on {len(recs)} {split} patients, {int(keep.sum())} features with std > {min_std:g} "
             f"(step {model.step})")
    reconstruction_plot(rows, thresholds, out_dir / "reconstruction.png", title)
    report = {"target": target, "split": split, "patients": len(recs), "min_std": min_std,
              "features": int(keep.sum()), "thresholds": list(thresholds), "step": model.step, "rows": rows}
    if group_column:
        report.update(group_column=group_column, group_levels=levels,
                      group_sizes=[int((~group).sum()), int(group.sum())])
    write_json(out_dir / "reconstruction.json", report)
    for row in rows:
        extra = (f"; {row['diff_significant']} features differ by {group_column}, sign reproduced for "
                 f"{row['diff_sign_agreement']:.1%} (authors' accuracy {row['diff_authors_accuracy']:.1%} over "
                 f"{row['diff_significant_in_both']} significant in both)") if group_column else ""
        log(f"{target} from {row['inputs']}: median r {row['median_r']:.3f} over {row['features']} features, "
            f"{row[f'above_{thresholds[len(thresholds) // 2]:g}']} above {thresholds[len(thresholds) // 2]:.2f}{extra}")
    log(f"wrote {out_dir / 'reconstruction.csv'}, per_feature_r.csv, reconstruction.png, reconstruction.json")
    return report
