"""A device-resident patch bank (``data.patch_source=device``): the host's side.

The training patients are dealt to the batch shards of the mesh (`plan_bank`: largest bag
first, each to the shard holding the fewest rows), and each shard's patches are loaded once
into its device's memory (`load_shard`). Row ``j`` of shard ``d`` in global batch ``k`` is
element ``k·b + j`` of shard ``d``'s own stream (its patients in a fresh order per epoch), so
every device samples only from its own bank. The host sends what is cheap (`BankBatches`):
omics, availability, and per row the patient's bank offset, patch count and the key its bag
is drawn from, keyed on ``(seed, epoch, record)`` as on the stream path; the step draws the
bag in-graph by the authors' rule. Nothing of the bank is checkpointed: it is rebuilt from the
dataset at start-up.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import grain
import numpy as np

from morpheus_jax.core.errors import ConfigError
from morpheus_jax.data import pipeline

BANK_DTYPES = ("float16", "int8")


@dataclasses.dataclass
class BankPlan:
    """Which patients each batch shard's bank holds, and where."""

    shards: list[np.ndarray]      # per shard: positions into ``records`` (the training subset)
    offsets: list[np.ndarray]     # per shard: each patient's first row in its bank
    counts: list[np.ndarray]      # per shard: each patient's patch count
    rows: int                     # rows of every bank (the largest shard's, padded to it)
    max_count: int                # the largest bag (the in-graph sampler's static width)
    dim: int

    def bytes_per_device(self, dtype: str) -> int:
        """One bank's bytes: rows × dim × itemsize (int8: plus a float32 scale per row)."""
        if dtype not in BANK_DTYPES:
            raise ConfigError(f"bank dtype {dtype!r}: expected one of {', '.join(BANK_DTYPES)}")
        return self.rows * self.dim * np.dtype(dtype).itemsize + (4 * self.rows if dtype == "int8" else 0)


def plan_bank(counts: np.ndarray, num_shards: int, dim: int, num_patches: int) -> BankPlan:
    """Deal patients (``counts``: patch count per training patient) to ``num_shards`` banks."""
    if len(counts) < num_shards:
        raise ConfigError(f"data.patch_source=device: {len(counts)} training patients cannot fill {num_shards} "
                          "batch shards (one bank per shard); use data.patch_source=stream")
    order = np.argsort(-np.asarray(counts), kind="stable")
    load = np.zeros(num_shards, np.int64)
    members: list[list[int]] = [[] for _ in range(num_shards)]
    for i in order:
        d = int(np.argmin(load))
        members[d].append(int(i))
        load[d] += counts[i]
    shards = [np.sort(np.asarray(m, np.int64)) for m in members]
    sizes = [np.asarray(counts)[s] for s in shards]
    offsets = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64) for c in sizes]
    return BankPlan(shards, offsets, sizes, int(load.max()), int(max(np.max(counts), num_patches)), dim)


def load_shard(root: Path, records: list[dict], plan: BankPlan, shard: int, dtype: str):
    """Bank ``shard``'s rows ``[rows, dim]`` (zero padding after its patients): float16, or
    int8 with a float32 absmax scale per row (``x ≈ q · scale / 127``)."""
    out = np.zeros((plan.rows, plan.dim), np.float16)
    for i, off, n in zip(plan.shards[shard], plan.offsets[shard], plan.counts[shard]):
        r = records[i]
        out[off: off + n] = pipeline.read_rows(root, r["split"], r["patch_shard"], r["patch_offset"],
                                               r["patch_offset"] + n)
    if dtype == "float16":
        return out
    x = out.astype(np.float32)
    scale = np.abs(x).max(axis=1)
    q = np.rint(x / np.where(scale > 0, scale, 1.0)[:, None] * 127).astype(np.int8)
    return q, scale.astype(np.float32)


def patch_key(seed: int, epoch: int, index: int) -> np.ndarray:
    """The uint32 pair a bag is drawn from: keyed on ``(seed, epoch, record)`` like the stream's."""
    return np.random.default_rng([seed, epoch, index]).integers(0, 2**32, 2, dtype=np.uint32)


class BankBatches(grain.MapDataset):
    """This process's rows of global batch ``k`` on the device path: for each of its batch
    shards (``local_shards``, in row order) ``rows_per_shard`` rows of that shard's stream."""

    def __init__(self, parent: grain.MapDataset, *, records: list[dict], plan: BankPlan, local_shards: list[int],
                 rows_per_shard: int, seed: int, modalities: tuple[str, ...]):
        super().__init__(parent)
        self._records, self._plan, self._local = records, plan, list(local_shards)
        self._b, self._seed, self._modalities = rows_per_shard, seed, tuple(modalities)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"BankBatches(shards={self._local}, rows={self._b} per shard)"

    def _position(self, shard: int, element: int) -> tuple[int, int]:
        """(position in the shard's patient list, epoch) of a shard stream element."""
        n = len(self._plan.shards[shard])
        epoch, pos = divmod(element, n)
        key = (shard, epoch)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self._local):
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = np.random.default_rng([self._seed, epoch, 0x5EED, shard]).permutation(n)
        return int(self._orders[key][pos]), epoch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rows = len(self._local) * self._b
        out = {"patch_offset": np.zeros(rows, np.int32), "patch_count": np.zeros(rows, np.int32),
               "patch_key": np.zeros((rows, 2), np.uint32), "available": np.zeros((rows, len(self._modalities)), bool),
               "record": np.zeros(rows, np.int32), "epoch": np.zeros(rows, np.int32)}
        omics = {}
        for s, shard in enumerate(self._local):
            for j in range(self._b):
                row = s * self._b + j
                pos, epoch = self._position(shard, index * self._b + j)
                record = self._records[self._plan.shards[shard][pos]]
                out["patch_offset"][row] = self._plan.offsets[shard][pos]
                out["patch_count"][row] = self._plan.counts[shard][pos]
                out["patch_key"][row] = patch_key(self._seed, epoch, record["index"])
                values, out["available"][row] = pipeline.omics_arrays(record, self._modalities)
                for m, v in values.items():
                    omics.setdefault(m, np.zeros((rows, len(v)), np.float32))[row] = v
                out["record"][row], out["epoch"][row] = record["index"], epoch
        out["omics"] = omics
        return out


def training_records(root: Path, manifest, fraction: float) -> list[dict]:
    """The decoded records a run trains on (the pretrain split's `subset_indices`)."""
    records = pipeline.read_split(root, "pretrain", manifest)
    keep = pipeline.subset_indices(len(records), fraction)
    return [records[i] for i in keep]


def bank_dataset(root: Path, manifest, records: list[dict], plan: BankPlan, *, local_shards: list[int],
                 rows_per_shard: int, seed: int, modalities: tuple[str, ...]) -> BankBatches:
    source = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(
        [str(root / p) for p in manifest.shard_paths("pretrain")]))
    return BankBatches(source, records=records, plan=plan, local_shards=local_shards, rows_per_shard=rows_per_shard,
                       seed=seed, modalities=modalities)


