"""Raw cohort (`morpheus_jax.data.raw`) → prepared dataset (`morpheus_jax.data.records`).

1. Validate: mappings, metadata, every omics CSV (streamed into on-disk tables), every
   kept patient's slide shapes (HDF5 metadata only) — a bad input fails before any shard
   is written.
2. Plan shards: per split, ``records_per_shard`` patients in metadata order. Each shard has
   a plan hash (its patients, their slides' sizes and mtimes, their omics values, the
   options).
3. Write shards, in ``workers`` processes: each patient's slides are read, concatenated,
   shuffled (seeded per patient), cast and appended to the shard's zarr3 array; the
   records go to the shard's ArrayRecord file. Files are written under temporary names
   and renamed; a completion marker (``.prepare/shards/*.json``: plan hash + checksums)
   follows. A rerun skips shards whose marker matches the plan and whose checksums verify.
4. Write ``manifest.json`` last and remove the scratch folder.

Memory stays bounded by one shard's write buffer and one patient's bag per worker,
whatever the cohort size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorstore as ts
from tqdm.auto import tqdm

from morpheus_jax.core.atomic import write_json
from morpheus_jax.core import log
from morpheus_jax.core.log import progress_off
from morpheus_jax.core.errors import ConfigError, PrepareError
from morpheus_jax.core.manifest import SCHEMA_VERSION, Manifest, ModalityInfo, PatchInfo
from morpheus_jax.core.modality import ModalitySpec, check_name, ordered, spec_for
from morpheus_jax.core.names import SPLITS
from morpheus_jax.data import records as rec
from morpheus_jax.data.raw import (
    RESERVED,
    OmicsTable,
    RawCohort,
    RowReader,
    canonical_features,
    read_mapping,
    read_metadata,
    read_slide,
    slide_shape,
    stream_omics,
)

__all__ = ["PrepareError", "PrepareOptions", "RawCohort", "canonical_features", "prepare", "summary"]

SCRATCH = ".prepare"
# Fine-tuning cohorts need a slide and a label, not omics (the authors'): patients of this
# split lacking a modality are kept with it marked unavailable.
FINETUNE_SPLIT = "fine-tune"
PATCH_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass
class PrepareOptions:
    records_per_shard: int = 128
    patch_dtype: str = "float16"
    chunk_rows: int = 128
    wsi_dim: int = 1536
    seed: int = 0
    workers: int = 1
    strict: bool = False
    allow_missing_modalities: bool = False
    overwrite: bool = False
    progress: bool = True
    max_skipped: float = 0.5           # the largest fraction of metadata rows that may be skipped
    modality_specs: dict[str, ModalitySpec] = dataclasses.field(default_factory=dict)   # --modality-spec FILE

    def __post_init__(self):
        """Checked before anything is read or written; named by their ``prepare`` flags."""
        for flag, value in (("--records-per-shard", self.records_per_shard), ("--chunk-rows", self.chunk_rows),
                            ("--wsi-dim", self.wsi_dim), ("--workers", self.workers)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise PrepareError(f"{flag} must be a positive integer, got {value!r}")
        if self.patch_dtype not in PATCH_DTYPES:
            raise PrepareError(f"--patch-dtype must be one of {', '.join(PATCH_DTYPES)}, got {self.patch_dtype!r}")
        if not 0.0 <= float(self.max_skipped) <= 1.0:
            raise PrepareError(f"--max-skipped must be a fraction in [0, 1], got {self.max_skipped!r}")


@dataclasses.dataclass
class ShardTask:
    """Everything a worker needs to write one shard (picklable)."""

    root: str
    split: str
    shard: int
    patients: list[dict]
    features_dir: str
    omics: dict[str, tuple[str, int]]          # modality → (table path, features)
    opts: PrepareOptions
    plan_hash: str = ""


# -- planning ---------------------------------------------------------------------------------

def _select(meta: pd.DataFrame, tables: dict[str, OmicsTable], metadata_path: Path,
            opts: PrepareOptions) -> tuple[list[dict], dict[str, int]]:
    skipped = {"no_slide": 0, "missing_modality": 0, "no_split": 0}
    keep = []
    modalities = list(tables)
    for row in meta.to_dict("records"):
        sid = row["submitter_id"]
        have = [m for m in modalities if sid in tables[m].rows]
        problem = None
        if pd.isna(row["split"]):
            problem = "no_split"
        elif not row["WSI"]:
            problem = "no_slide"
        elif len(have) < len(modalities) and not (opts.allow_missing_modalities and have) and not (
                row["split"] == FINETUNE_SPLIT and not opts.strict):
            problem = "missing_modality"
        if problem:
            if opts.strict:
                what = {"no_slide": "has no slide in column 'WSI'", "no_split": "has no 'split'",
                        "missing_modality": f"lacks omics {sorted(set(modalities) - set(have))}"}[problem]
                raise PrepareError(f"{metadata_path}: patient {sid!r} {what} (--strict)")
            skipped[problem] += 1
            continue
        row["omics_rows"] = {m: tables[m].rows.get(sid, -1) for m in modalities}
        keep.append(row)
    _explain_id_mismatch(meta, tables, metadata_path)
    return keep, skipped


def _id_key(sid: str) -> str:
    """An id with the differences that usually mean "the same patient, written differently"
    removed: surrounding whitespace, letter case, leading zeros."""
    return sid.strip().lower().lstrip("0") or "0"


def _explain_id_mismatch(meta: pd.DataFrame, tables: dict[str, OmicsTable], metadata_path: Path) -> None:
    """Patients lacking a modality only because their id is written differently in its CSV
    (whitespace, case, leading zeros) are an error naming both spellings, not a silent skip."""
    ids = [str(s) for s in meta["submitter_id"]]
    for m, table in tables.items():
        keys = {_id_key(s): s for s in table.rows}
        for sid in ids:
            if sid not in table.rows and _id_key(sid) in keys:
                other = keys[_id_key(sid)]
                raise PrepareError(f"{metadata_path}: submitter_id {sid!r} appears in the {m} CSV as {other!r} "
                                   f"(whitespace, case or leading zeros differ); ids must match exactly")


def _check_kept(meta: pd.DataFrame, tables: dict[str, OmicsTable], keep: list[dict], skipped: dict[str, int],
                metadata_path: Path, opts: PrepareOptions) -> None:
    """A prepare that would leave a split empty, or skip more than ``max_skipped`` of the
    metadata's patients, fails with the reasons counted and where the patients went missing."""
    listed = {s: int((meta["split"] == s).sum()) for s in SPLITS}
    empty = [s for s in SPLITS if listed[s] and not any(r["split"] == s for r in keep)]
    n_skipped = sum(skipped.values())
    if not (empty or not keep or n_skipped > opts.max_skipped * len(meta)):
        return
    reasons = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in skipped.items() if n) or "none"
    ids = [str(x) for x in meta["submitter_id"]]
    where = [f"the {m} CSV lacks {len(absent)} of the {len(ids)} ids (e.g. {absent[0]!r})"
             for m, t in tables.items() for absent in [[x for x in ids if x not in t.rows]] if absent]
    if any(x != x.strip() for x in ids):
        where.append("some submitter_ids have surrounding whitespace")
    what = (f"no patient of split {', '.join(empty) or 'any'} is left" if empty or not keep else
            f"{n_skipped} of {len(meta)} patients would be skipped (more than --max-skipped {opts.max_skipped:g})")
    raise PrepareError(f"{metadata_path}: {what} (skipped: {reasons}{'; ' if where else ''}{'; '.join(where)}); "
                       "check that submitter_id matches the omics CSVs' index exactly and every patient has slides "
                       "and a split (or pass --allow-missing-modalities, or --max-skipped 1 to accept)")


def _check_slides(keep: list[dict], features_dir: Path, opts: PrepareOptions) -> None:
    """Fill ``patch_count`` and ``slide_stats`` of each kept patient from HDF5 metadata."""
    def one(row):
        count, stats = 0, []
        for s in row["WSI"]:
            path = features_dir / s
            n, d = slide_shape(path)
            if d != opts.wsi_dim:
                raise PrepareError(f"{path}: dataset 'features' has feature dim {d}, expected {opts.wsi_dim}")
            st = path.stat()
            count += n
            stats.append([s, n, st.st_size, st.st_mtime_ns])
        return count, stats

    with ThreadPoolExecutor(max_workers=8) as pool, \
            tqdm(total=len(keep), desc="check slides", unit="patient", disable=progress_off(opts.progress)) as bar:
        for row, (count, stats) in zip(keep, pool.map(one, keep)):
            row["patch_count"], row["slide_stats"] = count, stats
            bar.update(1)


def _plan_hash(task: ShardTask, tables: dict) -> str:
    h = hashlib.sha256()
    o = task.opts
    h.update(json.dumps([SCHEMA_VERSION, task.split, task.shard, o.patch_dtype, o.chunk_rows, o.wsi_dim,
                         o.seed], sort_keys=True).encode())
    for p in task.patients:
        h.update(json.dumps([p["submitter_id"], p["index"], p["slide_stats"], str(p["project_id"]),
                             {k: _meta_value(p[k]) for k in p["meta_cols"]}], sort_keys=True, default=str).encode())
        for m, row in sorted(p["omics_rows"].items()):
            if row >= 0:
                h.update(tables[m][row].tobytes())
    return h.hexdigest()


def _marker_path(root: Path, split: str, shard: int) -> Path:
    return root / SCRATCH / "shards" / f"{split}-{shard:05d}.json"


def _completed(root: Path, task: ShardTask) -> dict | None:
    """The shard's manifest entry if a previous run completed it under the same plan."""
    path = _marker_path(root, task.split, task.shard)
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if marker.get("plan_hash") != task.plan_hash:
        return None
    entry = marker["entry"]
    for kind, checker in (("records", rec.sha256_file), ("patches", rec.sha256_tree)):
        p = root / entry[kind]["path"]
        if not p.exists() or checker(p) != entry[kind]["sha256"]:
            return None
    return entry


# -- writing (runs in workers) ------------------------------------------------------------------

def _patient_rng(seed: int, submitter_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(submitter_id.encode())])


def _meta_value(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and np.isnan(v):
        return None
    return v


class _PatchWriter:
    """Appends rows to a zarr3 array in chunk-aligned blocks (no read-modify-write)."""

    def __init__(self, path: Path, rows: int, dim: int, dtype: str, chunk_rows: int):
        self.store = ts.open(rec.zarr_spec(path, max(rows, 1), dim, dtype, chunk_rows)).result()
        self.chunk_rows = chunk_rows
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
        import ml_dtypes  # lazy: start-up time
        return x.astype(ml_dtypes.bfloat16)
    out = x.astype(dtype)
    if not np.isfinite(out).all():
        raise PrepareError(f"{path}: dataset 'features' overflows {dtype} (use --patch-dtype float32)")
    return out


def write_shard(task: ShardTask) -> dict:
    """Write one shard (patch array, records, completion marker); returns its manifest entry."""
    from array_record.python.array_record_module import ArrayRecordWriter  # lazy: start-up time

    root, opts, features_dir = Path(task.root), task.opts, Path(task.features_dir)
    tables = {m: RowReader(p, f) for m, (p, f) in task.omics.items()}
    final_patch = rec.patch_path(root, task.split, task.shard)
    final_rec = rec.record_path(root, task.split, task.shard)
    tmp_patch = final_patch.with_name(final_patch.name + ".tmp")
    tmp_rec = final_rec.with_name(final_rec.name + ".tmp")
    shutil.rmtree(tmp_patch, ignore_errors=True)
    total = sum(p["patch_count"] for p in task.patients)
    writer = _PatchWriter(tmp_patch, total, opts.wsi_dim, opts.patch_dtype, opts.chunk_rows)
    records = ArrayRecordWriter(str(tmp_rec), "group_size:1")
    offset = 0
    for p in task.patients:
        parts = [read_slide(features_dir / s, opts.wsi_dim) for s in p["WSI"]]
        x = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if len(x) != p["patch_count"]:
            raise PrepareError(f"{features_dir / p['WSI'][0]}: patch count changed while preparing")
        x = x[_patient_rng(opts.seed, p["submitter_id"]).permutation(len(x))]
        writer.add(_cast_patches(x, opts.patch_dtype, features_dir / p["WSI"][0]))
        record = {
            "submitter_id": p["submitter_id"], "project_id": str(p["project_id"]), "split": task.split,
            "index": p["index"], "patch_shard": task.shard, "patch_offset": offset, "patch_count": len(x),
            "slides": list(p["WSI"]),
            "omics": {m: (tables[m][r] if r >= 0 else np.zeros(tables[m].width, np.float32))
                      for m, r in p["omics_rows"].items()},
            "available": {m: bool(r >= 0) for m, r in p["omics_rows"].items()},
            "meta": {c: _meta_value(p[c]) for c in p["meta_cols"]},
        }
        records.write(rec.encode_record(record))
        offset += len(x)
    writer.flush()
    records.close()
    for t in tables.values():
        t.close()
    shutil.rmtree(final_patch, ignore_errors=True)
    os.replace(tmp_patch, final_patch)
    os.replace(tmp_rec, final_rec)
    entry = {
        "split": task.split, "shard": task.shard, "num_records": len(task.patients), "num_patches": int(total),
        "records": {"path": str(final_rec.relative_to(root)), "bytes": final_rec.stat().st_size,
                    "sha256": rec.sha256_file(final_rec)},
        "patches": {"path": str(final_patch.relative_to(root)), "sha256": rec.sha256_tree(final_patch)},
    }
    marker = _marker_path(root, task.split, task.shard)
    write_json(marker, {"plan_hash": task.plan_hash, "entry": entry})
    return entry


# -- the whole run ------------------------------------------------------------------------------------

# What `prepare` writes into a dataset folder; a folder holding anything else is not ours to replace.
OWN_ENTRIES = {rec.MANIFEST, "records", "patches", SCRATCH}


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:     # a symlink loop: RuntimeError before Python 3.13
        raise PrepareError(f"{path}: cannot resolve the path ({e})") from None


def _inputs_overlap(out: Path, cohort: RawCohort) -> str | None:
    """Why ``out`` may not be written: it is, holds or lies inside an input (None if it may)."""
    out = _resolved(out)
    files = [_resolved(Path(p)) for p in (cohort.metadata, *cohort.omics.values(), *cohort.mappings.values())]
    folder = _resolved(Path(cohort.features_dir))
    for f in files:
        if f == out or out in f.parents:
            return f"it holds the input {f}"
    if folder == out or out in folder.parents:
        return f"it holds the input folder {folder}"
    if folder in out.parents:
        return f"it lies inside the input folder {folder}"
    return None


def _work_dir(out: Path, cohort: RawCohort, opts: PrepareOptions) -> Path:
    """Where this run writes: ``out`` itself (new, empty, or an interrupted prepare's own files
    to resume), or, to replace a complete dataset (``overwrite``), a staging folder beside it
    that is swapped in only once the new dataset is complete. Refuses, before anything is
    written, an ``out`` that is a file, overlaps an input, or holds files prepare did not write."""
    why = _inputs_overlap(out, cohort)
    if why:
        raise PrepareError(f"--out {out}: {why}; write the dataset to a folder of its own")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: is a file, not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES) if out.is_dir() else []
    if foreign:
        raise PrepareError(f"--out {out}: holds files prepare did not write ({', '.join(foreign[:3])}"
                           f"{', …' if len(foreign) > 3 else ''}); give a new or empty folder")
    if not (out / rec.MANIFEST).exists():
        return out
    if not opts.overwrite:
        raise PrepareError(f"{out}: a prepared dataset already exists (pass --overwrite to replace it)")
    return out.with_name(f".{out.name}.preparing")


def _clean_failed(out: Path, fresh: bool) -> None:
    """After a failed or interrupted run: keep only what a rerun resumes (completed shards and
    their markers); no half-written ``.tmp`` arrays, scratch tables or empty folders. A folder
    this run created with nothing worth resuming is removed entirely."""
    if not out.is_dir():
        return
    if fresh and not any((out / SCRATCH / "shards").glob("*.json")):
        shutil.rmtree(out, ignore_errors=True)
        return
    for folder in ("records", "patches"):
        for tmp in (out / folder).glob("*.tmp"):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    for table in (out / SCRATCH).glob("omics-*.f32"):
        table.unlink()
    for folder in ("records", "patches", SCRATCH):
        try:
            (out / folder).rmdir()                   # only if empty
        except OSError:
            pass


def _swap_in(work: Path, out: Path) -> None:
    """Replace the dataset at ``out`` by the complete one at ``work`` (two renames)."""
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old)


def prepare(cohort: RawCohort, out: str | os.PathLike, opts: PrepareOptions | None = None) -> Manifest:
    """Validate the raw cohort and write (or finish writing) the prepared dataset at ``out``.

    Replacing a dataset (``overwrite``) writes the new one beside it and swaps it in when
    complete: a failure leaves the old dataset as it was."""
    opts = opts or PrepareOptions()
    final, t0 = Path(out), time.time()
    out = _work_dir(final, cohort, opts)
    fresh = not out.exists()
    try:
        manifest = _prepare(cohort, out, opts, t0)
    except BaseException:
        _clean_failed(out, fresh)
        raise
    if out != final:
        _swap_in(out, final)
    return manifest


def _prepare(cohort: RawCohort, out: Path, opts: PrepareOptions, t0: float) -> Manifest:
    if not cohort.omics:
        raise PrepareError("no omics CSV given (expected --omics rna=CSV dnam=CSV cnv=CSV)")
    for m in cohort.omics:
        try:
            check_name(m, f"--omics {m}={cohort.omics[m]}")
        except ConfigError as e:
            raise PrepareError(str(e)) from None
        if m not in cohort.mappings:
            raise PrepareError(f"modality {m!r} has an omics CSV but no --mapping {m}=JSON")
    if not cohort.features_dir.is_dir():
        raise PrepareError(f"{cohort.features_dir}: features folder does not exist")
    modalities = ordered(cohort.omics)
    specs = _specs(modalities, opts)
    groups = {m: read_mapping(cohort.mappings[m]) for m in modalities}
    meta = read_metadata(cohort.metadata)
    scratch = out / SCRATCH
    tables = {m: stream_omics(cohort.omics[m], specs[m], groups[m], scratch / f"omics-{m}.f32") for m in modalities}
    keep, skipped = _select(meta, tables, cohort.metadata, opts)
    _check_kept(meta, tables, keep, skipped, cohort.metadata, opts)
    meta_cols = [c for c in meta.columns if c not in RESERVED]
    _check_slides(keep, cohort.features_dir, opts)

    readers = {m: t.reader() for m, t in tables.items()}
    omics_spec = {m: (str(t.path), len(t.features)) for m, t in tables.items()}
    tasks, counts = [], {}
    for split in SPLITS:
        patients = [r for r in keep if r["split"] == split]
        counts[split] = len(patients)
        for i, p in enumerate(patients):
            p["index"], p["meta_cols"] = i, meta_cols
        for shard, start in enumerate(range(0, len(patients), opts.records_per_shard)):
            task = ShardTask(str(out), split, shard, patients[start: start + opts.records_per_shard],
                             str(cohort.features_dir), omics_spec, opts)
            task.plan_hash = _plan_hash(task, readers)
            tasks.append(task)
    for r in readers.values():
        r.close()
    (out / "records").mkdir(parents=True, exist_ok=True)
    (out / "patches").mkdir(parents=True, exist_ok=True)

    entries: dict[tuple[str, int], dict] = {}
    pending = []
    for task in tasks:
        done = _completed(out, task)
        if done is not None:
            entries[(task.split, task.shard)] = done
        else:
            pending.append(task)
    resumed = len(entries)
    with tqdm(total=len(keep), desc="prepare", unit="patient", disable=progress_off(opts.progress)) as bar:
        bar.update(sum(len(t.patients) for t in tasks if (t.split, t.shard) in entries))
        if opts.workers > 1 and len(pending) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=opts.workers, mp_context=ctx) as pool:
                futures = {pool.submit(write_shard, t): t for t in pending}
                try:
                    while futures:
                        finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            task = futures.pop(fut)
                            entries[(task.split, task.shard)] = fut.result()
                            bar.update(len(task.patients))
                except BaseException:
                    for fut in futures:                  # shards not started yet are not written
                        fut.cancel()
                    raise
        else:
            for task in pending:
                entries[(task.split, task.shard)] = write_shard(task)
                bar.update(len(task.patients))

    manifest = Manifest(
        counts=counts, skipped=skipped, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        modalities={m: ModalityInfo(groups[m], tables[m].features, specs[m], tables[m].missing_filled)
                    for m in modalities},
        patches=PatchInfo(opts.wsi_dim, opts.patch_dtype, opts.chunk_rows, opts.seed,
                          int(sum(e["num_patches"] for e in entries.values()))),
        meta_columns=meta_cols, allow_missing_modalities=opts.allow_missing_modalities,
        shards=[entries[(t.split, t.shard)] for t in tasks],
        sources={"metadata": str(cohort.metadata), "features_dir": str(cohort.features_dir),
                 "omics": {m: str(p) for m, p in cohort.omics.items()},
                 "mappings": {m: str(p) for m, p in cohort.mappings.items()}},
        resumed_shards=resumed, seconds=round(time.time() - t0, 2))
    write_json(out / rec.MANIFEST, manifest.to_json())
    shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def _specs(modalities: list[str], opts: PrepareOptions) -> dict[str, ModalitySpec]:
    """Each modality's spec; a name with neither a built-in nor a given spec gets the
    default, said in one line."""
    stray = sorted(set(opts.modality_specs) - set(modalities))
    if stray:
        raise PrepareError(f"--modality-spec names {stray[0]!r}, which has no omics CSV (have {', '.join(modalities)})")
    specs = {}
    for m in modalities:
        specs[m], default = spec_for(m, opts.modality_specs)
        if default:
            log.info(f"prepare: modality {m!r} has no built-in spec: values as given, finite where present, "
                     "missing -> 0 (set fill, transform and range with --modality-spec FILE)")
    return specs


def summary(manifest: Manifest) -> str:
    """Human-readable summary printed by `prepare` and `inspect`."""
    lines = ["patients: " + ", ".join(f"{s} {n}" for s, n in manifest.counts.items())]
    if any(manifest.skipped.values()):
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in manifest.skipped.items() if v))
    for m, info in manifest.modalities.items():
        sizes = info.group_sizes
        lines.append(f"{m}: {len(sizes)} groups (sizes {min(sizes)}-{max(sizes)}, {sum(sizes)} entries), "
                     f"{len(info.features)} features, transform {info.transform}, "
                     f"{info.missing_filled} missing filled with {info.fill}")
    p = manifest.patches
    n = sum(manifest.counts.values())
    lines.append(f"patches: {p.total} x {p.dim} {p.dtype} ({p.total / max(n, 1):.0f} per patient), "
                 f"chunks of {p.chunk_rows} rows, {len(manifest.shards)} shards")
    if manifest.resumed_shards:
        lines.append(f"resumed: {manifest.resumed_shards} shards from an earlier run were verified and kept")
    return "\n".join(lines)
