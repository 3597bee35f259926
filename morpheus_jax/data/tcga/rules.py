"""The authors' cohort rules (TCGA_SOURCES.md §2), as pure functions of parsed inputs.

Each rule returns what it chose and why, for provenance. Where the notebook is not
reproducible (CNV ties broken by Python set order) the tie goes to the feature that comes
first in the source files' order, so the same inputs give the same cohort.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from morpheus_jax.core.errors import SourceError
from morpheus_jax.data.tcga.sources import AUTOSOMES, sample_code

# Chromosome clusters (name → number of groups); a name joins chromosomes with ';'.
CNV_CLUSTERS = (("chr1", 8), ("chr7", 7), ("chr3", 4), ("chr4;chr5", 1), ("chr17", 5), ("chr8", 5), ("chr20", 4),
                ("chr12", 3), ("chr2;chr22;chr21", 1), ("chr14;chr15;chr16", 1), ("chr19", 3), ("chr6", 3),
                ("chr11", 2), ("chr13", 1), ("chr9;chr10", 1), ("chr18", 1))
DNAM_CLUSTERS = (("chr1", 6), ("chr19", 4), ("chr11", 3), ("chr17", 3), ("chr2", 3), ("chr3", 3), ("chr6", 3),
                 ("chr12", 3), ("chr7", 2), ("chr5", 2), ("chr8", 2), ("chr20", 2), ("chr16", 2), ("chr10", 2),
                 ("chr4", 2), ("chr9", 2), ("chr15", 1), ("chr14", 1), ("chr22", 1), ("chr13", 1), ("chr18", 1),
                 ("chr21", 1))
PRESENCE = 0.99  # a feature is kept when present in at least this fraction of pretrain patients


def patient_of(name: str) -> str:
    """A slide file's patient: the first 12 characters (``TCGA-02-0001``)."""
    return name[:12]


def order_slides(slides: list) -> list:
    """A patient's slides by patch count, descending (ties: file name order)."""
    return sorted(sorted(slides, key=lambda s: s.name), key=lambda s: s.n_patches, reverse=True)


def split_patients(patients: list[str], projects: list[str], fine_tune: float, val: float, seed: int) -> dict[str, str]:
    """The authors' split: ``train_test_split(test_size=fine_tune, random_state=seed,
    stratify=project_id)`` → fine-tune; the rest ``train_test_split(test_size=val,
    random_state=seed)`` → val-pretrain / pretrain."""
    split = {p: "pretrain" for p in patients}
    rest = list(patients)
    if fine_tune > 0:
        counts = pd.Series(projects).value_counts()
        if counts.min() < 2:
            raise SourceError(f"project {counts.idxmin()!r} has {counts.min()} patient with a slide; the fine-tune "
                              "split is stratified by project_id and needs at least 2 per project (or "
                              "--fine-tune-fraction 0)")
        try:
            rest, tune = train_test_split(patients, test_size=fine_tune, random_state=seed, stratify=projects)
        except ValueError as e:
            raise SourceError(f"cannot split {len(patients)} patients of {counts.size} projects with "
                              f"--fine-tune-fraction {fine_tune} stratified by project_id ({e})") from None
        split.update({p: "fine-tune" for p in tune})
    if val > 0:
        try:
            _, held = train_test_split(rest, test_size=val, random_state=seed)
        except ValueError as e:
            raise SourceError(f"cannot hold out --val-fraction {val} of {len(rest)} pretraining patients ({e})") from None
        split.update({p: "val-pretrain" for p in held})
    return split


def choose_rna_sample(samples: list[str]) -> tuple[str | None, str]:
    """The RNA column of one patient: the primary tumour (-01), else the lowest other tumour
    code (02–09); a normal (10–19) or control (20–29) is never the tumour profile."""
    typed = sorted((code, s) for s in samples if (code := sample_code(s)) is not None)
    tumour = [(c, s) for c, s in typed if 1 <= c <= 9]
    if not tumour:
        return None, f"no tumour sample (has {', '.join(sorted(samples))})"
    code, chosen = tumour[0]
    if code == 1:
        return chosen, "primary tumour (-01)"
    return chosen, (f"no primary tumour (-01); lowest other tumour code -{code:02d} of "
                    f"{', '.join(s for _, s in tumour)}")


def choose_file(rows: pd.DataFrame) -> tuple[int, str]:
    """A patient's CNV or DNAm file (rows in sample-sheet order): the first whose first listed
    sample is a primary tumour, else the first. Returns (row label, why)."""
    primary = rows.index[rows["first_primary"].to_numpy(bool)]
    if len(primary):
        return primary[0], ("first listed sample is a primary tumour" +
                            (f" (first of {len(primary)} such files)" if len(primary) > 1 else ""))
    return rows.index[0], f"no file lists a primary tumour first; the first of {len(rows)}"


_CHUNK = 16384  # columns per pass: the statistics never copy the whole table


def _column_chunks(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, fn) -> np.ndarray:
    """``fn`` over ``values[rows][:, cols]`` a chunk of columns at a time (no full copy)."""
    parts = [fn(values[np.ix_(rows, cols[a:a + _CHUNK])]) for a in range(0, cols.size, _CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0)


def select_features(values: np.ndarray, rows: np.ndarray, names: list[str], chrom: list[str | None],
                    eligible: np.ndarray, k: int, eligible_reason: str) -> tuple[np.ndarray, dict[str, int]]:
    """Columns of ``values[rows]`` (``rows``: the pretrain patients; columns: candidates in
    source order, NaN = missing) kept by
    the authors' filters, in source order: drop all-missing, then repeated names (keep first),
    keep those present in ≥ 99 % of the rows, drop chrX/chrY (keep chr1–22), drop
    ``~eligible`` (``eligible_reason``), keep the ``k`` with the largest std (ddof 1; ties: the
    earlier column). Returns (indices, dropped count per reason)."""
    dropped: dict[str, int] = {}
    rows = np.asarray(rows)
    keep = np.ones(values.shape[1], bool)

    def drop(mask: np.ndarray, reason: str) -> None:
        hit = keep & mask
        dropped[reason] = int(hit.sum())
        keep[hit] = False

    present_count = _column_chunks(values, rows, np.arange(values.shape[1]), lambda x: (~np.isnan(x)).sum(0))
    drop(present_count == 0, "all missing in pretrain patients")
    seen: set[str] = set()
    dup = np.zeros_like(keep)
    for j in np.flatnonzero(keep):
        dup[j] = names[j] in seen
        seen.add(names[j])
    drop(dup, "repeated name (first kept)")
    drop(~(present_count / rows.size >= PRESENCE), f"present in < {PRESENCE:.0%} of pretrain patients")
    drop(~np.isin(np.array(chrom, object), AUTOSOMES), "not on chr1-22 (chrX, chrY, unplaced)")
    drop(~eligible, eligible_reason)
    cols = np.flatnonzero(keep)
    std = _column_chunks(values, rows, cols, lambda x: pd.DataFrame(x).std(ddof=1).to_numpy())
    order = np.argsort(-np.nan_to_num(std, nan=-np.inf), kind="stable")
    top = np.sort(cols[order[:k]])
    dropped[f"outside the {k} largest standard deviations"] = int(cols.size - top.size)
    return top, dropped


def chromosome_groups(names: list[str], chrom: list[str], pos: np.ndarray, clusters, flag: str,
                      k: int) -> dict[str, list[str]]:
    """The authors' chromosome clusters: a cluster's features sorted by position (ties: given
    order), cut into ``count`` contiguous blocks of ceil(n / count) named ``<name>-<i>``, or
    one group ``<name>``. A block left empty is an error naming it and ``flag k``."""
    groups: dict[str, list[str]] = {}
    chrom_arr = np.array(chrom, object)
    for cluster, count in clusters:
        idx = np.flatnonzero(np.isin(chrom_arr, cluster.split(";")))
        idx = idx[np.argsort(pos[idx], kind="stable")]
        members = [names[i] for i in idx]
        size = max(1, math.ceil(len(members) / count))
        for i in range(count):
            block = members[i * size:(i + 1) * size]
            gname = cluster if count == 1 else f"{cluster}-{i + 1}"
            if not block:
                raise SourceError(f"group {gname!r} would be empty: {len(members)} of the {len(names)} selected "
                                  f"features ({flag} {k}) lie on {cluster}, cut into {count} blocks of "
                                  f"ceil({len(members)}/{count}) = {size}; {cluster} needs more than "
                                  f"{(count - 1) ** 2} (raise {flag}, or check the inputs)")
            groups[gname] = block
    return groups


def gene_set_groups(sets: dict[str, list[str]], present: set[str], source: str) -> dict[str, list[str]]:
    """RNA groups: the gene sets in file order, each with its genes present in the matrices."""
    groups = {}
    for name, genes in sets.items():
        kept = [g for g in genes if g in present]
        if not kept:
            raise SourceError(f"{source}: gene set {name!r} has no gene in the RNA matrices "
                              f"(its {len(genes)} genes, e.g. {genes[:3]}, are absent)")
        groups[name] = kept
    return groups


def mapping_groups(mapping: dict[str, list[str]], present: set[str], source: str) -> tuple[dict, list[str]]:
    """Given groups with the features the data lacks dropped: (groups, dropped features)."""
    groups, lacking = {}, []
    for name, members in mapping.items():
        kept = [f for f in members if f in present]
        lacking += [f for f in members if f not in present]
        if not kept:
            raise SourceError(f"{source}: group {name!r} has no feature in the data (e.g. {members[:3]})")
        groups[name] = kept
    return groups, list(dict.fromkeys(lacking))
