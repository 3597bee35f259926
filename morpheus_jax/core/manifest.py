"""The prepared dataset's manifest (``manifest.json``) as a type that checks itself on load.

`prepare` builds a `Manifest` and writes `to_json`; everything else reads it with
`Manifest.from_json`, which refuses a manifest of another schema version or with a
missing or ill-typed field, naming the file and the field. The record and patch formats
themselves are `morpheus_jax.data.records`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from morpheus_jax.core.errors import ConfigError, DatasetError
from morpheus_jax.core.modality import BUILTIN, DEFAULT, ModalitySpec
from morpheus_jax.core.names import SPLITS
from morpheus_jax.core.spec import GroupLayout

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModalityInfo:
    """One omics modality: its group mapping, canonical feature order and preprocessing (its
    `ModalitySpec`; the manifest's ``modalities`` order is the model's)."""

    groups: dict[str, list[str]]
    features: list[str]
    spec: ModalitySpec
    missing_filled: int
    dtype: str = "float32"

    @property
    def fill(self) -> float:
        return self.spec.fill

    @property
    def transform(self) -> str:
        return self.spec.transform

    @property
    def group_sizes(self) -> list[int]:
        return [len(v) for v in self.groups.values()]

    def layout(self, num_buckets: int) -> GroupLayout:
        return GroupLayout.from_mapping(self.groups, self.features, num_buckets)


@dataclasses.dataclass(frozen=True)
class PatchInfo:
    """The stored patch arrays: feature dimension, dtype, zarr chunking, shuffle seed, total rows."""

    dim: int
    dtype: str
    chunk_rows: int
    shuffle_seed: int
    total: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    counts: dict[str, int]
    modalities: dict[str, ModalityInfo]
    patches: PatchInfo
    shards: list[dict]                  # {split, shard, records: {path, bytes, sha256}, patches: {path, sha256}, …}
    meta_columns: list[str] = dataclasses.field(default_factory=list)
    allow_missing_modalities: bool = False
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    sources: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: str = ""
    resumed_shards: int = 0
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def count(self, split: str) -> int:
        return int(self.counts.get(split, 0))

    def shard_paths(self, split: str, kind: str = "records") -> list[str]:
        """Relative paths of a split's record (or patch) shards, in shard order."""
        return [s[kind]["path"] for s in self.shards if s["split"] == split]

    def layouts(self, modalities, num_buckets: int) -> dict[str, GroupLayout]:
        """Group layouts of ``modalities`` (model order); a modality the dataset lacks is a `DatasetError`."""
        missing = [m for m in modalities if m not in self.modalities]
        if missing:
            raise DatasetError(f"dataset has no modality {missing[0]!r} (has {sorted(self.modalities)}); "
                               "set model.modalities accordingly")
        return {m: self.modalities[m].layout(num_buckets) for m in modalities}

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for m, info in self.modalities.items():   # written for readers of the file; derived on load
            out["modalities"][m].update(group_sizes=info.group_sizes, fill=info.fill, transform=info.transform)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Manifest":
        """Checked construction; ``where`` (the file) prefixes every error."""
        if not isinstance(data, Mapping):
            raise DatasetError(f"{where}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DatasetError(f"{where}: schema_version {version!r}, this version reads {SCHEMA_VERSION}")
        try:
            counts = {str(k): _int(v, f"counts.{k}") for k, v in _mapping(data, "counts").items()}
            unknown = sorted(set(counts) - set(SPLITS))
            if unknown:
                raise _Bad(f"counts: unknown splits {unknown} (expected {list(SPLITS)})")
            modalities = {m: _modality(v, f"modalities.{m}") for m, v in _mapping(data, "modalities").items()}
            p = _mapping(data, "patches")
            patches = PatchInfo(*(_int(p.get(k), f"patches.{k}") if k != "dtype" else _str(p.get(k), "patches.dtype")
                                  for k in ("dim", "dtype", "chunk_rows", "shuffle_seed", "total")))
            shards = data.get("shards")
            if not isinstance(shards, list) or not all(_is_shard(s) for s in shards):
                raise _Bad("shards: expected a list of {split, records: {path, sha256}, patches: {path, sha256}}")
            return cls(counts, modalities, patches, list(shards), list(data.get("meta_columns") or []),
                       bool(data.get("allow_missing_modalities", False)), dict(data.get("skipped") or {}),
                       dict(data.get("sources") or {}), str(data.get("created", "")),
                       int(data.get("resumed_shards") or 0), float(data.get("seconds") or 0.0), version)
        except _Bad as e:
            raise DatasetError(f"{where}: {e}") from None


class _Bad(Exception):
    pass


def _mapping(data: Mapping, key: str) -> Mapping:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise _Bad(f"{key}: expected an object, got {type(value).__name__}")
    return value


def _int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _str(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad(f"{where}: expected a string, got {value!r}")
    return value


def _modality(info, where: str) -> ModalityInfo:
    if not isinstance(info, Mapping):
        raise _Bad(f"{where}: expected an object")
    groups, features = info.get("groups"), info.get("features")
    if not isinstance(groups, Mapping) or not groups or not all(isinstance(v, list) and v for v in groups.values()):
        raise _Bad(f"{where}.groups: expected {{group: [feature names]}} with no empty group")
    if not isinstance(features, list) or not features:
        raise _Bad(f"{where}.features: expected a non-empty list of feature names")
    known = set(features)
    stray = [f for v in groups.values() for f in v if f not in known]
    if stray:
        raise _Bad(f"{where}.groups: features not in {where}.features: {stray[:3]}")
    name = where.rsplit(".", 1)[-1]
    if "spec" in info:
        try:
            spec = ModalitySpec.from_json(info["spec"], f"{where}.spec")
        except ConfigError as e:
            raise _Bad(str(e)) from None
    else:   # written before specs were recorded: the built-in rules of its time
        spec = BUILTIN.get(name, DEFAULT)
    return ModalityInfo({str(g): list(v) for g, v in groups.items()}, list(features), spec,
                        int(info.get("missing_filled") or 0), str(info.get("dtype", "float32")))


def _is_shard(s) -> bool:
    return (isinstance(s, Mapping) and s.get("split") in SPLITS
            and all(isinstance(s.get(k), Mapping) and isinstance(s[k].get("path"), str) for k in ("records", "patches")))
