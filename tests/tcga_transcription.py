"""The authors' cohort rules (TCGA_SOURCES.md §2, issue 21) transcribed independently of
`morpheus_jax.data.tcga`: plain pandas / h5py / scikit-learn over the public files, written
as the rules read, for the tests to compare `tcga build`'s output against."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import pandas as pd
from sklearn.model_selection import train_test_split

AUTOSOMES = [f"chr{i}" for i in range(1, 23)]
CNV_CLUSTERS = {"chr1": 8, "chr7": 7, "chr3": 4, "chr4;chr5": 1, "chr17": 5, "chr8": 5, "chr20": 4, "chr12": 3,
                "chr2;chr22;chr21": 1, "chr14;chr15;chr16": 1, "chr19": 3, "chr6": 3, "chr11": 2, "chr13": 1,
                "chr9;chr10": 1, "chr18": 1}
DNAM_CLUSTERS = {"chr1": 6, "chr19": 4, "chr11": 3, "chr17": 3, "chr2": 3, "chr3": 3, "chr6": 3, "chr12": 3, "chr7": 2,
                 "chr5": 2, "chr8": 2, "chr20": 2, "chr16": 2, "chr10": 2, "chr4": 2, "chr9": 2, "chr15": 1,
                 "chr14": 1, "chr22": 1, "chr13": 1, "chr18": 1, "chr21": 1}


def cohort(features: Path, clinical: Path, seed=42, fine_tune=0.4, val=0.05):
    clin = pd.read_csv(clinical, sep="\t", dtype=str, keep_default_na=False)
    order = list(dict.fromkeys(clin["cases.submitter_id"]))
    project = clin.drop_duplicates("cases.submitter_id").set_index("cases.submitter_id")["project.project_id"]
    slides: dict[str, list] = {}
    for f in sorted(features.rglob("*.h5")):
        with h5py.File(f, "r") as h:
            n = h["features"].shape[-2]
        if n:
            slides.setdefault(f.name[:12], []).append((f.name, n))
    patients = [p for p in order if p in slides]
    rest, tune = train_test_split(patients, test_size=fine_tune, random_state=seed,
                                  stratify=[project[p] for p in patients])
    pre, held = train_test_split(rest, test_size=val, random_state=seed)
    split = {**{p: "pretrain" for p in pre}, **{p: "val-pretrain" for p in held}, **{p: "fine-tune" for p in tune}}
    slide_order = {p: [n for n, _ in sorted(sorted(slides[p]), key=lambda s: -s[1])] for p in patients}
    return patients, split, slide_order


def rna(matrices: list[Path], gmt: Path, patients: list[str]):
    frames = [pd.read_csv(m, sep="\t", index_col=0) for m in matrices]
    chosen, values = {}, {}
    for p in patients:
        cols = sorted({c for df in frames for c in df.columns if c[:12] == p})
        tumour = sorted((int(c[13:15]), c) for c in cols if 1 <= int(c[13:15]) <= 9)
        if tumour:
            chosen[p] = tumour[0][1]
            values[p] = next(df[chosen[p]] for df in frames if chosen[p] in df.columns)
    genes = set().union(*(df.index for df in frames))
    groups = {}
    for line in gmt.read_text().splitlines():
        name, _, *members = line.split("\t")
        groups[name] = [g for g in dict.fromkeys(members) if g in genes]
    return chosen, values, groups


def gdc_choice(sheet: pd.DataFrame, patients: list[str], primary_first) -> dict[str, pd.Series]:
    out = {}
    for p in patients:
        rows = sheet[sheet["Case ID"].str.split(", ").str[0] == p]
        if len(rows):
            first = rows[[primary_first(r) for _, r in rows.iterrows()]]
            out[p] = (first if len(first) else rows).iloc[0]
    return out


def select_and_group(wide: pd.DataFrame, chrom: pd.Series, pos: pd.Series, pretrain: list[str], eligible, k: int,
                     clusters: dict[str, int]) -> dict[str, list[str]]:
    """``wide``: patients × columns ``name#occurrence`` (source order)."""
    pre = wide.loc[[p for p in wide.index if p in pretrain]]
    pre = pre.loc[:, pre.notna().any()]
    names = pre.columns.str.rsplit("#", n=1).str[0]
    pre = pre.loc[:, ~names.duplicated()]
    pre = pre.loc[:, pre.notna().mean() >= 0.99]
    pre = pre.loc[:, chrom[pre.columns].isin(AUTOSOMES).to_numpy()]
    pre = pre.loc[:, [eligible(c) for c in pre.columns]]
    top = pre.std().sort_values(ascending=False, kind="stable").index[:k]
    top = [c for c in pre.columns if c in set(top)]
    groups = {}
    for cluster, count in clusters.items():
        members = [c for c in top if chrom[c] in cluster.split(";")]
        members = sorted(members, key=lambda c: pos[c])
        size = math.ceil(len(members) / count)
        for i in range(count):
            groups[cluster if count == 1 else f"{cluster}-{i + 1}"] = [
                c.rsplit("#", 1)[0] for c in members[i * size:(i + 1) * size]]
    return groups


def cnv(root: Path, sheet_path: Path, patients, pretrain, gene_types: Path, k: int):
    sheet = pd.read_csv(sheet_path, sep="\t", dtype=str)
    sheet = sheet[~sheet["File Name"].str.contains("ascat3|absolute_liftover")]
    files = gdc_choice(sheet, patients, lambda r: r["Sample Type"].split(", ")[0] == "Primary Tumor")
    series, chrom, pos = {}, None, None
    for p, row in files.items():
        df = pd.read_csv(root / row["File ID"] / row["File Name"], sep="\t")
        df.index = df["gene_name"] + "#" + df.groupby("gene_name").cumcount().astype(str)
        series[p] = df["copy_number"].astype(float)
        chrom = df["chromosome"] if chrom is None else chrom
        pos = df["start"] if pos is None else pos
    wide = pd.DataFrame(series).T
    star = pd.read_csv(gene_types, sep="\t", comment="#")
    coding = set(star.loc[star["gene_type"] == "protein_coding", "gene_name"])
    groups = select_and_group(wide, chrom, pos, pretrain, lambda c: c.rsplit("#", 1)[0] in coding, k, CNV_CLUSTERS)
    return files, wide, groups


def dnam(root: Path, sheet_path: Path, manifest: Path, patients, pretrain, k: int):
    sheet = pd.read_csv(sheet_path, sep="\t", dtype=str)
    files = gdc_choice(sheet, patients, lambda r: r["Tissue Type"].split(", ")[0] == "Tumor"
                       and r["Tumor Descriptor"].split(", ")[0] == "Primary")
    man = pd.read_csv(manifest, sep="\t").drop_duplicates("probeID").set_index("probeID")
    series, listed = {}, None
    for p, row in files.items():
        df = pd.read_csv(root / row["File ID"] / row["File Name"], sep="\t", header=None, index_col=0)
        df = df[~df.index.duplicated()]
        series[p] = df[1]
        listed = set(df.index) if listed is None else listed & set(df.index)
    wide = pd.DataFrame(series).T
    wide = wide[[c for c in man.index if c in wide.columns]]  # the manifest's order; absent probes dropped
    wide.columns = wide.columns + "#0"
    chrom = pd.Series(man["CpG_chrm"].to_numpy(), index=man.index + "#0")
    pos = pd.Series(man["CpG_beg"].to_numpy(), index=man.index + "#0")
    groups = select_and_group(wide, chrom, pos, pretrain, lambda c: c[:-2] in listed, k, DNAM_CLUSTERS)
    return files, wide, groups
