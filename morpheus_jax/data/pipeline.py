"""Grain input pipeline over a prepared dataset (`morpheus_jax.data.records`).

Training stream, per JAX process::

    ArrayRecord records ─ shuffle(seed, per epoch) ─ repeat ─ (epoch, record)
      ─ this process's block of every global batch ─ decode + patch window read
      ─ batch ─ [worker processes]

Row ``r`` of global batch ``s`` is element ``s·B + r`` of the shuffled stream whatever the
number of processes, and a sample's patches are drawn from a generator keyed on
``(seed, epoch, record index)``, so batches do not depend on process or worker counts.

A training sample holds ``num_patches`` patches: a random contiguous window of the patient's
pre-shuffled rows (wrapping around), re-shuffled; bags smaller than that are topped up by
sampling again with replacement. Evaluation bags hold every patch, padded with a mask.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator

import grain
import numpy as np
import tensorstore as ts

from morpheus_jax.data import records as rec

# Per process: opened patch arrays, keyed by path (workers open their own).
_STORES: dict[str, Any] = {}


def _store(path: Path):
    key = str(path)
    if key not in _STORES:
        _STORES[key] = ts.open(rec.zarr_spec(path), read=True).result()
    return _STORES[key]


def read_rows(root: Path, split: str, shard: int, start: int, stop: int) -> np.ndarray:
    return _store(rec.patch_path(root, split, shard))[start:stop].read().result()


def chunk_bytes(root: Path, split: str, shard: int, start: int, stop: int) -> int:
    """Bytes of the chunks a read of rows [start, stop) touches (what storage delivers)."""
    store = _store(rec.patch_path(root, split, shard))
    rows = store.chunk_layout.read_chunk.shape[0]
    chunks = -(-stop // rows) - start // rows
    return chunks * rows * store.shape[1] * store.dtype.numpy_dtype.itemsize


def sample_patches(root: Path, record: dict, num_patches: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``[num_patches, D]`` patches of one patient (window + reshuffle, or top-up) and the
    bytes of the chunks read."""
    off, n = record["patch_offset"], record["patch_count"]
    shard, split = record["patch_shard"], record["split"]
    if n >= num_patches:
        start = int(rng.integers(n))
        end = start + num_patches
        spans = [(off + start, off + min(end, n))] + ([(off, off + end - n)] if end > n else [])
    else:
        spans = [(off, off + n)]
    parts = [read_rows(root, split, shard, a, b) for a, b in spans]
    nbytes = sum(chunk_bytes(root, split, shard, a, b) for a, b in spans)
    x = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if n < num_patches:
        x = np.concatenate([x, x[rng.integers(n, size=num_patches - n)]])
    return x[rng.permutation(num_patches)], nbytes


def omics_arrays(record: dict, modalities: tuple[str, ...]) -> tuple[dict, np.ndarray]:
    omics = {m: np.asarray(record["omics"][m], np.float32) for m in modalities}
    available = np.asarray([bool(record["available"][m]) for m in modalities])
    return omics, available


class Decode(grain.transforms.Map):
    def map(self, data: bytes) -> dict:
        return rec.decode_record(data)


@dataclasses.dataclass
class TrainSample(grain.transforms.MapWithIndex):
    """(epoch, record) → training example. Picklable; opens patch arrays lazily."""

    root: str
    num_patches: int
    seed: int
    modalities: tuple[str, ...]
    num_records: int

    def map_with_index(self, index: int, record: dict) -> dict:
        epoch = index // self.num_records
        rng = np.random.default_rng([self.seed, epoch, record["index"]])
        omics, available = omics_arrays(record, self.modalities)
        wsi, nbytes = sample_patches(Path(self.root), record, self.num_patches, rng)
        return {
            "wsi": wsi,
            "wsi_mask": np.ones(self.num_patches, bool),
            "omics": omics,
            "available": available,
            "record": np.int32(record["index"]),
            "epoch": np.int32(epoch),
            "bytes_read": np.int64(nbytes),
        }


class ProcessBlocks(grain.MapDataset):
    """This process's rows of every global batch: element ``j`` of the view is element
    ``(j // b) · B + p · b + j % b`` of the parent (b = B / process_count)."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self._b = global_batch // process_count
        self._big = global_batch
        self._p = process_index
        self._len = len(parent) // global_batch * self._b if len(parent) < 2**62 else len(parent)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        block, row = divmod(index, self._b)
        return self._parent[block * self._big + self._p * self._b + row]

    def __str__(self) -> str:
        return f"ProcessBlocks(process={self._p}, rows={self._b} of {self._big})"


def train_dataset(root: str | Path, split: str, *, global_batch: int, num_patches: int, seed: int,
                  modalities: tuple[str, ...], process_index: int = 0, process_count: int = 1,
                  manifest: dict | None = None) -> grain.MapDataset:
    """Infinite MapDataset of this process's host batches (``global_batch / process_count``)."""
    root = Path(root)
    manifest = manifest or rec.load_manifest(root)
    paths = [str(root / s["records"]["path"]) for s in manifest["shards"] if s["split"] == split]
    n = manifest["counts"].get(split, 0)
    if not paths or n == 0:
        raise rec.DatasetError(f"{root}: split {split!r} has no patients (counts {manifest['counts']})")
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    ds = ds.shuffle(seed=seed % 2**32).repeat(None)
    ds = ds.map(Decode()).map_with_index(TrainSample(str(root), num_patches, seed, tuple(modalities), n))
    ds = ProcessBlocks(ds, global_batch, process_index, process_count)
    return ds.batch(global_batch // process_count, drop_remainder=True)


class TrainIterator(grain.DatasetIterator):
    """Iterator over a `train_dataset` whose state is the index of the next global batch.

    Because batch ``k`` is a pure function of (dataset, seed, k), the state is portable:
    it restores onto any worker count (the reader is rebuilt from ``k``) and, once divided
    out of the global stream, onto another process count. Orbax saves it through Grain's
    checkpoint handler like any Grain iterator.
    """

    def __init__(self, ds: grain.MapDataset, worker_count: int = 0, prefetch: int = 4):
        super().__init__()
        self._ds, self._workers, self._prefetch = ds, worker_count, max(1, prefetch)
        self._next = 0
        self._reader = None

    def _open(self):
        ds = self._ds if self._next == 0 else self._ds.slice(slice(self._next, None))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._prefetch, prefetch_buffer_size=self._prefetch))
        if self._workers > 0:
            from absl import flags  # Grain's workers read absl flags; outside absl.app they are unparsed
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers,
                                                             per_worker_buffer_size=self._prefetch))
        return iter(it)

    def __next__(self):
        if self._reader is None:
            self._reader = self._open()
        batch = next(self._reader)
        self._next += 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next}

    def set_state(self, state: dict) -> None:
        self.close_reader()
        self._next = int(state["next_index"])

    def close_reader(self) -> None:
        if self._reader is not None and hasattr(self._reader, "close"):
            self._reader.close()
        self._reader = None


def train_iterator(ds: grain.MapDataset, worker_count: int = 0, prefetch: int = 4) -> TrainIterator:
    """Checkpointable iterator (``get_state`` / ``set_state``) with optional worker processes."""
    return TrainIterator(ds, worker_count, prefetch)


# -- evaluation: every patch of every patient ----------------------------------------------

def read_split(root: str | Path, split: str, manifest: dict | None = None) -> list[dict]:
    """All decoded records of a split, in split order."""
    root = Path(root)
    manifest = manifest or rec.load_manifest(root)
    paths = [str(root / s["records"]["path"]) for s in manifest["shards"] if s["split"] == split]
    if not paths:
        return []
    source = grain.sources.ArrayRecordDataSource(paths)
    out = [rec.decode_record(source[i]) for i in range(len(source))]
    return sorted(out, key=lambda r: r["index"])


def bag_bucket(n: int, minimum: int) -> int:
    """Padded bag length: the smallest ``minimum · 2^j`` ≥ n (few shapes to compile)."""
    size = minimum
    while size < n:
        size *= 2
    return size


def eval_batches(root: str | Path, records: list[dict], modalities: tuple[str, ...], *,
                 batch_size: int, min_bag: int) -> Iterator[dict]:
    """Full-bag batches of ``batch_size`` rows (short last batches padded; ``row_valid``
    marks real rows), patients grouped by bag size; ``wsi`` padded to `bag_bucket` with
    ``wsi_mask`` False on padding. Each batch carries ``rows`` (indices into records)."""
    root = Path(root)
    order = sorted(range(len(records)), key=lambda i: records[i]["patch_count"])
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        length = bag_bucket(max(records[i]["patch_count"] for i in rows), min_bag)
        first = records[rows[0]]
        dim = _store(rec.patch_path(root, first["split"], first["patch_shard"])).shape[1]
        dtype = _store(rec.patch_path(root, first["split"], first["patch_shard"])).dtype.numpy_dtype
        wsi = np.zeros((batch_size, length, dim), dtype)
        mask = np.zeros((batch_size, length), bool)
        omics = {m: np.zeros((batch_size, len(first["omics"][m])), np.float32) for m in modalities}
        available = np.zeros((batch_size, len(modalities)), bool)
        for j, i in enumerate(rows):
            r = records[i]
            n = r["patch_count"]
            wsi[j, :n] = read_rows(root, r["split"], r["patch_shard"], r["patch_offset"], r["patch_offset"] + n)
            mask[j, :n] = True
            o, a = omics_arrays(r, modalities)
            for m in modalities:
                omics[m][j] = o[m]
            available[j] = a
        yield {"wsi": wsi, "wsi_mask": mask, "omics": omics, "available": available,
               "row_valid": np.arange(batch_size) < len(rows),
               "rows": np.asarray(rows + [-1] * (batch_size - len(rows)))}


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    return max(1, math.ceil(num_records / global_batch))
