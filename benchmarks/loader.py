"""Input pipeline throughput: our prepared records vs the authors' HDF5 path, side by side.

A synthetic cohort with TCGA-sized bags (float32 HDF5 files, ~10,000 patches of 1536 dims
per patient on average, ~60 MB each) and the paper's omics groups (50 per modality) is
written once into ``--work`` and prepared. With
the page cache warm, the same number of Grain worker processes runs:

  raw read    every HDF5 file read sequentially (the storage bandwidth bound)
  authors     per sample: open the patient's HDF5 files, read every patch, subsample
              ``num_patches`` in memory, build each group's omics from a pandas row
  ours        `morpheus_jax.data.pipeline`: a fresh random subset of the pre-shuffled float16
              patches (whole chunk segments), with ``--workers`` Grain worker processes and,
              separately, with as many reader threads in the training process
              (``data.worker_count=0``); in the same run, the previous sampler (one
              contiguous window) in threads, and how often two patches share a bag against
              uniform sampling under each

and prints samples/s, MB/s and bytes read per sample for both paths, with the ratios.

    python benchmarks/loader.py [--patients 48] [--batch 32] [--workers 2] [--batches 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import grain
import h5py
import numpy as np
import pandas as pd


from train_step import cpu_model  # noqa: E402  (the script's folder is on sys.path)

from morpheus_jax.core.config import DataConfig  # noqa: E402


class AuthorsSample(grain.transforms.Map):
    """The authors' loader, per sample (written here from their description)."""

    def __init__(self, raw: str, num_patches: int, seed: int):
        self.raw, self.num_patches, self.seed = raw, num_patches, seed
        self._omics = None

    def _tables(self):
        if self._omics is None:  # reader threads may race here; build, then publish
            raw = Path(self.raw)
            tables = {}
            for m in ("rna", "dnam", "cnv"):
                groups = json.loads((raw / "mappings" / f"{m}.json").read_text())
                tables[m] = (pd.read_csv(raw / "omics" / f"{m}.csv", index_col=0), groups)
            self._omics = tables
        return self._omics

    def map(self, row: dict) -> dict:
        rng = np.random.default_rng([self.seed, row["i"]])
        bags = []
        nbytes = 0
        for slide in row["slides"]:
            with h5py.File(Path(self.raw) / "features" / slide, "r") as f:
                x = f["features"][()]
                nbytes += x.nbytes
            bags.append(x.reshape(-1, x.shape[-1]))
        bag = np.concatenate(bags)
        n = len(bag)
        idx = rng.choice(n, self.num_patches, replace=n < self.num_patches)
        out = {"wsi": bag[idx].astype(np.float32), "bytes_read": np.int64(nbytes)}
        for m, (df, groups) in self._tables().items():
            series = df.loc[row["submitter_id"]]
            out[m] = np.concatenate([series[feats].to_numpy(np.float32) for feats in groups.values()])
        return out


def _cohort(work: Path, patients: int, patches: int) -> tuple[Path, Path, list[dict]]:
    from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare
    from morpheus_jax.data.records import MANIFEST
    from morpheus_jax.data.synth import write_synthetic_cohort

    raw, ds = work / "raw", work / "dataset"
    if not (raw / "metadata.csv").exists():
        shutil.rmtree(raw, ignore_errors=True)
        print(f"writing {patients} patients with ~{patches} patches each into {raw} …", file=sys.stderr)
        # TCGA-like: float32 HDF5 bags of ~10k patches, the paper's 3 x 50 omics groups.
        sizes = json.loads((Path(__file__).resolve().parent.parent / "morpheus_jax" / "configs" /
                            "paper_group_sizes.json").read_text())
        write_synthetic_cohort(raw, n_patients=patients, seed=0, mean_patches_per_slide=int(patches / 1.25),
                               group_sizes={m: v["sizes"] for m, v in sizes.items()},
                               unique_features={m: v["unique_features"] for m, v in sizes.items()},
                               float16_fraction=0.0, squeezed_fraction=0.0, empty_slide_fraction=0.0,
                               omics_missing_fraction=0.0, finetune_fraction=0.0, val_fraction=0.05)
    if not (ds / MANIFEST).exists():
        shutil.rmtree(ds, ignore_errors=True)
        prepare(RawCohort.from_dir(raw), ds, PrepareOptions(workers=2))
    meta = pd.read_csv(raw / "metadata.csv")
    import ast
    rows = [{"i": i, "submitter_id": r.submitter_id, "slides": ast.literal_eval(r.WSI)}
            for i, r in enumerate(meta.itertuples()) if r.split == "pretrain"]
    return raw, ds, rows


def _warm(paths: list[Path]) -> tuple[float, float]:
    """Read every file once (page cache), then time a second sequential pass; GB, GB/s."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    t = time.perf_counter()
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                total += len(block)
    return total / 1e9, total / 1e9 / (time.perf_counter() - t)


def raw_read_bandwidth(paths: list[Path], batch_bytes: int, passes: int = 3, fresh: bool = False) -> float:
    """Bytes/s of one thread reading ``paths`` (already in the page cache) one after the
    other into a batch-sized buffer, each file at the next offset: the page-cache limit of
    building batches in memory, without any sampling or decoding. The buffer is reused
    (wrapping), or with ``fresh`` a new one is allocated whenever one is full, as a loader
    handing each batch to its consumer must (the kernel then zeroes every page on first
    touch). Best of ``passes``."""
    best = 0.0
    for _ in range(passes):
        buf = memoryview(np.empty(batch_bytes, np.uint8))
        total, pos, t = 0, 0, time.perf_counter()
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if pos + size > batch_bytes:
                    pos = 0
                    if fresh:
                        buf = memoryview(np.empty(batch_bytes, np.uint8))
                n = f.readinto(buf[pos: pos + size])
                total, pos = total + n, pos + n
        best = max(best, total / (time.perf_counter() - t))
    return best


def per_sample_costs(ds_dir: Path, num_patches: int, samples: int = 200) -> dict:
    """Microseconds per sample of each piece of the host work, one thread: record decode,
    the span draw, the patch read (direct `records.RawChunks` reads, and the same spans
    through TensorStore for comparison), omics arrays, and allocating a sample's batch row
    (first touch of fresh memory)."""
    import tensorstore as ts

    from morpheus_jax.data import pipeline
    from morpheus_jax.data import records as rec

    manifest = rec.load_manifest(ds_dir)
    paths = [str(ds_dir / p) for p in manifest.shard_paths("pretrain")]
    source = grain.sources.ArrayRecordDataSource(paths)
    raw_records = [source[i] for i in range(len(source))]
    records = [rec.decode_record(r) for r in raw_records]
    rng = np.random.default_rng(0)
    dim, dtype = manifest.patches.dim, rec.patch_numpy_dtype(manifest.patches.dtype)
    out = np.empty((num_patches, dim), dtype)

    def us(fn) -> float:
        fn(0)
        t = time.perf_counter()
        for i in range(samples):
            fn(i)
        return round((time.perf_counter() - t) / samples * 1e6, 1)

    def spans(r):
        return pipeline.draw_spans(r["patch_offset"], r["patch_count"], num_patches, 128, rng)

    def direct(i):
        r = records[i % len(records)]
        raw, row = pipeline._raw(rec.patch_path(ds_dir, r["split"], r["patch_shard"])), 0
        for a, b in spans(r):
            raw.read_into(a, b, out[row: row + b - a])
            row += b - a

    def tensorstore(i):
        r = records[i % len(records)]
        store, row, pending = pipeline._store(rec.patch_path(ds_dir, r["split"], r["patch_shard"])), 0, []
        for a, b in spans(r):
            pending.append(ts.array(out[row: row + b - a], copy=False, write=True).write(store[a:b]))
            row += b - a
        for p in pending:
            p.result()

    return {"decode_record": us(lambda i: rec.decode_record(raw_records[i % len(raw_records)])),
            "draw_spans": us(lambda i: spans(records[i % len(records)])),
            "patch_read_direct": us(direct), "patch_read_tensorstore": us(tensorstore),
            "omics_arrays": us(lambda i: pipeline.omics_arrays(records[i % len(records)], ("rna", "dnam", "cnv"))),
            "allocate_row": us(lambda i: np.empty((num_patches, dim), dtype).fill(0)),
            "sample_bytes": out.nbytes}


def _h5_read_bandwidth(raw: Path, rows: list[dict]) -> float:
    t = time.perf_counter()
    total = 0
    for r in rows:
        for s in r["slides"]:
            with h5py.File(raw / "features" / s, "r") as f:
                total += f["features"][()].nbytes
    return total / 1e6 / (time.perf_counter() - t)


def _time(it, batches: int, warmup: int = 3) -> tuple[float, float, int]:
    for _ in range(warmup):
        next(it)
    nbytes, samples = 0, 0
    t = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        nbytes += int(np.sum(b["bytes_read"]))
        samples += len(b["bytes_read"])
    dt = time.perf_counter() - t
    return samples / dt, nbytes / 1e6 / dt, nbytes // samples


def window_sample(root, record, num_patches, rng, out=None):
    """The previous sampler, for comparison: one random contiguous window of the stored rows
    (wrapping around), so a patient has only ``patch_count`` distinct bags."""
    import tensorstore as ts

    from morpheus_jax.data import pipeline
    from morpheus_jax.data import records as rec

    off, n = record["patch_offset"], record["patch_count"]
    store = pipeline._store(rec.patch_path(root, record["split"], record["patch_shard"]))
    if out is None:
        out = np.empty((num_patches, store.shape[1]), store.dtype.numpy_dtype)
    start = int(rng.integers(n))
    end = start + num_patches
    spans = [(off + start, off + min(end, n))] + ([(off, off + end - n)] if end > n else [])
    row = 0
    for a, b in spans:
        ts.array(out[row: row + b - a], copy=False, write=True).write(store[a:b]).result()
        row += b - a
    return out, sum(pipeline.chunk_bytes(root, record["split"], record["patch_shard"], a, b) for a, b in spans)


def diversity(draw, n: int, k: int, draws: int = 4000, seed: int = 0) -> dict:
    """How often two patches share a bag, against uniform sampling (k of n: rate k(k-1)/(n(n-1))):
    for stored neighbours (rows i, i+1, the same chunk), for pairs 8 chunks apart, and the
    number of distinct bags among ``draws``. ``draw(rng) → sorted row indices`` in [0, n)."""
    rng = np.random.default_rng(seed)
    near = far = 0
    pairs = np.arange(0, n - 1025, 97)
    bags = set()
    for _ in range(draws):
        rows = draw(rng)
        member = np.zeros(n, bool)
        member[rows] = True
        near += int(np.sum(member[pairs] & member[pairs + 1]))
        far += int(np.sum(member[pairs] & member[pairs + 1024]))
        bags.add(hash(rows.tobytes()))
    uniform = k * (k - 1) / (n * (n - 1)) * draws * pairs.size
    return {"neighbours_vs_uniform": round(near / uniform, 2), "far_pairs_vs_uniform": round(far / uniform, 2),
            "distinct_bags": len(bags), "draws": draws}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="benchmarks/.work/loader", help="cohort folder (reused across runs)")
    ap.add_argument("--patients", type=int, default=48, help="patients in the synthetic cohort")
    ap.add_argument("--patches", type=int, default=10000, help="mean patches per patient")
    ap.add_argument("--batch", type=int, default=32, help="batch size")
    ap.add_argument("--workers", type=int, default=2, help="Grain worker processes, both paths")
    ap.add_argument("--num-patches", type=int, default=1024, help="patches per sample")
    ap.add_argument("--batches", type=int, default=30, help="timed batches (ours)")
    ap.add_argument("--prefetch", type=int, default=DataConfig().prefetch_buffer,
                    help="data.prefetch_buffer of the in-process path: its reader threads (default: the config's)")
    ap.add_argument("--authors-batches", type=int, default=4, help="timed batches (authors' path)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from morpheus_jax.data import pipeline

    raw, ds_dir, rows = _cohort(Path(args.work), args.patients, args.patches)
    h5_files = [raw / "features" / s for r in rows for s in r["slides"]]
    zarr_files = [p for p in (ds_dir / "patches").rglob("*") if p.is_file()]
    gb, seq = _warm(h5_files + zarr_files)
    h5_mb_s = _h5_read_bandwidth(raw, rows)
    bag_mb = np.mean([sum(h5py.File(raw / "features" / s)["features"].size * 4 for s in r["slides"]) for r in rows]) / 1e6

    ours_ds = pipeline.train_dataset(ds_dir, "pretrain", global_batch=args.batch, num_patches=args.num_patches,
                                     seed=0, modalities=("rna", "dnam", "cnv"))
    it = pipeline.train_iterator(ours_ds, 0, prefetch=args.prefetch)
    threads = _time(it, args.batches)
    it.close_reader()
    fresh = pipeline.sample_patches            # the same run with the previous window sampler
    pipeline.sample_patches = window_sample
    try:
        it = pipeline.train_iterator(ours_ds, 0, prefetch=args.prefetch)
        window = _time(it, args.batches)
        it.close_reader()
    finally:
        pipeline.sample_patches = fresh
    n, k, c = 10000, args.num_patches, 128
    div_fresh = diversity(lambda rng: pipeline.draw_rows(37, n, k, c, rng) - 37, n, k)

    def window_rows(rng):
        start = int(rng.integers(n))
        return np.sort(np.arange(start, start + k) % n)
    div_window = diversity(window_rows, n, k)
    it = pipeline.train_iterator(ours_ds, args.workers, prefetch=1)
    ours = _time(it, args.batches)
    it.close_reader()

    authors_ds = (grain.MapDataset.source(rows).shuffle(seed=0).repeat()
                  .map(AuthorsSample(str(raw), args.num_patches, 0)).batch(args.batch, drop_remainder=True))
    a_it = authors_ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    if args.workers:
        a_it = a_it.mp_prefetch(grain.MultiprocessingOptions(num_workers=args.workers))
    authors = _time(iter(a_it), args.authors_batches, warmup=1)

    sample_bytes = args.num_patches * 1536 * 2
    raw_bps = raw_read_bandwidth([p for p in zarr_files if p.name != "zarr.json" and p.parts[-4].startswith("pretrain-")],
                                 args.batch * sample_bytes)
    raw_fresh_bps = raw_read_bandwidth([p for p in zarr_files if p.name != "zarr.json"
                                        and p.parts[-4].startswith("pretrain-")], args.batch * sample_bytes, fresh=True)
    costs = per_sample_costs(ds_dir, args.num_patches)
    result = {
        "cpu_model": cpu_model(), "raw_read_bytes_per_s": round(raw_bps),
        "loader_bytes_per_s": round(threads[1] * 1e6), "loader_vs_raw_read": round(threads[1] * 1e6 / raw_bps, 3),
        "raw_read_fresh_bytes_per_s": round(raw_fresh_bps),
        "loader_vs_raw_read_fresh": round(threads[1] * 1e6 / raw_fresh_bps, 3),
        "workers_bytes_per_s": round(ours[1] * 1e6), "workers_vs_raw_read": round(ours[1] * 1e6 / raw_bps, 3),
        "loader_samples_per_s_per_core": round(threads[0] / max(len(os.sched_getaffinity(0)), 1), 1),
        "per_sample_us": costs,
        "patients": len(rows), "mean_bag_mb_float32": round(bag_mb, 1), "page_cache_gb": round(gb, 2),
        "sequential_read_gb_per_s": round(seq, 2), "h5_read_mb_per_s": round(h5_mb_s, 1),
        "batch": args.batch, "workers": args.workers, "num_patches": args.num_patches,
        "ours_samples_per_s": round(ours[0], 1), "ours_mb_per_s": round(ours[1], 1),
        "ours_bytes_per_sample": int(ours[2]), "sample_bytes_float16": sample_bytes,
        "ours_bytes_ratio": round(ours[2] / sample_bytes, 3),
        "authors_samples_per_s": round(authors[0], 2), "authors_mb_per_s": round(authors[1], 1),
        "authors_bytes_per_sample": int(authors[2]),
        "authors_bytes_ratio": round(authors[2] / sample_bytes, 1),
        "speedup": round(ours[0] / authors[0], 1),
        "ours_threads_samples_per_s": round(threads[0], 1), "reader_threads": args.prefetch,
        "speedup_threads": round(threads[0] / authors[0], 1),
        "window_threads_samples_per_s": round(window[0], 1), "window_bytes_per_sample": int(window[2]),
        "fresh_vs_window_samples_per_s": round(threads[0] / window[0], 3),
        "fresh_bytes_ratio": round(threads[2] / sample_bytes, 3), "window_bytes_ratio": round(window[2] / sample_bytes, 3),
        "diversity_fresh": div_fresh, "diversity_window": div_window,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"cohort: {len(rows)} pretraining patients, {bag_mb:.0f} MB of float32 patches per patient "
              f"({gb:.1f} GB in the page cache)")
        print(f"raw sequential read: {seq:.2f} GB/s (files), {h5_mb_s:.0f} MB/s (h5py, whole datasets); "
              f"the patch files into a batch-sized buffer {raw_bps / 1e9:.2f} GB/s")
        print(f"loader (reader threads) {threads[1] / 1e3:.2f} GB/s = {result['loader_vs_raw_read']:.0%} of the raw "
              f"read ({result['loader_vs_raw_read_fresh']:.0%} of the raw read into fresh batch memory, "
              f"{raw_fresh_bps / 1e9:.2f} GB/s); worker processes {result['workers_vs_raw_read']:.0%}; per sample (us): {costs}")
        print(f"ours:    {ours[0]:8.1f} samples/s  {ours[1]:8.1f} MB/s  {ours[2] / 1e6:6.2f} MB read per sample "
              f"({result['ours_bytes_ratio']}x the sample's {sample_bytes / 1e6:.2f} MB), {args.workers} worker processes")
        print(f"ours:    {threads[0]:8.1f} samples/s  {threads[1]:8.1f} MB/s  (in-process, {args.prefetch} reader "
              f"threads)")
        print(f"authors: {authors[0]:8.2f} samples/s  {authors[1]:8.1f} MB/s  {authors[2] / 1e6:6.2f} MB read per sample "
              f"({result['authors_bytes_ratio']}x)")
        print(f"sampler: fresh subsets {threads[0]:.1f} samples/s, {result['fresh_bytes_ratio']}x bytes; previous "
              f"window {window[0]:.1f} samples/s, {result['window_bytes_ratio']}x bytes (ratio "
              f"{result['fresh_vs_window_samples_per_s']}); pair co-occurrence vs uniform, fresh {div_fresh}, "
              f"window {div_window}")
        print(f"speed-up: {result['speedup']}x samples/s at batch {args.batch} with {args.workers} worker processes each "
              f"({result['speedup_threads']}x with {args.prefetch} reader threads)")
    return result


if __name__ == "__main__":
    main()
