"""The cohort: patients from the clinical table that have a slide, their slides in the
authors' order, their project and split, and the sample sheets' rows by modality."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from morpheus_jax.core.errors import SourceError
from morpheus_jax.core.log import progress_off
from morpheus_jax.data.tcga import rules
from morpheus_jax.data.tcga.omics import pool
from morpheus_jax.data.tcga import sources as src

RESERVED = {"submitter_id", "project_id", "split", "WSI"}
MODALITY_FILES = {"cnv": "copy-number (*.gene_level_copy_number.v36.tsv)",
                  "dnam": "methylation (*.methylation_array.sesame.level3betas.txt)"}


@dataclasses.dataclass
class Cohort:
    patients: list[str]                       # clinical order
    projects: dict[str, str]
    split: dict[str, str]
    slides: dict[str, list[src.Slide]]        # patch count, descending
    labels: pd.DataFrame                      # clinical columns, indexed by patient
    sheets: pd.DataFrame                      # every sheet row, with ``modality`` (cnv, dnam or '')
    dropped_patients: dict[str, int]
    dropped_slides: dict[str, int]


def sheet_modality(file_name: str, category: str) -> str:
    if "gene_level_copy_number" in file_name or category == "Copy Number Variation":
        return "cnv"
    if "methylation_array" in file_name or "level3betas" in file_name or category == "DNA Methylation":
        return "dnam"
    return ""


def read_cohort(opts, exclude: Path | None = None) -> Cohort:
    clinical = src.read_clinical(opts.clinical, RESERVED)
    sheets = src.read_sample_sheets(opts.sample_sheets)
    sheets["modality"] = [sheet_modality(n, c) for n, c in zip(sheets["file_name"], sheets["category"])]
    for m, what in MODALITY_FILES.items():
        if not (sheets["modality"] == m).any():
            raise SourceError(f"{', '.join(str(s) for s in opts.sample_sheets)}: no row lists a {what} file; "
                              f"give the GDC sample sheet of the {m} files too (--sample-sheet TSV…)")
    known = set(clinical.patients)
    slides, dropped_slides = _slides(opts, known, exclude)
    patients = [p for p in clinical.patients if slides.get(p)]
    if not slides:
        raise SourceError(f"{opts.features}: no slide .h5 file with patches below it (expected the extracted UNI2-h "
                          "archives, one TCGA-…h5 file per slide)")
    if not patients:
        raise SourceError(f"{opts.clinical}: none of its {len(clinical.patients)} patient ids (column "
                          f"{clinical.id_column!r}, e.g. {clinical.patients[0]!r}) has a slide under {opts.features} "
                          f"(slides of {len(slides)} patients, e.g. {next(iter(slides))!r}); expected TCGA patient "
                          "barcodes (TCGA-XX-XXXX), the first 12 characters of the slide file names")
    dropped_patients = {"no slide with patches": len(clinical.patients) - len(patients),
                        "slides but not in the clinical table": len({p for p in slides if p not in known})}
    sheet_project = sheets.drop_duplicates("patient").set_index("patient")["project"].to_dict()
    projects = {}
    for p in patients:
        projects[p] = clinical.projects.get(p) or sheet_project.get(p, "")
        if not projects[p]:
            raise SourceError(f"{opts.clinical}: patient {p!r} has no project_id (no project column value, no row in "
                              "the sample sheets); the split is stratified by project")
    try:
        split = rules.split_patients(patients, [projects[p] for p in patients], opts.fine_tune_fraction,
                                     opts.val_fraction, opts.seed)
    except SourceError as e:  # the cohort (its patients and projects) comes from the clinical table
        raise SourceError(f"{opts.clinical}: {e}") from None
    return Cohort(patients, projects, split, {p: slides[p] for p in patients}, clinical.labels, sheets,
                  dropped_patients, dropped_slides)


def _slides(opts, known: set[str], exclude: Path | None) -> tuple[dict[str, list[src.Slide]], dict[str, int]]:
    paths = src.find_slides(Path(opts.features), exclude)
    counts = _patch_counts(paths, opts.workers, opts.progress)
    by_name: dict[str, src.Slide] = {}
    dropped = {"no patches": 0, "same file name found again": 0, "patient not in the clinical table": 0}
    for path, n in zip(paths, counts):
        if path.name in by_name:
            dropped["same file name found again"] += 1
        elif n == 0:
            dropped["no patches"] += 1
        else:
            by_name[path.name] = src.Slide(path.name, Path(os.path.abspath(path)), rules.patient_of(path.name), n)
    grouped: dict[str, list[src.Slide]] = {}
    for s in by_name.values():
        grouped.setdefault(s.patient, []).append(s)
    dropped["patient not in the clinical table"] = sum(len(v) for p, v in grouped.items() if p not in known)
    return {p: rules.order_slides(v) for p, v in grouped.items()}, dropped


def _patch_counts(paths: list[Path], workers: int, progress: bool) -> list[int]:
    bar = dict(total=len(paths), desc="slides", disable=progress_off(progress))
    if workers <= 1 or len(paths) < 64:
        return [src.slide_patches(p) for p in tqdm(paths, **bar)]
    with pool(workers) as workers_pool:
        return list(tqdm(workers_pool.map(src.slide_patches, paths, chunksize=32), **bar))
