"""Raw TCGA-layout cohort → prepared dataset (see `morpheus_jax.data.records`).

Inputs as users hold them (reference §1): a metadata CSV (``submitter_id``, ``project_id``,
``split``, ``WSI`` list of slide files relative to the features folder, task columns), one
HDF5 per slide (``features`` ``[1, N, D]`` or ``[N, D]``), one omics CSV per modality
indexed by ``submitter_id``, and one ``{group: [features]}`` JSON mapping per modality.

Transforms applied (recorded in the manifest): canonical feature order per modality (groups
in mapping order, features in group order, first appearance kept); ``rna`` as given
(missing → 0, the per-gene centre); ``dnam`` missing → 0; ``cnv`` missing → 2 then
``log10(cn / 2 + 1)``.

Every problem in the inputs raises `PrepareError` with a one-line message naming the file
and field. Shards are written under temporary names and renamed when complete; the manifest
is written last, so an interrupted run never leaves a dataset that loads.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import tensorstore as ts
from tqdm.auto import tqdm

from morpheus_jax.data import records as rec

MODALITIES = ("rna", "dnam", "cnv")
FILL = {"rna": 0.0, "dnam": 0.0, "cnv": 2.0}
TRANSFORM = {"rna": "identity", "dnam": "identity", "cnv": "log10(cn/2+1)"}
RESERVED = {"submitter_id", "project_id", "split", "WSI"}


class PrepareError(ValueError):
    """Bad raw input; the message names the file and the field."""


@dataclasses.dataclass
class PrepareOptions:
    records_per_shard: int = 256
    patch_dtype: str = "float16"
    chunk_rows: int = 128
    wsi_dim: int = 1536
    seed: int = 0
    strict: bool = False
    allow_missing_modalities: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclasses.dataclass
class RawCohort:
    metadata: Path
    features_dir: Path
    omics: dict[str, Path]
    mappings: dict[str, Path]

    @classmethod
    def from_dir(cls, raw: str | os.PathLike) -> "RawCohort":
        """The synth layout: metadata.csv, features/, omics/<m>.csv, mappings/<m>.json."""
        raw = Path(raw)
        omics = {m: raw / "omics" / f"{m}.csv" for m in MODALITIES if (raw / "omics" / f"{m}.csv").exists()}
        mappings = {m: raw / "mappings" / f"{m}.json" for m in omics}
        return cls(raw / "metadata.csv", raw / "features", omics, mappings)


# -- reading and validating inputs ----------------------------------------------------------

def canonical_features(groups: dict[str, list[str]]) -> list[str]:
    """Groups in order, features in group order, first appearance kept."""
    seen: dict[str, None] = {}
    for members in groups.values():
        for f in members:
            seen.setdefault(f, None)
    return list(seen)


def read_mapping(path: Path) -> dict[str, list[str]]:
    try:
        with open(path) as f:
            groups = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PrepareError(f"{path}: cannot read mapping JSON ({e})") from None
    if not isinstance(groups, dict) or not groups:
        raise PrepareError(f"{path}: expected a non-empty JSON object {{group: [feature names]}}")
    for g, members in groups.items():
        if not isinstance(members, list) or not members or not all(isinstance(f, str) for f in members):
            raise PrepareError(f"{path}: group {g!r}: expected a non-empty list of feature names")
    return groups


def read_metadata(path: Path) -> pd.DataFrame:
    try:
        meta = pd.read_csv(path, dtype={"submitter_id": str, "project_id": str, "split": str, "WSI": str},
                           keep_default_na=False, na_values=[""])
    except (OSError, pd.errors.ParserError) as e:
        raise PrepareError(f"{path}: cannot read metadata CSV ({e})") from None
    for col in ("submitter_id", "split", "WSI"):
        if col not in meta.columns:
            raise PrepareError(f"{path}: missing column {col!r} (has {list(meta.columns)[:10]})")
    if meta["submitter_id"].isna().any():
        raise PrepareError(f"{path}: column 'submitter_id' has empty values (row {int(meta['submitter_id'].isna().idxmax()) + 2})")
    dup = meta["submitter_id"][meta["submitter_id"].duplicated()]
    if len(dup):
        raise PrepareError(f"{path}: duplicate submitter_id {dup.iloc[0]!r} in column 'submitter_id'")
    bad = sorted(set(meta["split"].dropna()) - set(rec.SPLITS))
    if bad:
        raise PrepareError(f"{path}: column 'split' has unknown values {bad[:5]} (expected {list(rec.SPLITS)})")
    if "project_id" not in meta.columns:
        meta["project_id"] = "unknown"
    slides = []
    for i, raw in enumerate(meta["WSI"]):
        if pd.isna(raw) or str(raw).strip() == "":
            slides.append([])
            continue
        try:
            value = ast.literal_eval(str(raw))
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise PrepareError(f"{path}: row {i + 2} column 'WSI': expected a list of slide files like "
                               f"['a.h5'], got {str(raw)[:60]!r}")
        slides.append(list(value))
    meta["WSI"] = slides
    return meta


def read_omics(path: Path, modality: str, groups: dict[str, list[str]]) -> tuple[pd.DataFrame, int]:
    """Mapping features of one omics CSV as float32 (transforms applied) and the count of
    missing values filled."""
    features = canonical_features(groups)
    try:
        header = pd.read_csv(path, nrows=0, index_col=0)
    except (OSError, pd.errors.ParserError, ValueError) as e:
        raise PrepareError(f"{path}: cannot read omics CSV ({e})") from None
    absent = [f for f in features if f not in header.columns]
    if absent:
        raise PrepareError(f"{path}: {len(absent)} mapping features absent from the CSV columns, "
                           f"e.g. {absent[:5]}")
    df = pd.read_csv(path, index_col=0, usecols=[0] + [header.columns.get_loc(f) + 1 for f in features])
    df.index = df.index.astype(str)
    dup = df.index[df.index.duplicated()]
    if len(dup):
        raise PrepareError(f"{path}: duplicate submitter_id {dup[0]!r} in the index column")
    df = df[features]
    for col in df.columns:
        if not pd.api.types.is_numeric_dtype(df[col]):
            values = pd.to_numeric(df[col], errors="coerce")
            bad = df[col][values.isna() & df[col].notna()]
            if len(bad):
                raise PrepareError(f"{path}: column {col!r}: non-numeric value {bad.iloc[0]!r} "
                                   f"for submitter_id {bad.index[0]!r}")
            df[col] = values
    values = df.to_numpy(np.float64)
    if np.isinf(values).any():
        r, c = np.argwhere(np.isinf(values))[0]
        raise PrepareError(f"{path}: column {features[c]!r}: infinite value for submitter_id {df.index[r]!r}")
    if modality == "dnam":
        finite = values[~np.isnan(values)]
        if finite.size and (finite.min() < 0 or finite.max() > 1):
            raise PrepareError(f"{path}: DNA methylation beta values must lie in [0, 1] "
                               f"(found {finite.min():.3g}..{finite.max():.3g})")
    if modality == "cnv":
        finite = values[~np.isnan(values)]
        if finite.size and finite.min() < 0:
            raise PrepareError(f"{path}: copy numbers must be non-negative (found {finite.min():.3g})")
    n_missing = int(np.isnan(values).sum())
    values = np.where(np.isnan(values), FILL[modality], values)
    if modality == "cnv":
        values = np.log10(values / 2.0 + 1.0)
    return pd.DataFrame(values.astype(np.float32), index=df.index, columns=features), n_missing


def slide_shape(path: Path) -> tuple[int, int]:
    """(N, D) of a slide's ``features`` without reading it."""
    if not path.exists():
        raise PrepareError(f"{path}: slide HDF5 file listed in metadata column 'WSI' does not exist")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise PrepareError(f"{path}: no dataset 'features' (has {list(f.keys())[:5]})")
            shape = f["features"].shape
    except OSError as e:
        raise PrepareError(f"{path}: unreadable HDF5 ({e})") from None
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise PrepareError(f"{path}: dataset 'features' has shape {shape}, expected [1, N, D] or [N, D]")
    return int(shape[0]), int(shape[1])


def read_slide(path: Path, dim: int) -> np.ndarray:
    try:
        with h5py.File(path, "r") as f:
            x = f["features"][()]
    except (OSError, KeyError) as e:
        raise PrepareError(f"{path}: dataset 'features' unreadable or truncated ({e})") from None
    if x.ndim == 3:
        x = x[0]
    if x.shape[1] != dim:
        raise PrepareError(f"{path}: dataset 'features' has feature dim {x.shape[1]}, expected {dim}")
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise PrepareError(f"{path}: dataset 'features' has NaN/Inf values (first at patch {bad})")
    return x


# -- writing ----------------------------------------------------------------------------------

def _patient_seed(seed: int, submitter_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(submitter_id.encode())])


def _meta_value(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and np.isnan(v):
        return None
    return v


class _PatchWriter:
    """Writes rows into a zarr3 array in chunk-aligned blocks."""

    def __init__(self, path: Path, rows: int, dim: int, dtype: str, chunk_rows: int):
        self.store = ts.open(rec.zarr_spec(path, max(rows, 1), dim, dtype, chunk_rows)).result()
        self.chunk_rows = chunk_rows
        self.dtype = np.dtype(dtype) if dtype != "bfloat16" else None
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.written = 0

    def add(self, x: np.ndarray) -> None:
        self.pending.append(x)
        self.pending_rows += len(x)
        if self.pending_rows >= 8 * self.chunk_rows:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        if not self.pending:
            return
        block = np.concatenate(self.pending)
        n = len(block) if final else (len(block) // self.chunk_rows) * self.chunk_rows
        if n:
            self.store[self.written: self.written + n].write(block[:n]).result()
            self.written += n
        rest = block[n:]
        self.pending = [rest] if len(rest) else []
        self.pending_rows = len(rest)


def _cast_patches(x: np.ndarray, dtype: str, path: Path) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes
        return x.astype(ml_dtypes.bfloat16)
    out = x.astype(dtype)
    if not np.isfinite(out).all():
        raise PrepareError(f"{path}: dataset 'features' overflows {dtype} (choose --patch-dtype float32)")
    return out


def _write_shard(root: Path, split: str, shard: int, patients: list[dict], cohort: RawCohort,
                 omics: dict[str, pd.DataFrame], meta_cols: list[str], opts: PrepareOptions,
                 bar) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    rows = [p["patch_count"] for p in patients]
    final_patch = rec.patch_path(root, split, shard)
    final_rec = rec.record_path(root, split, shard)
    tmp_patch = final_patch.with_name(final_patch.name + ".tmp")
    tmp_rec = final_rec.with_name(final_rec.name + ".tmp")
    shutil.rmtree(tmp_patch, ignore_errors=True)
    writer = _PatchWriter(tmp_patch, sum(rows), opts.wsi_dim, opts.patch_dtype, opts.chunk_rows)
    records = ArrayRecordWriter(str(tmp_rec), "group_size:1")
    offset = 0
    for p, n in zip(patients, rows):
        parts = [read_slide(cohort.features_dir / s, opts.wsi_dim) for s in p["WSI"]]
        x = np.concatenate(parts) if len(parts) > 1 else parts[0]
        x = x[_patient_seed(opts.seed, p["submitter_id"]).permutation(len(x))]
        writer.add(_cast_patches(x, opts.patch_dtype, cohort.features_dir / p["WSI"][0]))
        record = {
            "submitter_id": p["submitter_id"], "project_id": str(p["project_id"]), "split": split,
            "index": p["index"], "patch_shard": shard, "patch_offset": offset, "patch_count": n,
            "slides": list(p["WSI"]),
            "omics": {m: (omics[m].loc[p["submitter_id"]].to_numpy(np.float32) if p["submitter_id"] in omics[m].index
                          else np.zeros(omics[m].shape[1], np.float32)) for m in omics},
            "available": {m: bool(p["submitter_id"] in omics[m].index) for m in omics},
            "meta": {c: _meta_value(p[c]) for c in meta_cols},
        }
        records.write(rec.encode_record(record))
        offset += n
        bar.update(1)
    writer.flush()
    records.close()
    shutil.rmtree(final_patch, ignore_errors=True)
    os.replace(tmp_patch, final_patch)
    os.replace(tmp_rec, final_rec)
    return {
        "split": split, "shard": shard, "num_records": len(patients), "num_patches": int(sum(rows)),
        "records": {"path": str(final_rec.relative_to(root)), "sha256": rec.sha256_file(final_rec)},
        "patches": {"path": str(final_patch.relative_to(root)), "sha256": rec.sha256_tree(final_patch)},
    }


def prepare(cohort: RawCohort, out: str | os.PathLike, opts: PrepareOptions | None = None) -> dict:
    """Validate the raw cohort and write the prepared dataset; returns the manifest."""
    opts = opts or PrepareOptions()
    out = Path(out)
    t0 = time.time()
    if (out / rec.MANIFEST).exists() and not opts.overwrite:
        raise PrepareError(f"{out}: a prepared dataset already exists (pass --overwrite to replace it)")
    if not cohort.omics:
        raise PrepareError("no omics CSV given (expected --omics rna=CSV dnam=CSV cnv=CSV)")
    for m in cohort.omics:
        if m not in MODALITIES:
            raise PrepareError(f"unknown modality {m!r} (expected one of {MODALITIES})")
        if m not in cohort.mappings:
            raise PrepareError(f"modality {m!r} has an omics CSV but no --mapping {m}=JSON")
    if not cohort.features_dir.is_dir():
        raise PrepareError(f"{cohort.features_dir}: features folder does not exist")
    modalities = [m for m in MODALITIES if m in cohort.omics]
    groups = {m: read_mapping(cohort.mappings[m]) for m in modalities}
    meta = read_metadata(cohort.metadata)
    omics, filled = {}, {}
    for m in modalities:
        omics[m], filled[m] = read_omics(cohort.omics[m], m, groups[m])

    skipped = {"no_slide": 0, "missing_modality": 0, "no_split": 0}
    keep = []
    for _, row in meta.iterrows():
        sid = row["submitter_id"]
        have = [m for m in modalities if sid in omics[m].index]
        problem = None
        if pd.isna(row["split"]):
            problem = "no_split"
        elif not row["WSI"]:
            problem = "no_slide"
        elif len(have) < len(modalities) and not (opts.allow_missing_modalities and have):
            problem = "missing_modality"
        if problem:
            if opts.strict:
                what = {"no_slide": "has no slide in column 'WSI'", "no_split": "has no 'split'",
                        "missing_modality": f"lacks omics {sorted(set(modalities) - set(have))}"}[problem]
                raise PrepareError(f"{cohort.metadata}: patient {sid!r} {what} (--strict)")
            skipped[problem] += 1
            continue
        keep.append(dict(row))
    meta_cols = [c for c in meta.columns if c not in RESERVED]

    (out / "records").mkdir(parents=True, exist_ok=True)
    (out / "patches").mkdir(parents=True, exist_ok=True)
    if (out / rec.MANIFEST).exists():
        os.remove(out / rec.MANIFEST)
    # Every slide's shape first (HDF5 metadata only): a missing, unreadable or mis-sized file
    # fails the run before anything is written.
    with tqdm(keep, desc="check slides", unit="patient", disable=not opts.progress) as bar:
        for row in bar:
            count = 0
            for s in row["WSI"]:
                n, d = slide_shape(cohort.features_dir / s)
                if d != opts.wsi_dim:
                    raise PrepareError(f"{cohort.features_dir / s}: dataset 'features' has feature dim {d}, "
                                       f"expected {opts.wsi_dim}")
                count += n
            row["patch_count"] = count
    shards, counts = [], {}
    with tqdm(total=len(keep), desc="prepare", unit="patient", disable=not opts.progress) as bar:
        for split in rec.SPLITS:
            patients = [dict(r) for r in keep if r["split"] == split]
            for i, p in enumerate(patients):
                p["index"] = i
            counts[split] = len(patients)
            for shard, start in enumerate(range(0, len(patients), opts.records_per_shard)):
                chunk = patients[start: start + opts.records_per_shard]
                shards.append(_write_shard(out, split, shard, chunk, cohort, omics, meta_cols, opts, bar))
    manifest = {
        "schema_version": rec.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "counts": counts,
        "skipped": skipped,
        "modalities": {m: {"groups": groups[m], "group_sizes": [len(v) for v in groups[m].values()],
                           "features": list(omics[m].columns), "fill": FILL[m], "transform": TRANSFORM[m],
                           "missing_filled": filled[m]} for m in modalities},
        "patches": {"dim": opts.wsi_dim, "dtype": opts.patch_dtype, "chunk_rows": opts.chunk_rows,
                    "shuffle_seed": opts.seed, "total": int(sum(s["num_patches"] for s in shards))},
        "meta_columns": meta_cols,
        "allow_missing_modalities": opts.allow_missing_modalities,
        "shards": shards,
        "sources": {"metadata": str(cohort.metadata), "features_dir": str(cohort.features_dir),
                    "omics": {m: str(p) for m, p in cohort.omics.items()},
                    "mappings": {m: str(p) for m, p in cohort.mappings.items()}},
        "seconds": round(time.time() - t0, 2),
    }
    rec.write_json_atomic(out / rec.MANIFEST, manifest)
    return manifest


def summary(manifest: dict) -> str:
    """Human-readable summary printed by `prepare` and `inspect`."""
    lines = ["patients: " + ", ".join(f"{s} {n}" for s, n in manifest["counts"].items())]
    if any(manifest.get("skipped", {}).values()):
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items() if v))
    for m, info in manifest["modalities"].items():
        sizes = info["group_sizes"]
        lines.append(f"{m}: {len(sizes)} groups (sizes {min(sizes)}-{max(sizes)}, {sum(sizes)} entries), "
                     f"{len(info['features'])} features, transform {info['transform']}, "
                     f"{info['missing_filled']} missing filled with {info['fill']}")
    p = manifest["patches"]
    n = sum(manifest["counts"].values())
    lines.append(f"patches: {p['total']} x {p['dim']} {p['dtype']} ({p['total'] / max(n, 1):.0f} per patient), "
                 f"chunks of {p['chunk_rows']} rows, {len(manifest['shards'])} shards")
    return "\n".join(lines)
