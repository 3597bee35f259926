"""`morpheus tcga build`: public TCGA downloads → the raw layout, by the authors' rules.

OUT (written beside, renamed into place when complete; nothing partial is left)::

    metadata.csv        submitter_id, project_id, split, WSI, the clinical table's columns
    omics/<m>.csv       patients × selected features, source values (missing stays empty)
    mappings/<m>.json   {group: [features]}
    features/           links to the slide files (never copies)
    provenance.json     parameters, inputs (size, mtime), per patient and modality what was
                        chosen and why, counts dropped per reason
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from morpheus_jax.core.atomic import temp_path
from morpheus_jax.core.errors import OutputExists, SourceError
from morpheus_jax.data.raw import read_mapping
from morpheus_jax.data.tcga import omics as om
from morpheus_jax.data.tcga import rules
from morpheus_jax.data.tcga import sources as src
from morpheus_jax.data.tcga.cohort import Cohort, read_cohort

OUTPUTS = ("metadata.csv", "omics", "mappings", "features", "provenance.json")
PIPELINES = {"ascat2": None, "ascat3": ".ascat3.", "absolute": ".absolute_liftover."}


@dataclasses.dataclass
class BuildOptions:
    features: Path
    rna: list[Path]
    cnv: Path
    dnam: Path
    sample_sheets: list[Path]
    clinical: Path
    probe_manifest: Path
    gene_sets: Path | None = None
    mappings: dict[str, Path] = dataclasses.field(default_factory=dict)
    gene_types: Path | None = None
    cnv_features: int = 6750
    dnam_features: int = 7150
    cnv_pipeline: str = "ascat2"
    seed: int = 42
    fine_tune_fraction: float = 0.4
    val_fraction: float = 0.05
    workers: int = 1
    progress: bool = True

    def check(self) -> None:
        if (self.gene_sets is None) == ("rna" not in self.mappings):
            raise SourceError("give exactly one of --gene-sets GMT_OR_CSV and --mapping rna=JSON")
        unknown = sorted(set(self.mappings) - {"rna", "cnv", "dnam"})
        if unknown:
            raise SourceError(f"--mapping {unknown[0]}=…: expected rna, cnv or dnam")
        if self.cnv_pipeline not in PIPELINES:
            raise SourceError(f"--cnv-pipeline {self.cnv_pipeline!r}: expected one of {', '.join(PIPELINES)}")
        for flag, k in (("--cnv-features", self.cnv_features), ("--dnam-features", self.dnam_features),
                        ("--workers", self.workers)):
            if k < 1:
                raise SourceError(f"{flag} {k}: expected a positive integer")
        if not 0 <= self.seed < 2 ** 32:
            raise SourceError(f"--seed {self.seed}: expected an integer in [0, 2**32 - 1]")
        for flag, f in (("--fine-tune-fraction", self.fine_tune_fraction), ("--val-fraction", self.val_fraction)):
            if not 0 <= f < 1:
                raise SourceError(f"{flag} {f}: expected a fraction in [0, 1)")
        files = [*self.rna, *self.sample_sheets, self.clinical, self.probe_manifest, *self.mappings.values(),
                 *(p for p in (self.gene_sets, self.gene_types) if p is not None)]
        for path in files:
            if not Path(path).is_file():
                raise SourceError(f"{path}: no such file")
        for flag, d in (("--features", self.features), ("--cnv", self.cnv), ("--dnam", self.dnam)):
            if not Path(d).is_dir():
                raise SourceError(f"{d}: {flag} expects a folder")


def check_out(out: Path) -> None:
    """OUT is absent, empty, or an earlier build (only the names this command writes)."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out}: exists and is not a folder")
    if not out.exists():
        return
    allowed = {"omics": {f"{m}.csv" for m in ("rna", "dnam", "cnv")},
               "mappings": {f"{m}.json" for m in ("rna", "dnam", "cnv")}}
    for entry in sorted(out.iterdir()):
        foreign = entry.name not in OUTPUTS
        if not foreign and entry.name in allowed:
            foreign = entry.is_dir() and next((e for e in sorted(entry.iterdir()) if e.name not in allowed[entry.name]),
                                              None)
            entry = foreign or entry
        elif not foreign and entry.name == "features":
            foreign = entry.is_dir() and next((e for e in sorted(entry.iterdir()) if not e.is_symlink()), None)
            entry = foreign or entry
        if foreign:
            raise OutputExists(f"{out}: holds {entry} which tcga build did not write; give an empty or new OUT "
                               "(nothing in it is deleted)")


def build(out: str | os.PathLike, opts: BuildOptions) -> dict:
    """Build OUT from the downloads; returns the provenance's summary."""
    t0 = time.time()
    out = Path(out)
    opts.check()
    check_out(out)
    cohort = read_cohort(opts, exclude=out.resolve())
    prov = _provenance(opts, cohort)
    tables, groups = {}, {}
    tables["rna"], groups["rna"] = _rna(opts, cohort, prov)
    for m in ("cnv", "dnam"):
        tables[m], groups[m] = _gdc_modality(m, opts, cohort, prov)
    prov["seconds"] = round(time.time() - t0, 1)
    _write(out, cohort, tables, groups, prov)
    return prov["summary"]


def _provenance(opts: BuildOptions, cohort: Cohort) -> dict:
    params = {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, list)
                  else {m: str(p) for m, p in v.items()} if isinstance(v, dict) else v)
              for k, v in dataclasses.asdict(opts).items() if k != "progress"}
    inputs = {"rna": [src.input_record(p) for p in opts.rna],
              "sample_sheets": [src.input_record(p) for p in opts.sample_sheets],
              "clinical": src.input_record(opts.clinical), "probe_manifest": src.input_record(opts.probe_manifest),
              "mappings": {m: src.input_record(p) for m, p in opts.mappings.items()},
              "slides": [src.input_record(s.path) for p in cohort.patients for s in cohort.slides[p]]}
    for key in ("gene_sets", "gene_types"):
        if getattr(opts, key) is not None:
            inputs[key] = src.input_record(getattr(opts, key))
    patients = {p: {"project_id": cohort.projects[p], "split": cohort.split[p],
                    "slides": [{"file": s.name, "patches": s.n_patches} for s in cohort.slides[p]]}
                for p in cohort.patients}
    summary = {"patients": len(cohort.patients),
               "splits": {s: sum(v == s for v in cohort.split.values()) for s in ("pretrain", "val-pretrain",
                                                                                  "fine-tune")}}
    return {"command": "morpheus tcga build", "parameters": params, "inputs": inputs, "patients": patients,
            "dropped": {"patients": cohort.dropped_patients, "slides": cohort.dropped_slides},
            "features": {}, "summary": summary}


# -- RNA ---------------------------------------------------------------------------------------------------------

def _rna(opts: BuildOptions, cohort: Cohort, prov: dict) -> tuple[pd.DataFrame, dict]:
    headers = {path: src.xena_samples(path) for path in opts.rna}
    where: dict[str, list[tuple[str, Path]]] = {}
    for path, samples in headers.items():
        for s in samples:
            where.setdefault(s[:12], []).append((s, path))
    chosen: dict[str, tuple[str, Path]] = {}
    no_tumour = 0
    for p in cohort.patients:
        candidates = where.get(p, [])
        sample, why = rules.choose_rna_sample(sorted({s for s, _ in candidates}))
        entry = {"why": why if candidates else "no sample in the RNA matrices"}
        if sample is not None:
            chosen[p] = (sample, next(f for s, f in candidates if s == sample))
            entry.update(sample=sample, file=str(chosen[p][1]))
        else:
            no_tumour += bool(candidates)
        prov["patients"][p]["rna"] = entry
    values, genes = _rna_values(opts, chosen, where)
    present = set(genes)
    if "rna" in opts.mappings:
        groups, lacking = rules.mapping_groups(read_mapping(opts.mappings["rna"]), present, str(opts.mappings["rna"]))
    else:
        groups, lacking = rules.gene_set_groups(src.read_gene_sets(opts.gene_sets), present, str(opts.gene_sets)), []
    features = _canonical(groups)
    table = pd.DataFrame({p: values[p].reindex(features) for p in cohort.patients if p in chosen}).T
    prov["dropped"]["rna"] = {"no tumour sample (normal or control only)": no_tumour,
                              "not in the RNA matrices": len(cohort.patients) - len(chosen) - no_tumour}
    prov["features"]["rna"] = {"selected": len(features), "groups": len(groups),
                               "mapping features the data lacks": lacking}
    return table, groups


def _rna_values(opts, chosen, where) -> tuple[dict[str, pd.Series], list[str]]:
    """Each chosen sample's column, read once per matrix; a sample in two matrices must hold
    the same values in both."""
    wanted: dict[Path, list[str]] = {path: [] for path in opts.rna}
    for sample, _ in chosen.values():
        for s, f in where[sample[:12]]:
            if s == sample:
                wanted[f].append(sample)
    columns: dict[str, tuple[pd.Series, Path]] = {}
    genes: dict[str, None] = {}
    for path in opts.rna:
        df = src.xena_values(path, wanted[path]) if wanted[path] else src.xena_values(path, [])
        genes.update(dict.fromkeys(df.index))
        for s in wanted[path]:
            col = df[s]
            if s in columns:
                first, fpath = columns[s]
                a, b = first.align(col)
                if not ((a == b) | (a.isna() & b.isna())).all():
                    gene = a.index[~((a == b) | (a.isna() & b.isna()))][0]
                    raise SourceError(f"{path}: sample {s!r} is also in {fpath} with other values (gene {gene!r}: "
                                      f"{b[gene]} vs {a[gene]}); keep one matrix per project")
                continue
            columns[s] = (col, path)
    return {p: columns[s][0] for p, (s, _) in chosen.items()}, list(genes)


def _canonical(groups: dict[str, list[str]]) -> list[str]:
    return list(dict.fromkeys(f for members in groups.values() for f in members))


# -- copy number and methylation ----------------------------------------------------------------------------------

def _gdc_files(modality: str, opts: BuildOptions, cohort: Cohort, prov: dict) -> dict[str, Path]:
    """Each cohort patient's chosen file of ``modality`` (rule: `rules.choose_file`)."""
    rows = cohort.sheets[cohort.sheets["modality"] == modality]
    root = opts.cnv if modality == "cnv" else opts.dnam
    if modality == "cnv":
        tag = PIPELINES[opts.cnv_pipeline]
        other = [t for t in PIPELINES.values() if t]
        keep = (rows["file_name"].str.contains(tag, regex=False) if tag
                else ~rows["file_name"].apply(lambda n: any(t in n for t in other)).astype(bool))
        prov["dropped"]["cnv"] = {f"files of other pipelines than {opts.cnv_pipeline}": int((~keep).sum())}
        rows = rows[keep]
    else:
        prov["dropped"]["dnam"] = {}
    paths = {}
    for label, r in rows.iterrows():
        path = src.locate(root, r["file_id"], r["file_name"])
        if path is None:
            raise SourceError(f"{r['sheet']}: row {r['row']}: file {r['file_id']}/{r['file_name']} is not under {root} "
                              "(download it with gdc-client, or remove the row)")
        paths[label] = path
    chosen = {}
    for p in cohort.patients:
        mine = rows[rows["patient"] == p]
        if mine.empty:
            prov["patients"][p][modality] = {"why": "no file in the sample sheets"}
            continue
        label, why = rules.choose_file(mine)
        chosen[p] = paths[label]
        prov["patients"][p][modality] = {"file": str(paths[label]), "file_id": mine.at[label, "file_id"],
                                         "first_sample": (mine.at[label, "samples"] or [""])[0], "why": why,
                                         "candidates": len(mine)}
    prov["dropped"][modality]["patients without a file"] = len(cohort.patients) - len(chosen)
    prov["inputs"][f"{modality}_files"] = [src.input_record(f) for f in chosen.values()]
    return chosen


def _gdc_modality(modality: str, opts: BuildOptions, cohort: Cohort, prov: dict) -> tuple[pd.DataFrame, dict]:
    chosen = _gdc_files(modality, opts, cohort, prov)
    if not chosen:
        left_out = (prov["dropped"]["cnv"].get(f"files of other pipelines than {opts.cnv_pipeline}", 0)
                    if modality == "cnv" else 0)
        why = f" for --cnv-pipeline {opts.cnv_pipeline} ({left_out} files of other pipelines left out)" if left_out else ""
        raise SourceError(f"no cohort patient has a {modality} file{why} in the sample sheets "
                          f"({', '.join(str(s) for s in opts.sample_sheets)})")
    mapping = read_mapping(opts.mappings[modality]) if modality in opts.mappings else None
    table = (_read_cnv if modality == "cnv" else _read_dnam)(opts, list(chosen.values()), mapping)
    patients = list(chosen)
    flag = f"--{modality}-features"
    if mapping is not None:
        present = {n for n, c in zip(table.names, (~np.isnan(table.values)).any(0)) if c}
        groups, lacking = rules.mapping_groups(mapping, present, str(opts.mappings[modality]))
        first = {}
        for j, n in enumerate(table.names):
            first.setdefault(n, j)
        cols = [first[f] for f in _canonical(groups)]
        prov["features"][modality] = {"selected": len(cols), "groups": len(groups),
                                      "mapping features the data lacks": lacking}
    else:
        groups, cols = _derive(modality, table, patients, cohort, opts, prov, flag)
    frame = pd.DataFrame(table.values[:, cols], index=patients, columns=[table.names[j] for j in cols])
    return frame, groups


def _derive(modality, table: om.Table, patients, cohort, opts, prov, flag) -> tuple[dict, list[int]]:
    pre_rows = [i for i, p in enumerate(patients) if cohort.split[p] == "pretrain"]
    if not pre_rows:
        raise SourceError(f"no pretrain patient has a {modality} file: features are chosen on pretrain patients only")
    if modality == "cnv":
        eligible = (np.isin(np.array(table.names, object), list(src.read_gene_types(opts.gene_types)))
                    if opts.gene_types else np.ones(len(table.names), bool))
        reason = "not protein-coding (--gene-types)"
    else:
        eligible, reason = table.listed, "not on every array type in the cohort"
    k = opts.cnv_features if modality == "cnv" else opts.dnam_features
    cols, dropped = rules.select_features(table.values, np.asarray(pre_rows), table.names, table.chrom, eligible, k,
                                          reason)
    names = [table.names[j] for j in cols]
    clusters = rules.CNV_CLUSTERS if modality == "cnv" else rules.DNAM_CLUSTERS
    groups = rules.chromosome_groups(names, [table.chrom[j] for j in cols], table.pos[cols], clusters, flag, k)
    order = {n: j for n, j in zip(names, cols)}
    info = {"candidates": len(table.names), "dropped": dropped, "selected": len(cols), "groups": len(groups)}
    if modality == "dnam":
        info["most lines of one file absent from the probe manifest"] = table.unmatched
    prov["features"][modality] = info
    return groups, [order[f] for f in _canonical(groups)]


def _read_cnv(opts: BuildOptions, paths: list[Path], mapping) -> om.Table:
    allowed = set(_canonical(mapping)) if mapping is not None else None
    first = om.cnv_keys(src.read_cnv_file(paths[0]), allowed)
    state = {"keys": first["key"].tolist(), "allowed": allowed}
    return om.read_table(paths, state, first["gene_name"].tolist(), first["chrom"].tolist(),
                         first["start"].to_numpy(np.float64), om.cnv_row, opts.workers, "copy-number files",
                         opts.progress)


def _read_dnam(opts: BuildOptions, paths: list[Path], mapping) -> om.Table:
    man = src.read_manifest(opts.probe_manifest)
    if mapping is not None:
        man = man.set_index("probe").reindex(_canonical(mapping)).reset_index()
    else:
        man = man[man["chrom"].isin(src.AUTOSOMES)]
    probes = man["probe"].tolist()
    return om.read_table(paths, {"keys": probes}, probes, man["chrom"].tolist(), man["pos"].to_numpy(np.float64),
                         om.dnam_row, opts.workers, "methylation files", opts.progress)


# -- output ---------------------------------------------------------------------------------------------------------

def _write(out: Path, cohort: Cohort, tables: dict, groups: dict, prov: dict) -> None:
    work = temp_path(out)
    try:
        (work / "omics").mkdir(parents=True)
        (work / "mappings").mkdir()
        (work / "features").mkdir()
        meta = pd.DataFrame({"submitter_id": cohort.patients,
                             "project_id": [cohort.projects[p] for p in cohort.patients],
                             "split": [cohort.split[p] for p in cohort.patients],
                             "WSI": [str([s.name for s in cohort.slides[p]]) for p in cohort.patients]})
        labels = cohort.labels.reindex(cohort.patients).reset_index(drop=True)
        pd.concat([meta, labels], axis=1).to_csv(work / "metadata.csv", index=False)
        for m, frame in tables.items():
            frame = frame.astype("Int64") if m == "cnv" and _integral(frame) else frame
            frame.rename_axis("submitter_id").to_csv(work / "omics" / f"{m}.csv")
            (work / "mappings" / f"{m}.json").write_text(json.dumps(groups[m], indent=1))
            prov["summary"][m] = {"patients": int(frame.shape[0]), "features": int(frame.shape[1]),
                                  "groups": len(groups[m])}
        for p in cohort.patients:
            for s in cohort.slides[p]:
                os.symlink(s.path, work / "features" / s.name)
        (work / "provenance.json").write_text(json.dumps(prov, indent=1, default=_jsonable))
        _swap_in(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _integral(frame: pd.DataFrame) -> bool:
    v = frame.to_numpy(np.float64)
    v = v[~np.isnan(v)]
    return bool(np.all(v == np.round(v)))


def _jsonable(v):
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    if isinstance(v, np.floating):
        return float(v)
    return str(v)


def _swap_in(work: Path, out: Path) -> None:
    """Rename the finished build onto OUT; an earlier build there is replaced only then."""
    old = temp_path(out) if out.exists() else None
    if old is not None:
        os.replace(out, old)
    try:
        os.replace(work, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
