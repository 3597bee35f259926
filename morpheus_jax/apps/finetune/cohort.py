"""What every fine-tuning command starts from: a checkpoint, the inputs it encodes, and the
split's patients that have those inputs and the task columns."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from morpheus_jax.apps.downstream import (
    Inputs,
    Log,
    check_dataset,
    column_values,
    keep_available,
    open_dataset,
    parse_modalities,
    split_records,
)
from morpheus_jax.ckpt.checkpoint import Checkpoint, read_checkpoint
from morpheus_jax.core.errors import DownstreamError
from morpheus_jax.core.manifest import Manifest


@dataclasses.dataclass
class Cohort:
    ckpt: Checkpoint
    inputs: Inputs
    root: Path
    manifest: Manifest
    split: str
    records: list[dict]
    columns: dict[str, list]          # column → value per record (none missing)

    @property
    def ids(self) -> list[str]:
        return [r["submitter_id"] for r in self.records]


def open_cohort(checkpoint: str | os.PathLike, dataset: str | os.PathLike, modalities: str, split: str,
                columns: list[str], log: Log = print) -> Cohort:
    ckpt = read_checkpoint(checkpoint)
    inputs = parse_modalities(modalities, ckpt.config.model.modalities)
    root, manifest = open_dataset(dataset)
    check_dataset(manifest, root, inputs.omics, ckpt.features, ckpt.config.model.wsi_dim if inputs.wsi else None)
    records = keep_available(split_records(root, manifest, split), inputs, log)
    values = {c: column_values(records, manifest, c) for c in columns}
    keep = [i for i in range(len(records)) if all(values[c][i] is not None for c in columns)]
    if len(keep) < len(records):
        log(f"excluded {len(records) - len(keep)} of {len(records)} patients lacking {' or '.join(columns)}")
    if not keep:
        raise DownstreamError(f"no patient of split {split!r} has {' and '.join(columns)}")
    return Cohort(ckpt, inputs, root, manifest, split, [records[i] for i in keep],
                  {c: [values[c][i] for i in keep] for c in columns})


def numeric(values: list, column: str) -> np.ndarray:
    try:
        return np.asarray([float(v) for v in values], np.float64)
    except (TypeError, ValueError) as e:
        raise DownstreamError(f"column {column!r} must be numeric ({e})") from None


def summary_stats(values) -> tuple[float, float]:
    """Mean and population std (ddof 0) over the finite values."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


