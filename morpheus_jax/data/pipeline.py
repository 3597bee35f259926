"""Grain input pipeline over a prepared dataset (`morpheus_jax.data.records`).

Training stream, per JAX process::

    ArrayRecord records ─ TrainBatches: this process's rows of global batch k (records in a
      fresh order each epoch), each decoded and its patch window read straight into the
      batch arrays ─ [Grain worker processes]

Row ``r`` of global batch ``s`` is element ``s·B + r`` of the shuffled stream whatever the
number of processes, and a sample's patches are drawn from a generator keyed on
``(seed, epoch, record index)``, so batches do not depend on process or worker counts.

A training sample holds ``num_patches`` patches: a fresh random subset of the patient's
pre-shuffled rows, taken as whole chunk segments in a random order (`draw_spans`: about the
chunks one window would read), not re-shuffled (the WSI tokenizer is permutation-invariant);
bags smaller than that are topped up by sampling again with replacement. Evaluation bags
hold every patch, padded with a mask.
"""

from __future__ import annotations

import gc
import math
import os
import secrets
import signal
import sys
import threading
import time
import weakref
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Iterator

import grain
import numpy as np
import tensorstore as ts
from grain.python import SharedMemoryArray

from morpheus_jax.core.errors import DatasetError, InputError
from morpheus_jax.core.manifest import Manifest
from morpheus_jax.data import records as rec

# Per process: opened patch arrays, keyed by path (workers open their own).
_STORES: dict[str, Any] = {}
_RAW: dict[str, rec.RawChunks | None] = {}


def _store(path: Path):
    key = str(path)
    if key not in _STORES:
        _STORES[key] = ts.open(rec.zarr_spec(path), read=True).result()
    return _STORES[key]


def _raw(path: Path) -> rec.RawChunks | None:
    key = str(path)
    if key not in _RAW:
        _RAW[key] = rec.RawChunks.open(path)
    return _RAW[key]


def read_rows(root: Path, split: str, shard: int, start: int, stop: int) -> np.ndarray:
    return _store(rec.patch_path(root, split, shard))[start:stop].read().result()


def chunk_bytes(root: Path, split: str, shard: int, start: int, stop: int) -> int:
    """Bytes of the chunks a read of rows [start, stop) touches (what storage delivers)."""
    store = _store(rec.patch_path(root, split, shard))
    rows = store.chunk_layout.read_chunk.shape[0]
    chunks = -(-stop // rows) - start // rows
    return chunks * rows * store.shape[1] * store.dtype.numpy_dtype.itemsize


def segments(offset: int, count: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A patient's stored rows ``[offset, offset + count)`` cut at the patch array's chunk
    boundaries: (starts, stops) of each chunk's share (the first and last may be partial)."""
    first, last = offset // chunk_rows, (offset + count - 1) // chunk_rows
    edges = np.arange(first, last + 2, dtype=np.int64) * chunk_rows
    starts, stops = np.maximum(edges[:-1], offset), np.minimum(edges[1:], offset + count)
    return starts, stops


def draw_spans(offset: int, count: int, num_patches: int, chunk_rows: int,
               rng: np.random.Generator) -> list[tuple[int, int]]:
    """Stored row spans ``[(a, b), …]`` of one training bag (``count >= num_patches``): the
    patient's chunk segments in a fresh random order until ``num_patches`` rows, the last one
    cut to a random run of what is still needed; returned in storage order, neighbours merged.
    Each draw is a new random subset (the stored order within a chunk is itself a random
    permutation), and only the chunks of the chosen segments are read: about
    ``num_patches / chunk_rows + 1`` chunks, as one random window would touch."""
    starts, stops = segments(offset, count, chunk_rows)
    spans, need = [], num_patches
    for j in rng.permutation(starts.size):
        a, b = int(starts[j]), int(stops[j])
        take = min(b - a, need)
        a += int(rng.integers(b - a - take + 1))
        spans.append((a, a + take))
        need -= take
        if not need:
            break
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def draw_rows(offset: int, count: int, num_patches: int, chunk_rows: int, rng: np.random.Generator) -> np.ndarray:
    """The rows of `draw_spans`, sorted."""
    return np.concatenate([np.arange(a, b) for a, b in draw_spans(offset, count, num_patches, chunk_rows, rng)])


def sample_patches(root: Path, record: dict, num_patches: int, rng: np.random.Generator,
                   out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``[num_patches, D]`` patches of one patient, written into ``out`` (allocated when
    None), and the bytes of the chunks read.

    A bag of at least ``num_patches`` rows gives a fresh random subset of its stored rows
    (`draw_spans`), each span read straight into its part of ``out`` (`records.RawChunks`:
    one ``preadv`` per chunk piece; arrays in another layout through TensorStore, the reads
    issued together, then awaited); not reshuffled (the WSI tokenizer is
    permutation-invariant). A smaller bag is topped up by sampling with replacement, then
    shuffled.
    """
    off, n = record["patch_offset"], record["patch_count"]
    shard, split = record["patch_shard"], record["split"]
    path = rec.patch_path(root, split, shard)
    raw = _raw(path)
    if n >= num_patches and raw is not None and out is not None:
        row, touched = 0, 0
        for a, b in draw_spans(off, n, num_patches, raw.chunk_rows, rng):
            touched += raw.read_into(a, b, out[row: row + b - a])
            row += b - a
        return out, touched
    store = _store(path)
    if out is None:
        out = np.empty((num_patches, store.shape[1]), store.dtype.numpy_dtype)
    chunk_rows = store.chunk_layout.read_chunk.shape[0]
    if n >= num_patches:
        spans = draw_spans(off, n, num_patches, chunk_rows, rng)
        pending, row = [], 0
        for a, b in spans:
            pending.append(ts.array(out[row: row + b - a], copy=False, write=True).write(store[a:b]))
            row += b - a
        for p in pending:
            p.result()
        # Spans never share a chunk (one per chunk segment; merged ones cover whole chunks).
        return out, sum(chunk_bytes(root, split, shard, a, b) for a, b in spans)
    x = store[off: off + n].read().result()
    order = np.concatenate([np.arange(n), rng.integers(n, size=num_patches - n)])
    out[...] = x[order[rng.permutation(num_patches)]]
    return out, chunk_bytes(root, split, shard, off, off + n)


def omics_arrays(record: dict, modalities: tuple[str, ...]) -> tuple[dict, np.ndarray]:
    omics = {m: np.asarray(record["omics"][m], np.float32) for m in modalities}
    available = np.asarray([bool(record["available"][m]) for m in modalities])
    return omics, available


def num_train_records(manifest: Manifest, fraction: float = 1.0) -> int:
    """Patients a run trains on: `subset_indices` of the pretrain split (``data.train_fraction``)."""
    return len(subset_indices(manifest.count("pretrain"), fraction))


def subset_indices(n: int, fraction: float) -> np.ndarray:
    """Records used when training on a fraction of a split: the first ceil(fraction·n) of
    one fixed permutation (independent of the run seed; nested across fractions)."""
    keep = max(1, math.ceil(fraction * n))
    return np.sort(np.random.default_rng(0x5CA1E).permutation(n)[:keep])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the split's records in an epoch (a fresh permutation per epoch)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


class TrainBatches(grain.MapDataset):
    """This process's rows of global batch ``k``, sampled straight into batch arrays.

    Parent: the split's encoded records. The stream visits every record once per epoch in
    `epoch_order`; row ``p·b + j`` of global batch ``k`` (b = B / process_count) is stream
    element ``e = k·B + p·b + j``, of epoch ``e // num_records``. Its patches come from a
    generator keyed on ``(seed, epoch, record index)``. Picklable; patch arrays open lazily
    per process.
    """

    def __init__(self, parent: grain.MapDataset, *, root: str, num_records: int, global_batch: int,
                 num_patches: int, seed: int, modalities: tuple[str, ...], dim: int, dtype: str,
                 process_index: int = 0, process_count: int = 1, subset: np.ndarray | None = None):
        super().__init__(parent)
        if global_batch % process_count:
            raise InputError(f"global_batch={global_batch} (train.global_batch_size) is not divisible by "
                             f"process_count={process_count} processes")
        self._root, self._n, self._big = root, num_records, global_batch
        self._b, self._p = global_batch // process_count, process_index
        self._num_patches, self._seed, self._modalities = num_patches, seed, tuple(modalities)
        self._dim, self._dtype = dim, dtype
        self._orders: dict[int, np.ndarray] = {}
        self._subset = subset
        if subset is not None:
            self._n = len(subset)
        # Set in Grain worker processes: patches are written straight into shared memory,
        # which the training process maps without a copy. Segments are named
        # ``<shm_prefix><random>`` so the reader that started the workers can find and
        # release the ones Grain drops on close (`release_segments`).
        self.shared_memory = False
        self.shm_prefix = "morpheus-"

    def __len__(self) -> int:
        return sys.maxsize

    def _record_index(self, element: int) -> int:
        epoch, pos = divmod(element, self._n)
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(self._seed, epoch, self._n)
        index = int(self._orders[epoch][pos])
        return index if self._subset is None else int(self._subset[index])

    def __str__(self) -> str:
        return f"TrainBatches(process={self._p}, rows={self._b} of {self._big})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        b, n = self._b, self._num_patches
        dtype = rec.patch_numpy_dtype(self._dtype)
        shape = (b, n, self._dim)
        wsi = _shared_array(shape, dtype, self.shm_prefix) if self.shared_memory else np.empty(shape, dtype)
        out = {"wsi": wsi, "wsi_mask": np.ones((b, n), bool),
               "available": np.zeros((b, len(self._modalities)), bool),
               "record": np.zeros(b, np.int32), "epoch": np.zeros(b, np.int32), "bytes_read": np.zeros(b, np.int64)}
        omics = {}
        for j in range(b):
            element = index * self._big + self._p * b + j
            record = rec.decode_record(self._parent[self._record_index(element)])
            epoch = element // self._n
            rng = np.random.default_rng([self._seed, epoch, record["index"]])
            _, out["bytes_read"][j] = sample_patches(Path(self._root), record, n, rng, out=out["wsi"][j])
            values, out["available"][j] = omics_arrays(record, self._modalities)
            for m, v in values.items():
                omics.setdefault(m, np.zeros((b, len(v)), np.float32))[j] = v
            out["record"][j], out["epoch"][j] = record["index"], epoch
        out["omics"] = omics
        if self.shared_memory:      # every array in a named segment (Grain would copy the rest into unnamed ones)
            out = _to_shared(out, self.shm_prefix)
        return out


def _shared_array(shape: tuple[int, ...], dtype, prefix: str) -> SharedMemoryArray:
    size = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
    shm = shared_memory.SharedMemory(name=prefix + secrets.token_hex(8), create=True, size=size)
    return SharedMemoryArray.from_shared_memory(shm, shape, dtype)


def _to_shared(tree, prefix: str):
    if isinstance(tree, dict):
        return {k: _to_shared(v, prefix) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and not isinstance(tree, SharedMemoryArray) and tree.size:
        shared = _shared_array(tree.shape, tree.dtype, prefix)
        shared[...] = tree
        return shared
    return tree


def _segments(tree) -> dict[str, SharedMemoryArray]:
    """The shared-memory arrays of a batch, by segment name."""
    if isinstance(tree, dict):
        return {name: a for v in tree.values() for name, a in _segments(v).items()}
    if isinstance(tree, SharedMemoryArray) and tree.shm is not None:
        return {tree.shm.name.lstrip("/"): tree}
    return {}


SHM_DIR = Path("/dev/shm")


def release_segments(prefix: str, keep: set[str] = frozenset()) -> int:
    """Unlink the shared-memory segments named ``prefix…`` except ``keep`` (arrays still in
    use); returns how many. Grain's multiprocess prefetch drops the batches its workers had
    made but not handed over when it closes, without unlinking them: without this they
    would outlive the command (the resource tracker warns at exit). Linux only (elsewhere
    segments are not listed; nothing is done)."""
    if not SHM_DIR.is_dir():
        return 0
    gc.collect()                                  # batches dropped by the reader's buffers
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:                          # Grain unlinks dropped batches on a thread:
        pool.apply(int)                           # let the queued unlinks finish first
    count = 0
    for name in sorted(os.listdir(SHM_DIR)):
        if not name.startswith(prefix) or name in keep:
            continue
        try:
            segment = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            continue
        segment.close()
        segment.unlink()
        count += 1
    return count


def release_stale_segments() -> int:
    """Unlink the segments of readers whose process is gone (a run killed with its whole
    process group, resource tracker included, leaves its batches in /dev/shm); returns how
    many. Names carry the reader's pid namespace and pid (`segment_prefix`): live runs, and
    runs in other containers sharing /dev/shm, are untouched."""
    if not SHM_DIR.is_dir():
        return 0
    here, dead = _pid_namespace(), set()
    for name in os.listdir(SHM_DIR):
        parts = name.split("-")
        if (len(parts) > 3 and parts[0] == "morpheus" and parts[1] == here and parts[2].isdigit()
                and not _alive(int(parts[2]))):
            dead.add("-".join(parts[:3]) + "-")
    return sum(release_segments(prefix) for prefix in sorted(dead))


def segment_prefix() -> str:
    """``morpheus-<pid namespace>-<pid>-<random>-``: the names of one reader's segments."""
    return f"morpheus-{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(4)}-"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def train_dataset(root: str | Path, split: str, *, global_batch: int, num_patches: int, seed: int,
                  modalities: tuple[str, ...], process_index: int = 0, process_count: int = 1,
                  manifest: Manifest | None = None, fraction: float = 1.0) -> grain.MapDataset:
    """Infinite MapDataset of this process's host batches (``global_batch / process_count``
    rows), over `subset_indices` of the split when ``fraction`` < 1."""
    root = Path(root)
    manifest = manifest or rec.load_manifest(root)
    paths = [str(root / p) for p in manifest.shard_paths(split)]
    n = manifest.count(split)
    if not paths or n == 0:
        raise DatasetError(f"{root}: split {split!r} has no patients (counts {manifest.counts})")
    source = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    return TrainBatches(source, root=str(root), num_records=n, global_batch=global_batch, num_patches=num_patches,
                        seed=seed, modalities=tuple(modalities), dim=manifest.patches.dim,
                        dtype=manifest.patches.dtype, process_index=process_index,
                        process_count=process_count, subset=subset_indices(n, fraction) if fraction < 1 else None)


class _SharedMemoryOutput(grain.IterDataset):
    """Pass-through that lets Grain's worker processes switch `TrainBatches` to shared-memory
    output (Grain's hook for handing batches over without a copy)."""

    def __init__(self, parent: grain.IterDataset, batches: TrainBatches):
        super().__init__(parent)
        self._batches = batches

    def enable_shared_memory_output(self) -> None:
        self._batches.shared_memory = True

    def __iter__(self):
        return self._parent.__iter__()

    def __str__(self) -> str:
        return "SharedMemoryOutput"


def _worker_init(index: int, count: int) -> None:
    """In each Grain worker process: Ctrl-C and SIGTERM (sent to the whole process group by
    a terminal or a scheduler) are the training process's to handle: it finishes its step,
    saves and stops the workers. A worker whose parent died (SIGKILL) exits within a second
    instead of running on as an orphan."""
    del index, count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="morpheus-parent-watch").start()


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
        self._in_use: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # segment → array handed out

    def _open(self):
        if isinstance(self._ds, TrainBatches) and self._workers > 0:   # workers name segments after the reader
            release_stale_segments()
            self._ds.shm_prefix = segment_prefix()
        ds = self._ds if self._next == 0 else self._ds.slice(slice(self._next, None))
        # Worker processes give the parallelism; in-process, reader threads do (tensorstore
        # reads and NumPy copies release the GIL).
        threads = 1 if self._workers > 0 else self._prefetch
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self._prefetch))
        if self._workers > 0 and isinstance(self._ds, TrainBatches):
            it = _SharedMemoryOutput(it, self._ds)
        if self._workers > 0:
            from absl import flags  # Grain's workers read absl flags; outside absl.app they are unparsed
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers,
                                                             per_worker_buffer_size=self._prefetch),
                                worker_init_fn=_worker_init)
        return iter(it)

    def __next__(self):
        if self._reader is None:
            self._reader = self._open()
        batch = next(self._reader)
        self._next += 1
        self._in_use.update(_segments(batch))
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next}

    def set_state(self, state: dict) -> None:
        self.close_reader()
        self._next = int(state["next_index"])

    def close_reader(self) -> None:
        """Stop the reader (its worker processes end) and release every shared-memory segment
        its workers made that is not held by a batch still in use."""
        if self._reader is not None and hasattr(self._reader, "close"):
            self._reader.close()
            if self._workers > 0 and isinstance(self._ds, TrainBatches):
                release_segments(self._ds.shm_prefix, keep=set(self._in_use.keys()))
        self._reader = None


def train_iterator(ds: grain.MapDataset, worker_count: int = 0, prefetch: int = 4) -> TrainIterator:
    """Checkpointable iterator (``get_state`` / ``set_state``) with optional worker processes."""
    return TrainIterator(ds, worker_count, prefetch)


# -- evaluation: every patch of every patient ----------------------------------------------

def read_split(root: str | Path, split: str, manifest: Manifest | None = None) -> list[dict]:
    """All decoded records of a split, in split order."""
    root = Path(root)
    manifest = manifest or rec.load_manifest(root)
    paths = [str(root / p) for p in manifest.shard_paths(split)]
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
