"""Reading and validating the raw TCGA-layout inputs (reference §1).

Every problem raises `PrepareError` with one line naming the file and the field. Omics CSVs
are streamed in row chunks into a float32 table on disk (`OmicsTable`), so memory does not
grow with the cohort; slides are read one at a time.

Transforms (recorded in the manifest): canonical feature order per modality (groups in
mapping order, features in group order, first appearance kept); then the modality's
`ModalitySpec` (`core.modality`): the paper's ``rna`` missing → 0 (the per-gene centre),
``dnam`` betas in [0, 1], missing → 0, ``cnv`` copy numbers ≥ 0, missing → 2, then
``log10(cn / 2 + 1)``; any other modality by its spec (default: as given, missing → 0).
"""

from __future__ import annotations

import ast
import bz2
import csv
import dataclasses
import gzip
import importlib.util
import io
import json
import lzma
import os
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES

from morpheus_jax.core.errors import ConfigError, PrepareError
from morpheus_jax.core.modality import BUILTIN, ModalitySpec, check_name, ordered
from morpheus_jax.core.names import SPLITS
RESERVED = {"submitter_id", "project_id", "split", "WSI"}
# Rows parsed at a time: bounded in cells so wide CSVs (DNAm, ~10^5 columns) stay small.
CSV_CHUNK_CELLS = 1 << 18



@dataclasses.dataclass
class RawCohort:
    metadata: Path
    features_dir: Path
    omics: dict[str, Path]
    mappings: dict[str, Path]

    @classmethod
    def from_dir(cls, raw: str | os.PathLike) -> "RawCohort":
        """The synth layout: metadata.csv, features/, omics/<m>.csv, mappings/<m>.json."""
        raw = Path(raw)
        if not (raw / "metadata.csv").exists():
            raise PrepareError(f"{raw / 'metadata.csv'}: missing (expected the raw layout: metadata.csv, "
                               "features/, omics/<m>.csv, mappings/<m>.json)")
        found = sorted(p.name[:-len(".csv")] for p in (raw / "omics").glob("*.csv")) if (raw / "omics").is_dir() else []
        # Every omics/<name>.csv with a mappings/<name>.json; the paper's three must have theirs.
        names = [m for m in ordered(found) if m in BUILTIN or (raw / "mappings" / f"{m}.json").exists()]
        for m in names:
            try:
                check_name(m, str(raw / "omics" / f"{m}.csv"))
            except ConfigError as e:
                raise PrepareError(str(e)) from None
        omics = {m: raw / "omics" / f"{m}.csv" for m in names}
        mappings = {m: raw / "mappings" / f"{m}.json" for m in omics}
        return cls(raw / "metadata.csv", raw / "features", omics, mappings)


# A compressed file cut short or damaged (a download that stopped): gzip, bz2 and xz raise these.
DAMAGED = (EOFError, zlib.error, lzma.LZMAError)

_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


def compression(path: Path, error: type[Exception] = PrepareError) -> str | None:
    """pandas' ``compression`` of a file, by its first bytes (portals ship ``.gz`` files, with
    or without the suffix); a kind pandas cannot read here is one line naming the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    kind = next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)
    if kind == "zstd" and importlib.util.find_spec("zstandard") is None:
        raise error(f"{path}: zstd-compressed, and reading it needs the zstandard package "
                    "(pip install zstandard), as pandas does; or give it uncompressed, gzip, bz2 or xz")
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                members = [i.filename for i in z.infolist() if not i.is_dir()]
        except (OSError, zipfile.BadZipFile) as e:
            raise error(f"{path}: a damaged zip archive ({e})") from None
        if len(members) != 1:
            raise error(f"{path}: a zip archive of {len(members)} files; expected exactly one CSV in it")
    return kind


def _open_zstd(path: Path, mode: str, **kw):
    import zstandard

    return zstandard.open(path, mode, **kw)


class _ZipText(io.TextIOWrapper):
    """The text of a one-file zip archive; closing it closes the archive too."""

    def __init__(self, path: Path, mode: str = "rt", **kw):     # mode: text, as open_text asks
        self._archive = zipfile.ZipFile(path)
        super().__init__(self._archive.open(next(i for i in self._archive.infolist() if not i.is_dir())), **kw)

    def close(self):
        try:
            super().close()
        finally:
            self._archive.close()


def open_text(path: Path, error: type[Exception] = PrepareError):
    """A text handle on a plain, gzip, bz2, xz, zstd (with the zstandard package) or one-file
    zip file (a BOM dropped, newlines as written)."""
    kind = compression(path, error)
    opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open, "zstd": _open_zstd, "zip": _ZipText,
              None: open}[kind]
    return opener(path, "rt", encoding="utf-8-sig", newline="")


def header_cells(path: Path, error: type[Exception] = PrepareError) -> list[str]:
    """The first row's cells of a CSV (compressed or not), each name checked unique: pandas
    renames a repeated column ``x`` to ``x.1``, and which of the two is meant is ambiguous."""
    try:
        with open_text(path, error) as f:
            names = next(csv.reader(f), [])
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise error(f"{path}: cannot read the header ({e})") from None
    seen = set()
    for name in names:
        if name in seen and name != "":
            raise error(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
    return names


def canonical_features(groups: dict[str, list[str]]) -> list[str]:
    """Groups in order, features in group order, first appearance kept."""
    seen: dict[str, None] = {}
    for members in groups.values():
        for f in members:
            seen.setdefault(f, None)
    return list(seen)


def _unique_keys(path: Path):
    """A JSON object hook that refuses a key written twice (json keeps the last silently)."""
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise PrepareError(f"{path}: duplicate key {k!r} in the mapping JSON")
            seen.add(k)
        return dict(pairs)
    return hook


def read_mapping(path: Path) -> dict[str, list[str]]:
    try:
        with open(path) as f:
            groups = json.load(f, object_pairs_hook=_unique_keys(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: cannot read mapping JSON ({e})") from None
    if not isinstance(groups, dict) or not groups:
        raise PrepareError(f"{path}: expected a non-empty JSON object {{group: [feature names]}}")
    for g, members in groups.items():
        if not isinstance(members, list) or not members or not all(isinstance(f, str) for f in members):
            raise PrepareError(f"{path}: group {g!r}: expected a non-empty list of feature names")
        if len(set(members)) != len(members):
            raise PrepareError(f"{path}: group {g!r} lists a feature twice")
    return groups


def read_metadata(path: Path) -> pd.DataFrame:
    """The metadata table with ``WSI`` parsed into lists of slide paths."""
    try:
        header_cells(path)
        meta = pd.read_csv(path, dtype={"submitter_id": str, "project_id": str, "split": str, "WSI": str},
                           keep_default_na=False, na_values=[""], compression=compression(path), encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise PrepareError(f"{path}: the metadata CSV is empty (expected a header with submitter_id, split, WSI "
                           "and one row per patient)") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, *DAMAGED) as e:
        raise PrepareError(f"{path}: cannot read metadata CSV ({e})") from None
    for col in ("submitter_id", "split", "WSI"):
        if col not in meta.columns:
            raise PrepareError(f"{path}: missing column {col!r} (has {list(meta.columns)[:10]})")
    if meta.empty:
        raise PrepareError(f"{path}: the metadata CSV has a header but no patients (one row per patient expected)")
    if meta["submitter_id"].isna().any():
        raise PrepareError(f"{path}: column 'submitter_id' is empty in row {int(meta['submitter_id'].isna().idxmax()) + 2}")
    dup = meta["submitter_id"][meta["submitter_id"].duplicated()]
    if len(dup):
        raise PrepareError(f"{path}: duplicate submitter_id {dup.iloc[0]!r} in column 'submitter_id'")
    bad = sorted(set(meta["split"].dropna()) - set(SPLITS))
    if bad:
        raise PrepareError(f"{path}: column 'split' has unknown values {bad[:5]} (expected {list(SPLITS)})")
    if "project_id" not in meta.columns:
        meta["project_id"] = "unknown"
    slides = []
    for i, raw in enumerate(meta["WSI"]):
        if pd.isna(raw) or str(raw).strip() == "":
            slides.append([])
            continue
        try:
            value = ast.literal_eval(str(raw))
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise PrepareError(f"{path}: row {i + 2} column 'WSI': expected a list of slide files like "
                               f"['a.h5'], got {str(raw)[:60]!r}")
        slides.append(list(value))
    _check_slide_names(path, meta["submitter_id"].tolist(), slides)
    meta["WSI"] = slides
    return meta


def _check_slide_names(path: Path, ids: list[str], slides: list[list[str]]) -> None:
    """Slide paths stay inside the features folder (relative, no ``..`` out of it: checked on
    the text, so a features folder of symlinks is fine) and each slide belongs to one patient once."""
    owner: dict[str, str] = {}
    for sid, names in zip(ids, slides):
        for name in names:
            norm = os.path.normpath(name)
            if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
                raise PrepareError(f"{path}: patient {sid!r} column 'WSI': slide path {name!r} leaves the features "
                                   "folder (paths are relative to --features-dir)")
            if norm in owner:
                who = "twice for patient" if owner[norm] == sid else f"for patients {owner[norm]!r} and"
                raise PrepareError(f"{path}: column 'WSI': slide {name!r} is listed {who} {sid!r}")
            owner[norm] = sid


@dataclasses.dataclass
class OmicsTable:
    """One modality's mapping features for every patient of its CSV: float32 rows on disk
    (transforms applied), looked up by submitter_id."""

    path: Path
    features: list[str]
    rows: dict[str, int]
    missing_filled: int

    def reader(self) -> "RowReader":
        return RowReader(self.path, len(self.features))


class RowReader:
    """Reads single float32 rows of an `OmicsTable` file with pread (no mapping: memory use
    stays flat however many rows are read)."""

    def __init__(self, path: str | Path, width: int):
        self.width = width
        self.fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, row: int) -> np.ndarray:
        size = 4 * self.width
        return np.frombuffer(os.pread(self.fd, size, row * size), np.float32)

    def close(self) -> None:
        os.close(self.fd)


def as_numbers(column: pd.Series) -> tuple[pd.Series, int | None]:
    """A column as numbers (missing cells stay NaN) and the position of its first cell that is
    not a number (None when every cell is one)."""
    if pd.api.types.is_numeric_dtype(column):
        return column, None
    values = pd.to_numeric(column, errors="coerce")
    bad = np.flatnonzero((values.isna() & column.notna()).to_numpy())
    return values, int(bad[0]) if bad.size else None


def _check_chunk(path: Path, spec: ModalitySpec, df: pd.DataFrame, features: list[str]) -> np.ndarray:
    for col in df.columns:
        values, bad = as_numbers(df[col])
        if bad is not None:
            raise PrepareError(f"{path}: column {col!r}: non-numeric value {df[col].iloc[bad]!r} "
                               f"for submitter_id {df.index[bad]!r}")
        df[col] = values
    values = df.to_numpy(np.float64)
    if np.isinf(values).any():
        r, c = np.argwhere(np.isinf(values))[0]
        raise PrepareError(f"{path}: column {features[c]!r}: infinite value for submitter_id {df.index[r]!r}")
    outside = ~np.isnan(values) & ~spec.admits(values)
    if outside.any():
        r, c = np.argwhere(outside)[0]
        raise PrepareError(f"{path}: column {features[c]!r}: {spec.problem(values[r, c])} "
                           f"for submitter_id {df.index[r]!r}")
    return values


def stream_omics(path: Path, spec: ModalitySpec, groups: dict[str, list[str]], out: Path) -> OmicsTable:
    """Validate one omics CSV chunk by chunk and write its mapping features (``spec``'s fill and
    transform, canonical order) to ``out`` as float32 rows."""
    features = canonical_features(groups)
    try:
        header = pd.read_csv(path, nrows=1, index_col=0, compression=compression(path), encoding="utf-8-sig")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, UnicodeDecodeError, *DAMAGED) as e:
        raise PrepareError(f"{path}: cannot read omics CSV ({e})") from None
    if header.empty:
        raise PrepareError(f"{path}: the omics CSV has a header but no rows (one row per submitter_id expected)")
    header_cells(path)
    absent = [f for f in features if f not in header.columns]
    if absent:
        raise PrepareError(f"{path}: {len(absent)} mapping features absent from the CSV columns, e.g. {absent[:5]}")
    positions = [0] + [header.columns.get_loc(f) + 1 for f in features]
    rows: dict[str, int] = {}
    missing = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(out, "wb") as sink:
            rows_per_chunk = max(8, CSV_CHUNK_CELLS // max(len(header.columns), 1))
            # Ids are strings as written ("0001" stays "0001", "NA" is an id); values keep
            # pandas' missing-value tokens.
            for df in pd.read_csv(path, index_col=0, usecols=positions, chunksize=rows_per_chunk, dtype={0: str},
                                  compression=compression(path), encoding="utf-8-sig",
                                  keep_default_na=False, na_values={f: _NA_TOKENS for f in header.columns}):
                df = df[features]
                values = _check_chunk(path, spec, df, features)
                for sid in df.index:
                    if not str(sid).strip():
                        raise PrepareError(f"{path}: row {len(rows) + 2}: the submitter_id cell is empty")
                    if sid in rows:
                        raise PrepareError(f"{path}: duplicate submitter_id {sid!r} in the index column")
                    rows[sid] = len(rows)
                nan = np.isnan(values)
                missing += int(nan.sum())
                values = spec.apply(values)
                sink.write(np.ascontiguousarray(values, np.float32).tobytes())
    except pd.errors.ParserError as e:
        raise PrepareError(f"{path}: malformed CSV ({e})") from None
    except (*DAMAGED, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: the file ends early or is damaged ({type(e).__name__}: {e}); "
                           "download it again") from None
    return OmicsTable(out, features, rows, missing)


_NA_TOKENS = sorted(STR_NA_VALUES)


def slide_shape(path: Path) -> tuple[int, int]:
    """(N, D) of a slide's ``features`` without reading it."""
    if not path.exists():
        raise PrepareError(f"{path}: slide HDF5 file listed in metadata column 'WSI' does not exist")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise PrepareError(f"{path}: no dataset 'features' (has {list(f.keys())[:5]})")
            data = f["features"]
            if not isinstance(data, h5py.Dataset) or not np.issubdtype(data.dtype, np.number):
                what = "a group" if isinstance(data, h5py.Group) else f"of dtype {data.dtype}"
                raise PrepareError(f"{path}: 'features' is {what}, expected a numeric dataset [1, N, D] or [N, D]")
            shape = data.shape
    except OSError as e:
        raise PrepareError(f"{path}: unreadable HDF5 ({e})") from None
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise PrepareError(f"{path}: dataset 'features' has shape {shape}, expected [1, N, D] or [N, D]")
    if shape[0] == 0:
        raise PrepareError(f"{path}: dataset 'features' has no patches (shape {shape}); remove the slide from "
                           "column 'WSI'")
    return int(shape[0]), int(shape[1])


def read_slide(path: Path, dim: int) -> np.ndarray:
    """A slide's patch features ``[N, dim]``, checked finite."""
    try:
        with h5py.File(path, "r") as f:
            x = f["features"][()]
    except (OSError, KeyError) as e:
        raise PrepareError(f"{path}: dataset 'features' unreadable or truncated ({e})") from None
    if x.ndim == 3:
        x = x[0]
    if x.ndim != 2 or x.shape[1] != dim:
        raise PrepareError(f"{path}: dataset 'features' has feature dim {x.shape[-1]}, expected {dim}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.argwhere(~finite)[0][0])
        raise PrepareError(f"{path}: dataset 'features' has NaN/Inf values (first at patch {bad})")
    return x
