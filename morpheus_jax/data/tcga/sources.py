"""Readers of the public TCGA files (TCGA_SOURCES.md §1), each checked as its format says.

Every problem raises `SourceError` with one line naming the file (and row or column) and what
was expected. Nothing here applies a cohort rule (that is `rules`); readers only parse.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from morpheus_jax.core.errors import SourceError
from morpheus_jax.data import raw
from morpheus_jax.data.raw import as_numbers

AUTOSOMES = tuple(f"chr{i}" for i in range(1, 23))
# Clinical id columns, in the order one is looked for (old GDC layout, 2025 layout, SurvPath).
ID_COLUMNS = ("submitter_id", "case_submitter_id", "cases.submitter_id", "case_id")
PROJECT_COLUMNS = ("project_id", "cases.project_id", "project.project_id")
GDC_MISSING = "'--"


def compression(path: Path) -> str | None:
    return raw.compression(path, SourceError)


def _open_text(path: Path):
    return raw.open_text(path, SourceError)


def _first_line(path: Path) -> str:
    try:
        with _open_text(path) as f:
            return f.readline()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read the first line ({e})") from None


def chromosome(name) -> str | None:
    """``chr1`` for ``chr1`` / ``1`` / ``CHR1``; None for a missing value."""
    if name is None or (isinstance(name, float) and np.isnan(name)):
        return None
    s = str(name).strip()
    if not s or s.upper() == "NA":
        return None
    return "chr" + s[3:] if s.lower().startswith("chr") else "chr" + s


# -- slides ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Slide:
    name: str          # file name (the link's name under OUT/features)
    path: Path         # the file as found (absolute)
    patient: str       # first 12 characters of the name
    n_patches: int


def find_slides(features: Path, exclude: Path | None = None) -> list[Path]:
    """Every ``*.h5`` under ``features`` (recursively, symlinks followed), sorted by path."""
    if not features.is_dir():
        raise SourceError(f"{features}: --features is not a folder (expected the extracted UNI2-h archives)")
    found = []
    for root, dirs, files in os.walk(features, followlinks=True):
        if exclude is not None and Path(root).resolve() == exclude:
            dirs[:] = []
            continue
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if f.endswith(".h5") and not f.startswith(".")]
    return sorted(found)


def slide_patches(path: Path) -> int:
    """N of a slide's ``features`` ``[1, N, D]`` or ``[N, D]`` without reading the data."""
    try:
        with h5py.File(path, "r") as f:
            data = f.get("features")
            if not isinstance(data, h5py.Dataset):
                raise SourceError(f"{path}: no dataset 'features' (has {list(f.keys())[:5]}); expected a UNI2-h "
                                  "slide file with features [1, N, 1536]")
            shape = data.shape
    except OSError as e:
        if not os.path.isfile(path):
            raise SourceError(f"{path}: no such file (a broken link?); expected a UNI2-h slide .h5") from None
        raise SourceError(f"{path}: unreadable HDF5 ({e}); expected a UNI2-h slide file with features "
                          "[1, N, 1536]") from None
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise SourceError(f"{path}: dataset 'features' has shape {shape}, expected [1, N, D] or [N, D]")
    return int(shape[0])


# -- RNA (UCSC Xena HiSeqV2_PANCAN) ------------------------------------------------------------------------------

def xena_samples(path: Path) -> list[str]:
    """The sample barcodes of a Xena matrix's header, checked unique."""
    header = _first_line(path).rstrip("\r\n").split("\t")
    if len(header) < 2:
        raise SourceError(f"{path}: expected a tab-separated Xena matrix (header 'sample<TAB>TCGA-…-01<TAB>…'), "
                          f"got {header[0][:60]!r}")
    seen: dict[str, int] = {}
    for i, s in enumerate(header[1:], start=2):
        if not s.strip():
            raise SourceError(f"{path}: header column {i} is empty (expected a sample barcode)")
        if s in seen:
            raise SourceError(f"{path}: sample {s!r} appears twice in the header (columns {seen[s]} and {i})")
        seen[s] = i
    return header[1:]


def xena_values(path: Path, samples: list[str]) -> pd.DataFrame:
    """genes × ``samples`` (float64, missing NaN) of a Xena matrix; a gene listed twice keeps
    its first row."""
    wanted = {_first_line(path).rstrip("\r\n").split("\t")[0], *samples}
    try:
        df = pd.read_csv(path, sep="\t", index_col=0, usecols=lambda c: c in wanted,
                         dtype={0: str}, na_values=["NA", "nan", "NaN", ""], keep_default_na=False,
                         compression=compression(path), encoding="utf-8-sig")
    except (OSError, EOFError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{path}: cannot read the Xena matrix ({e})") from None
    if df.index.size == 0:
        raise SourceError(f"{path}: a header but no gene rows (expected a Xena matrix, genes × samples)")
    df = df[~df.index.duplicated(keep="first")]
    for col in df.columns:
        values, bad = as_numbers(df[col])
        if bad is not None:
            raise SourceError(f"{path}: sample {col!r}: non-numeric value {df[col].iloc[bad]!r} for gene "
                              f"{df.index[bad]!r} (expected a number, or NA for missing)")
        df = df.assign(**{col: values})
    return df.astype(np.float64)


# -- GDC sample sheets -------------------------------------------------------------------------------------------

SHEET_COLUMNS = ("File ID", "File Name", "Project ID", "Case ID", "Sample ID")


def read_sample_sheets(paths: list[Path]) -> pd.DataFrame:
    """All sheets' rows in order: ``file_id, file_name, project, patient, samples`` (list),
    ``first_primary`` (the first listed sample is a primary tumour), ``sheet``, ``row``."""
    frames = []
    for path in paths:
        df = _read_table(path, "\t")
        absent = [c for c in SHEET_COLUMNS if c not in df.columns]
        if absent:
            raise SourceError(f"{path}: not a GDC sample sheet: missing column(s) {absent} (has {list(df.columns)[:9]})")
        old, new = "Sample Type" in df.columns, {"Tissue Type", "Tumor Descriptor"} <= set(df.columns)
        if not (old or new):
            raise SourceError(f"{path}: a GDC sample sheet needs 'Sample Type' (portal up to 2.3) or 'Tissue Type' and "
                              "'Tumor Descriptor' (portal 2.4, March 2025)")
        if df.empty:
            raise SourceError(f"{path}: a header but no rows (expected one row per downloaded file)")
        out = pd.DataFrame({"file_id": df["File ID"].str.strip(), "file_name": df["File Name"].str.strip(),
                            "project": df["Project ID"].str.strip(), "sheet": str(path), "row": df.index + 2,
                            "category": df["Data Category"].str.strip() if "Data Category" in df.columns else ""})
        out["samples"] = [_split_list(v) for v in df["Sample ID"]]
        out["patient"] = [(_split_list(v) or [""])[0] for v in df["Case ID"]]
        if old:
            typed = [(_split_list(v) or [""])[0] == "Primary Tumor" for v in df["Sample Type"]]
        else:
            typed = [(_split_list(t) or [""])[0] == "Tumor" and (_split_list(d) or [""])[0] == "Primary"
                     for t, d in zip(df["Tissue Type"], df["Tumor Descriptor"])]
        out["first_primary"] = [_primary(s[0] if s else "", t) for s, t in zip(out["samples"], typed)]
        for col, what in (("file_id", "File ID"), ("file_name", "File Name"), ("patient", "Case ID")):
            blank = out[col] == ""
            if blank.any():
                raise SourceError(f"{path}: row {int(out['row'][blank].iloc[0])}: column {what!r} is empty")
        frames.append(out)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["file_id", "file_name", "project", "sheet", "row", "category", "samples", "patient", "first_primary"])


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _primary(barcode: str, typed: bool) -> bool:
    """A barcode's sample type decides (01 = primary solid tumour); the sheet's type columns
    only where the sample id is not a TCGA barcode."""
    code = sample_code(barcode)
    return code == 1 if code is not None else typed


def sample_code(barcode: str) -> int | None:
    """The two-digit sample type of ``TCGA-TSS-PART-SS…`` (None if not a sample barcode)."""
    if len(barcode) >= 15 and barcode[12] == "-" and barcode[13:15].isdigit():
        return int(barcode[13:15])
    return None


def locate(root: Path, file_id: str, file_name: str) -> Path | None:
    """A sheet row's file in a gdc-client folder (``<File ID>/<File Name>``, or flat)."""
    for p in (root / file_id / file_name, root / file_name):
        if p.is_file():
            return p
    return None


# -- clinical, gene sets, probe manifest, gene types ------------------------------------------------------------

def _read_table(path: Path, sep: str | None = None) -> pd.DataFrame:
    """A delimited text table as strings ('' for empty cells; BOM, CRLF and compression handled)."""
    if sep is None:
        first = _first_line(path)
        sep = "\t" if "\t" in first or ("," not in first) else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, compression=compression(path),
                           encoding="utf-8-sig", comment=None)
    except pd.errors.EmptyDataError:
        raise SourceError(f"{path}: the file is empty (expected a header row)") from None
    except (OSError, EOFError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{path}: cannot read the table ({e})") from None


@dataclasses.dataclass
class Clinical:
    patients: list[str]            # in order of first appearance
    projects: dict[str, str]       # patient → project_id (where the table has one)
    labels: pd.DataFrame           # indexed by patient; strings, '' = missing
    id_column: str


def read_clinical(path: Path, reserved: set[str]) -> Clinical:
    df = _read_table(path)
    id_col = next((c for c in ID_COLUMNS if c in df.columns), None)
    if id_col is None:
        raise SourceError(f"{path}: no patient id column (expected one of {', '.join(ID_COLUMNS)}; "
                          f"has {list(df.columns)[:8]})")
    if df.empty:
        raise SourceError(f"{path}: a header but no rows (expected one row per patient, id in column {id_col!r})")
    clash = sorted((set(df.columns) & reserved) - {id_col, *PROJECT_COLUMNS})
    if clash:
        raise SourceError(f"{path}: column {clash[0]!r} is a name metadata.csv reserves; rename it")
    df = df.replace({GDC_MISSING: ""})
    ids = df[id_col].str.strip()
    if (ids == "").any():
        raise SourceError(f"{path}: row {int(np.argmax(ids.to_numpy() == '')) + 2}: column {id_col!r} is empty")
    df[id_col] = ids
    proj_col = next((c for c in PROJECT_COLUMNS if c in df.columns), None)
    first = df.replace({"": np.nan}).groupby(id_col, sort=False).first().fillna("")
    projects = ({p: v for p, v in first[proj_col].items() if v} if proj_col else {})
    labels = first.drop(columns=[c for c in (proj_col,) if c])
    return Clinical(list(first.index), projects, labels, id_col)


def read_gene_sets(path: Path) -> dict[str, list[str]]:
    """GMT (``name<TAB>url<TAB>gene…``) or a genes × sets 0/1 table (CSV/TSV, first column the
    gene), in file order; a gene listed twice in a set keeps its first place."""
    if path.suffix.lower() == ".gmt" or "\t" in _first_line(path) and not path.suffix.lower() in (".csv", ".tsv"):
        sets: dict[str, list[str]] = {}
        try:
            with _open_text(path) as f:
                text = f.read()
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: cannot read the GMT file ({e})") from None
        for i, line in enumerate(text.splitlines(), start=1):
            cells = [c.strip() for c in line.rstrip("\r\n").split("\t")]
            if not any(cells):
                continue
            if len(cells) < 3 or not cells[0]:
                raise SourceError(f"{path}: line {i}: expected 'name<TAB>description<TAB>gene…' (GMT)")
            if cells[0] in sets:
                raise SourceError(f"{path}: line {i}: gene set {cells[0]!r} appears twice")
            sets[cells[0]] = list(dict.fromkeys(g for g in cells[2:] if g))
        if not sets:
            raise SourceError(f"{path}: no gene set in the GMT file")
        return sets
    df = _read_table(path)
    if df.shape[1] < 2:
        raise SourceError(f"{path}: expected a genes × gene sets table (first column the gene, one 0/1 column per set)")
    genes = df.iloc[:, 0].str.strip()
    sets = {}
    for col in df.columns[1:]:
        flags = pd.to_numeric(df[col].replace({"True": "1", "False": "0", "TRUE": "1", "FALSE": "0"}), errors="coerce")
        if flags.isna().any() or not flags.isin([0, 1]).all():
            bad = df[col][~flags.isin([0, 1])].iloc[0]
            raise SourceError(f"{path}: column {col!r}: expected 0/1 membership flags, got {bad!r}")
        sets[col] = list(dict.fromkeys(genes[flags == 1]))
    return sets


def read_manifest(path: Path) -> pd.DataFrame:
    """``probe, chrom, pos`` in the manifest's order (first row of a probe kept)."""
    first = _first_line(path)
    sep = "\t" if "\t" in first else ","
    cols = {"probeID", "CpG_chrm", "CpG_beg"}
    try:
        df = pd.read_csv(path, sep=sep, usecols=lambda c: c in cols, dtype={"probeID": str, "CpG_chrm": str},
                         keep_default_na=False, na_values=["NA", ""], compression=compression(path),
                         encoding="utf-8-sig")
    except (OSError, EOFError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{path}: cannot read the probe manifest ({e})") from None
    absent = sorted(cols - set(df.columns))
    if absent:
        raise SourceError(f"{path}: the probe manifest lacks column(s) {absent} (an InfiniumAnnotation manifest has "
                          "CpG_chrm, CpG_beg, CpG_end, probe_strand, probeID, …)")
    _, bad = as_numbers(df["CpG_beg"])
    if bad is not None:
        raise SourceError(f"{path}: row {bad + 2}: column 'CpG_beg': expected a position (or NA), "
                          f"got {df['CpG_beg'].iloc[bad]!r}")
    df = df[~df["probeID"].duplicated()]
    pos = pd.to_numeric(df["CpG_beg"], errors="coerce")
    return pd.DataFrame({"probe": df["probeID"].to_numpy(), "chrom": [chromosome(c) for c in df["CpG_chrm"]],
                         "pos": pos.to_numpy()})


def read_gene_types(path: Path) -> set[str]:
    """Names of the protein-coding genes of a GDC STAR counts file (``gene_type`` column)."""
    try:
        df = pd.read_csv(path, sep="\t", comment="#", dtype=str, keep_default_na=False,
                         compression=compression(path), encoding="utf-8-sig")
    except (OSError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read the gene types ({e})") from None
    absent = [c for c in ("gene_name", "gene_type") if c not in df.columns]
    if absent:
        raise SourceError(f"{path}: no column(s) {absent} (expected a GDC STAR counts file: gene_id, gene_name, "
                          "gene_type, …)")
    return set(df.loc[df["gene_type"] == "protein_coding", "gene_name"])


# -- copy number and methylation files ---------------------------------------------------------------------------

CNV_COLUMNS = ("gene_name", "chromosome", "start", "copy_number")


def read_cnv_file(path: Path) -> pd.DataFrame:
    """``gene_name, chromosome, start, copy_number`` (float, NaN where empty) in file order."""
    try:
        df = pd.read_csv(path, sep="\t", usecols=lambda c: c in CNV_COLUMNS, dtype={"gene_name": str, "chromosome": str},
                         keep_default_na=False, na_values=[""], compression=compression(path))
    except (OSError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{path}: cannot read the copy-number TSV ({e})") from None
    absent = [c for c in CNV_COLUMNS if c not in df.columns]
    if absent:
        raise SourceError(f"{path}: no column(s) {absent} (expected a GDC gene-level copy-number TSV: gene_id, "
                          "gene_name, chromosome, start, end, copy_number, …)")
    if df.empty:
        raise SourceError(f"{path}: a header but no gene rows (expected a GDC gene-level copy-number TSV)")
    blank = np.flatnonzero(df["gene_name"].isna().to_numpy())
    if blank.size:
        raise SourceError(f"{path}: row {int(blank[0]) + 2}: column 'gene_name' is empty (expected a gene name)")
    for col in ("copy_number", "start"):
        values, bad = as_numbers(df[col])
        if bad is not None:
            raise SourceError(f"{path}: row {bad + 2}: column {col!r}: expected a number, got {df[col].iloc[bad]!r}")
        df[col] = values
    cn = df["copy_number"].to_numpy(np.float64)
    neg = np.flatnonzero(cn < 0)
    if neg.size:
        raise SourceError(f"{path}: row {int(neg[0]) + 2}: negative copy_number {cn[neg[0]]:g}")
    return df[list(CNV_COLUMNS)]


def read_betas(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probe ids, betas) of a SeSAMe level-3 file: no header, ``probe<TAB>beta``, ``NA`` missing."""
    try:
        df = pd.read_csv(path, sep="\t", header=None, dtype={0: str}, keep_default_na=False, na_values=["NA", ""],
                         compression=compression(path), engine="c")
    except pd.errors.EmptyDataError:
        raise SourceError(f"{path}: the methylation file is empty (expected 'probe<TAB>beta' lines)") from None
    except (OSError, EOFError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{path}: cannot read the methylation file ({e})") from None
    if df.shape[1] != 2:
        raise SourceError(f"{path}: expected 2 tab-separated columns (probe, beta) per line, got {df.shape[1]}")
    beta = df[1]
    values, bad = as_numbers(beta)
    if bad == 0:
        raise SourceError(f"{path}: line 1 is a header ({df.iloc[0, 0]!r}, {beta.iloc[0]!r}); a SeSAMe "
                          "level-3 betas file has none (expected 'cg00000029<TAB>0.123')")
    if bad is not None:
        raise SourceError(f"{path}: line {bad + 1}: beta {beta.iloc[bad]!r} is not a number")
    beta = values
    values = beta.to_numpy(np.float64)
    out = np.flatnonzero((values < 0) | (values > 1))
    if out.size:
        raise SourceError(f"{path}: line {out[0] + 1}: beta {values[out[0]]:g} for probe {df.iloc[out[0], 0]!r} "
                          "is outside [0, 1]")
    return df[0].to_numpy(), values


def input_record(path: Path) -> dict:
    """What provenance keeps of an input file: size and mtime."""
    st = os.stat(path)
    return {"path": str(path), "bytes": st.st_size, "mtime": st.st_mtime}


__all__ = ["AUTOSOMES", "Clinical", "Slide", "chromosome", "compression", "find_slides", "input_record", "locate",
           "read_betas", "read_clinical", "read_cnv_file", "read_gene_sets", "read_gene_types", "read_manifest",
           "read_sample_sheets", "sample_code", "slide_patches", "xena_samples", "xena_values"]
