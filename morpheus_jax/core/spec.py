"""Contracts shared by every layer: a modality's group layout (`GroupLayout`) and what a
checkpoint needs to rebuild its model (`ModelSpec`).

`GroupLayout` is what a group mapping means to the model: each group's canonical feature
indices (mapping order) and how the per-group MLPs are bucketed for computation. Buckets
are a speed knob (``model.group_buckets``): they decide how the step batches the groups'
matmuls, never what is stored.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from morpheus_jax.core.config import Config, to_dict
from morpheus_jax.core.errors import CheckpointError, InputError


def bucket_partition(sizes: list[int], num_buckets: int) -> list[list[int]]:
    """Split groups into ≤ num_buckets buckets minimising the padded size Σ |bucket|·max size.

    Groups are sorted by size (stable); buckets are contiguous runs of that order (optimal
    for this cost). Returns lists of original group indices, buckets in ascending size.
    """
    order = sorted(range(len(sizes)), key=lambda g: sizes[g])
    s = [sizes[g] for g in order]
    n, nb = len(s), max(1, min(num_buckets, len(s)))
    inf = float("inf")
    # cost[j][i]: best padded total covering the first i sorted groups with j buckets.
    cost = [[inf] * (n + 1) for _ in range(nb + 1)]
    back = [[0] * (n + 1) for _ in range(nb + 1)]
    cost[0][0] = 0
    for j in range(1, nb + 1):
        for i in range(1, n + 1):
            for h in range(j - 1, i):
                c = cost[j - 1][h] + (i - h) * s[i - 1]
                if c < cost[j][i]:
                    cost[j][i], back[j][i] = c, h
    j = min(range(1, nb + 1), key=lambda jj: cost[jj][n])
    bounds, i = [], n
    while j > 0:
        h = back[j][i]
        bounds.append((h, i))
        i, j = h, j - 1
    return [order[a:b] for a, b in reversed(bounds)]


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Static description of one modality's groups and their bucketed computation.

    feature_index[g]: canonical feature indices (into the modality's flat ``[F]`` vector) of
    group g, in mapping order. Buckets hold groups sorted by size.
    """

    group_names: tuple[str, ...]
    feature_index: tuple[tuple[int, ...], ...]
    num_features: int
    buckets: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, group_names, feature_index, num_features: int, num_buckets: int) -> "GroupLayout":
        sizes = [len(f) for f in feature_index]
        if any(s == 0 for s in sizes):
            empty = [n for n, s in zip(group_names, sizes) if s == 0]
            raise InputError(f"groups with no features: {empty[:5]}")
        buckets = bucket_partition(sizes, num_buckets)
        return cls(tuple(group_names), tuple(tuple(int(i) for i in f) for f in feature_index),
                   int(num_features), tuple(tuple(b) for b in buckets))

    @classmethod
    def from_mapping(cls, groups: dict[str, list[str]], features: list[str], num_buckets: int) -> "GroupLayout":
        """Layout from a ``{group: [feature names]}`` mapping and the canonical feature list."""
        index = {f: i for i, f in enumerate(features)}
        missing = [f for members in groups.values() for f in members if f not in index]
        if missing:
            raise InputError(f"mapping features not in the feature list: {missing[:5]}")
        return cls.build(list(groups), [[index[f] for f in m] for m in groups.values()],
                         len(features), num_buckets)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def sizes(self) -> list[int]:
        return [len(f) for f in self.feature_index]

    @property
    def total_size(self) -> int:
        return sum(self.sizes)

    def bucket_width(self, b: int) -> int:
        return max(len(self.feature_index[g]) for g in self.buckets[b])

    def bucket_gather(self, b: int) -> np.ndarray:
        """``[Gb, Wb]`` feature indices; padding points at index F (a zero column)."""
        idx = np.full((len(self.buckets[b]), self.bucket_width(b)), self.num_features, np.int32)
        for slot, g in enumerate(self.buckets[b]):
            idx[slot, : len(self.feature_index[g])] = self.feature_index[g]
        return idx

    def entry_offsets(self) -> np.ndarray:
        """``[G + 1]`` start of each group's entries in the mapping-order entry list (``[S]``)."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def bucket_entries(self, b: int) -> np.ndarray:
        """``[Gb, Wb]`` entry indices (into ``[S]``) of bucket b's stack; padding points at S."""
        offsets = self.entry_offsets()
        idx = np.full((len(self.buckets[b]), self.bucket_width(b)), self.total_size, np.int32)
        for slot, g in enumerate(self.buckets[b]):
            idx[slot, : self.sizes[g]] = np.arange(offsets[g], offsets[g + 1])
        return idx

    def bucket_order(self) -> np.ndarray:
        """Group index at each position of the bucket-concatenated order ``[G]``."""
        return np.asarray([g for bucket in self.buckets for g in bucket], np.int32)

    def entry_index(self) -> np.ndarray:
        """``[S]`` canonical feature index of each group entry, groups in mapping order."""
        return np.asarray([i for f in self.feature_index for i in f], np.int32)

    def flat_from_buckets(self) -> np.ndarray:
        """``[S]`` positions in the concatenation of flattened bucket outputs of each entry."""
        pos, base = {}, 0
        for b, bucket in enumerate(self.buckets):
            w = self.bucket_width(b)
            for slot, g in enumerate(bucket):
                pos[g] = base + slot * w
            base += len(bucket) * w
        return np.asarray([pos[g] + j for g in range(self.num_groups)
                           for j in range(len(self.feature_index[g]))], np.int32)

    def group_mean_matrix(self) -> np.ndarray:
        """``[S, G]``: entry → its group, weighted 1/size (per-group means by one matmul)."""
        mat = np.zeros((self.total_size, self.num_groups), np.float32)
        row = 0
        for g, f in enumerate(self.feature_index):
            mat[row: row + len(f), g] = 1.0 / len(f)
            row += len(f)
        return mat



    def to_features(self, grouped: np.ndarray) -> np.ndarray:
        """``[B, S]`` group entries → ``[B, F]`` canonical features (mean over a feature's groups)."""
        grouped = np.asarray(grouped, np.float64)
        index = self.entry_index()
        out = np.zeros((grouped.shape[0], self.num_features))
        np.add.at(out.T, index, grouped.T)
        counts = np.bincount(index, minlength=self.num_features).astype(np.float64)
        return (out / np.maximum(counts, 1.0)).astype(np.float32)


# Parameter layout versions of a checkpoint (`ModelSpec.param_layout`): 1 stored the per-group
# MLPs as bucket-padded stacks (``w1.<bucket>``; morpheus-jax 0.1), 2 the canonical stacks.
BUCKETED_LAYOUT, CANONICAL_LAYOUT = 1, 2


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A fine-tuned model's task head, stored in its checkpoint spec and in the export sidecar:
    the task (a metadata column, or ``survival``), the output count, the loss its outputs were
    trained with (``logistic_hazard``, ``bce``, ``softmax``, ``mse``: what they mean); for a
    classifier, the classes in output order (one logit for two classes: the second's); for a
    regression, the standardisation its output is in (value = output · target_std + target_mean)."""

    task: str
    n_outputs: int
    loss: str | None = None
    classes: tuple[str, ...] | None = None
    target_mean: float | None = None
    target_std: float | None = None

    def __post_init__(self):
        if not isinstance(self.n_outputs, int) or isinstance(self.n_outputs, bool) or self.n_outputs < 1:
            raise InputError(f"a task head needs at least one output, got n_outputs={self.n_outputs!r}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    @classmethod
    def from_json(cls, data, where: str) -> "HeadSpec":
        try:
            classes = data.get("classes")
            mean, std = data.get("target_mean"), data.get("target_std")
            return cls(str(data["task"]), int(data["n_outputs"]), data.get("loss"),
                       None if classes is None else tuple(classes), None if mean is None else float(mean),
                       None if std is None else float(std))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{where}: not a task head spec ({type(e).__name__}: {e})") from None

    def to_json(self) -> dict:
        out: dict = {"task": self.task, "n_outputs": self.n_outputs}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        if self.loss is not None:
            out["loss"] = self.loss
        extra = {"target_mean": self.target_mean, "target_std": self.target_std}
        return {**out, **{k: v for k, v in extra.items() if v is not None}}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint needs to rebuild its model without the dataset: the resolved
    config (a dict, `morpheus_jax.core.config.to_dict`), each modality's group mapping and
    canonical feature names, and the parameter layout version. Written as a checkpoint's
    ``spec`` item (JSON)."""

    config: dict
    groups: dict
    features: dict
    param_layout: int = CANONICAL_LAYOUT
    # A fine-tuned model's task head (what its outputs mean).
    head: HeadSpec | None = None

    @classmethod
    def build(cls, cfg: Config, groups, features) -> "ModelSpec":
        """Restricted to the config's modalities, in model order."""
        mods = list(groups) if cfg.model.modalities is None else list(cfg.model.modalities)
        config = to_dict(cfg)
        config["model"]["modalities"] = mods                 # a checkpoint records its modalities
        missing = [m for m in mods if m not in groups or m not in features]
        if missing:
            raise InputError(f"no group mapping or feature list for modalities {missing}")
        return cls(config, {m: {g: list(f) for g, f in groups[m].items()} for m in mods},
                   {m: list(features[m]) for m in mods})

    @classmethod
    def from_json(cls, data, where: str) -> "ModelSpec":
        try:
            mods = data["modalities"]
            return cls(dict(data["config"]), {m: dict(v["groups"]) for m, v in mods.items()},
                       {m: list(v["features"]) for m, v in mods.items()},
                       int(data.get("param_layout", BUCKETED_LAYOUT)),
                       None if data.get("head") is None else HeadSpec.from_json(data["head"], where))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{where}: not a MORPHEUS checkpoint spec ({type(e).__name__}: {e})") from None

    def to_json(self) -> dict:
        out = {"config": self.config, "param_layout": self.param_layout,
               "modalities": {m: {"groups": self.groups[m], "features": self.features[m]} for m in self.groups}}
        return out if self.head is None else {**out, "head": self.head.to_json()}

    def layouts(self, modalities, num_buckets: int) -> dict[str, GroupLayout]:
        missing = [m for m in modalities if m not in self.groups]
        if missing:
            raise InputError(f"the spec has no groups for modalities {missing} (it has {list(self.groups)})")
        return {m: GroupLayout.from_mapping(self.groups[m], self.features[m], num_buckets) for m in modalities}
