"""`morpheus tcga build` on bad inputs, one table: each case damages a copy of one input of a
clean synthetic download (or one flag) and expects one line ``morpheus tcga build: error: …``
naming the file (or flag) and what was expected, exit status 2, nothing at OUT (absent after a
failed first build; an earlier build or the user's files there untouched) and no hidden
temporary folder beside it. The download itself is never changed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest
from conftest import TINY_DIM

from morpheus_jax.cli.main import main


@dataclasses.dataclass
class Download:
    args: list[str]        # build_args of the clean download
    root: Path
    built: Path            # a good build of it
    prov: dict             # its provenance.json
    truth: dict
    snapshot: dict


def snapshot(root: Path) -> dict:
    """Relative path → sha256 of every file below ``root`` (links not followed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if not p.is_symlink()
            else os.readlink(p) for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def dl(tmp_path_factory) -> Download:
    from morpheus_jax.data.tcga.synth import write_public_download

    root = tmp_path_factory.mktemp("tcga_bad") / "download"
    info = write_public_download(root, n_patients=40, seed=3, feature_dim=TINY_DIM, mean_patches_per_slide=20,
                                 progress=False)
    built = root.parent / "built"
    assert build(built, info["build_args"]) == 0
    return Download(info["build_args"], root, built, json.loads((built / "provenance.json").read_text()),
                    info["truth"], snapshot(root))


def build(out: Path, args: list[str], *extra: str) -> int:
    return main(["tcga", "build", str(out), *map(str, args), "--no-progress", *map(str, extra)])


# -- argument and file surgery ----------------------------------------------------------------------------------

def values(args: list[str], flag: str) -> list[str]:
    """The values of ``flag`` (up to the next flag)."""
    if flag not in args:
        return []
    i = args.index(flag) + 1
    return args[i:next((k for k in range(i, len(args)) if args[k].startswith("--")), len(args))]


def with_flag(args: list[str], flag: str, *new: str) -> list[str]:
    """``args`` with ``flag``'s values replaced by ``new`` (no ``new``: the flag removed)."""
    if flag not in args:
        return [*args, flag, *new] if new else list(args)
    i = args.index(flag)
    return [*args[:i], *([flag, *new] if new else []), *args[i + 1 + len(values(args, flag)):]]


def read_text(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode()


def edit_lines(fn: Callable[[list[list[str]]], object], sep: str = "\t") -> Callable[[Path], None]:
    """``fn`` edits the file's cells (a list of rows) in place; written back as plain text."""
    def edit(path: Path) -> None:
        rows = [line.split(sep) for line in read_text(path).splitlines()]
        fn(rows)
        path.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    return edit


def drop_column(name: str, skip: int = 0):
    """Without column ``name`` of the header on line ``skip`` + 1."""
    def fn(rows):
        j = rows[skip].index(name)
        for r in rows[skip:]:
            del r[j]
    return edit_lines(fn)


def rename_column(old: str, new: str):
    return edit_lines(lambda rows: rows[0].__setitem__(rows[0].index(old), new))


def set_cell(row: int, column: str | int, value: str):
    return edit_lines(lambda rows: rows[row].__setitem__(column if isinstance(column, int) else
                                                         rows[0].index(column), value))


def keep_lines(n: int):
    return lambda path: path.write_text("".join(read_text(path).splitlines(keepends=True)[:n]))


def copy_file(d: Download, tmp: Path, flag: str, edit, index: int = 0) -> tuple[list[str], Path]:
    """Copy the ``index``-th file of ``flag`` into tmp, ``edit`` it, point the flag at it."""
    vals = values(d.args, flag)
    path = tmp / "in" / Path(vals[index]).name
    path.parent.mkdir(exist_ok=True)
    shutil.copy(vals[index], path)
    edit(path)
    vals[index] = str(path)
    return with_flag(d.args, flag, *vals), path


def copy_in_folder(d: Download, tmp: Path, flag: str, file: Path, edit) -> tuple[list[str], Path]:
    """A folder of links to ``flag``'s folder where ``file`` (under it) is a damaged copy."""
    src, dst = Path(values(d.args, flag)[0]), tmp / flag.strip("-")
    shutil.copytree(src, dst, copy_function=os.symlink)
    path = dst / Path(file).relative_to(src)
    path.unlink()
    shutil.copy(file, path)
    edit(path)
    return with_flag(d.args, flag, str(dst)), path


def chosen(d: Download, modality: str) -> Path:
    """A file the good build read (of the first cohort patient with one)."""
    return Path(next(p[modality]["file"] for p in d.prov["patients"].values() if "file" in p[modality]))


def which(flag: str, test: Callable[[str], bool]) -> Callable[[Download], int]:
    """The index of the first file of ``flag`` that passes ``test``."""
    return lambda d: next(i for i, p in enumerate(values(d.args, flag)) if test(p))


plain_rna, gz_rna = which("--rna", lambda p: not p.endswith(".gz")), which("--rna", lambda p: p.endswith(".gz"))


def sheet(modality: str) -> Callable[[Download], int]:
    return which("--sample-sheet", lambda p: f".{modality}." in p)


# -- the cases ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    name: str
    setup: Callable[[Download, Path], tuple[list[str], object]]   # → (build args, the path named, or None)
    expect: tuple = ()                                             # keywords of the line
    check: Callable | None = None                                  # check(d, tmp) instead of "OUT absent"
    out: Callable | None = None                                    # out(d, tmp): OUT if not tmp/out


def F(name, flag, edit, *expect, index=0):
    """Damage a copy of the ``index``-th file of ``flag`` (index: a number or a function of the download)."""
    setup = lambda d, tmp: copy_file(d, tmp, flag, edit, index(d) if callable(index) else index)  # noqa: E731
    return pytest.param(Case(name, setup, expect), id=name)


def G(name, flag, edit, *expect, extra=()):
    """Damage a file the good build read from the folder of ``flag`` (--cnv, --dnam, --features)."""
    def setup(d, tmp):
        file = chosen(d, flag[2:]) if flag != "--features" else next(Path(values(d.args, flag)[0]).rglob("*.h5"))
        args, path = copy_in_folder(d, tmp, flag, file, edit)
        return [*args, *extra], path
    return pytest.param(Case(name, setup, expect), id=name)


def A(name, fn, *expect, check=None, out=None):
    """A case on the flags: ``fn(d, tmp) → (args, the path named or None)``."""
    return pytest.param(Case(name, fn, expect, check, out), id=name)


def _absent_file_row(rows):
    rows.append(["00000000-0000-4000-8000-000000000000", "TCGA-SYNA.absent.gene_level_copy_number.v36.tsv",
                 *rows[1][2:]])


def _two_matrices(d, tmp):
    """The patient listed in two matrices gets another value in a copy of one of them."""
    twice = d.truth["rna_two_matrices"]
    i, sample = next((i, s) for i, p in enumerate(values(d.args, "--rna"))
                     for s in read_text(Path(p)).splitlines()[0].split("\t") if s[:12] in twice)
    return copy_file(d, tmp, "--rna", set_cell(1, sample, "9.5"), i)


def _no_features_dataset(path: Path) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=[[0, 0]])


def _file(name: str, text: str | None, flag: str, value: str = "{}", keep: bool = False):
    """``flag value``, ``{}`` = tmp/name, written with ``text`` unless None; the line names it
    (a --mapping rna replaces --gene-sets unless ``keep``: then the line names the flags only)."""
    def fn(d, tmp):
        if text is not None:
            (tmp / name).write_text(text)
        args = with_flag(d.args, "--gene-sets") if value.startswith("rna=") and not keep else d.args
        return with_flag(args, flag, value.format(tmp / name)), None if keep else tmp / name
    return fn


def _flags(*extra):
    return lambda d, tmp: ([*d.args, *extra], None)


def _mine(rel: str):
    """OUT holds the user's file ``rel`` ("." : OUT is that file); the line names it; it is kept."""
    def setup(d, tmp):
        (tmp / "out" / rel).parent.mkdir(exist_ok=True)
        (tmp / "out" / rel).write_text("mine\n")
        return d.args, (tmp / "out" / rel).resolve()

    def check(d, tmp):
        assert (tmp / "out" / rel).read_text() == "mine\n" and len(list(tmp.glob("out/**/*"))) == (rel != ".")
    return setup, check


def _rebuild(d, tmp):
    shutil.copytree(d.built, tmp / "out", symlinks=True)
    return copy_in_folder(d, tmp, "--dnam", chosen(d, "dnam"), set_cell(3, 1, "1.5"))


def _first_build_kept(d, tmp):
    assert (tmp / "out" / "metadata.csv").read_bytes() == (d.built / "metadata.csv").read_bytes()
    assert snapshot(tmp / "out") == snapshot(d.built)


def _empty_features(d, tmp):
    (tmp / "feat").mkdir()
    return with_flag(d.args, "--features", str(tmp / "feat")), tmp / "feat"


def _download_kept(d, tmp):
    assert snapshot(d.root) == d.snapshot
    assert not [p.name for p in d.root.parent.iterdir() if p.name.startswith(".")]


CASES = [
    F("sheet_row_file_absent", "--sample-sheet", edit_lines(_absent_file_row), "row 51", "not under",
      index=sheet("cnv")),
    F("sheet_without_sample_id", "--sample-sheet", drop_column("Sample ID"), "'Sample ID'", index=sheet("cnv")),
    F("sheet_without_sample_type", "--sample-sheet", drop_column("Sample Type"), "'Sample Type'",
      "'Tumor Descriptor'", index=sheet("cnv")),
    F("sheet_without_tumor_descriptor", "--sample-sheet", drop_column("Tumor Descriptor"), "'Sample Type'",
      "'Tumor Descriptor'", index=sheet("dnam")),
    F("sheet_case_id_blank", "--sample-sheet", set_cell(2, "Case ID", ""), "row 3", "'Case ID'", "empty"),
    F("sheet_empty_file", "--sample-sheet", lambda p: p.write_text(""), "empty"),
    F("sheet_header_only", "--sample-sheet", keep_lines(1), "no rows", index=sheet("cnv")),
    A("sheets_list_no_copy_number_file", lambda d, tmp: (with_flag(d.args, "--sample-sheet", values(
        d.args, "--sample-sheet")[sheet("dnam")(d)]), None), "gdc_sample_sheet.dnam.tsv", "copy-number"),
    G("dnam_file_with_header", "--dnam", lambda p: p.write_text("probe\tbeta\n" + p.read_text()), "header"),
    G("dnam_beta_non_numeric", "--dnam", set_cell(4, 1, "abc"), "line 5", "'abc'", "not a number"),
    G("dnam_beta_above_one", "--dnam", set_cell(4, 1, "1.5"), "line 5", "[0, 1]"),
    G("dnam_beta_above_one_in_a_worker", "--dnam", set_cell(4, 1, "1.5"), "line 5", "[0, 1]",
      extra=("--workers", "2")),
    G("dnam_three_columns", "--dnam", edit_lines(lambda rows: [r.append("x") for r in rows]), "2 tab-separated"),
    G("cnv_without_copy_number", "--cnv", rename_column("copy_number", "cn"), "['copy_number']"),
    G("cnv_negative_copy_number", "--cnv", set_cell(3, "copy_number", "-1"), "row 4", "negative"),
    G("cnv_non_numeric_copy_number", "--cnv", set_cell(3, "copy_number", "two"), "row 4", "'two'"),
    G("cnv_header_only", "--cnv", keep_lines(1), "no gene rows"),
    G("cnv_gene_name_blank", "--cnv", set_cell(3, "gene_name", ""), "row 4", "'gene_name'"),
    G("slide_not_hdf5", "--features", lambda p: p.write_bytes(os.urandom(4096)), "HDF5"),
    G("slide_without_features_dataset", "--features", _no_features_dataset, "'features'"),
    F("rna_sample_twice_in_header", "--rna", edit_lines(lambda rows: rows[0].__setitem__(2, rows[0][1])),
      "twice", index=plain_rna),
    A("rna_patient_in_two_matrices_other_values", _two_matrices, "other values"),
    F("rna_gzip_truncated", "--rna", lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]), "Xena",
      index=gz_rna),
    F("rna_non_numeric_value", "--rna", set_cell(3, 2, "high"), "'high'", "non-numeric", index=plain_rna),
    F("rna_header_only", "--rna", keep_lines(1), "no gene rows", index=plain_rna),
    F("clinical_without_id_column", "--clinical", rename_column("cases.submitter_id", "patient"),
      "patient id column", "submitter_id"),
    F("clinical_id_blank", "--clinical", set_cell(3, "cases.submitter_id", ""), "row 4", "empty"),
    F("clinical_header_only", "--clinical", keep_lines(1), "no rows"),
    F("clinical_column_split", "--clinical", rename_column("oncotree_code", "split"), "'split'", "reserves"),
    F("clinical_column_wsi", "--clinical", rename_column("oncotree_code", "WSI"), "'WSI'", "reserves"),
    F("clinical_single_patient_project", "--clinical", set_cell(1, "project.project_id", "TCGA-LONE"),
      "'TCGA-LONE'", "at least 2"),
    F("clinical_ids_match_no_slide", "--clinical",
      edit_lines(lambda rows: [r.__setitem__(1, r[1].lower()) for r in rows[1:]]), "slide", "TCGA-XX-XXXX"),
    F("gene_set_without_gene_in_data", "--gene-sets",
      lambda p: p.write_text(p.read_text() + "EMPTY_SET\thttp://x\tNOPE1\tNOPE2\n"), "'EMPTY_SET'", "no gene"),
    F("probe_manifest_without_cpg_beg", "--probe-manifest", drop_column("CpG_beg"), "'CpG_beg'"),
    F("probe_manifest_cpg_beg_not_a_number", "--probe-manifest", set_cell(3, "CpG_beg", "abc"), "row 4",
      "'CpG_beg'", "'abc'"),
    F("gene_types_without_gene_type", "--gene-types", drop_column("gene_type", skip=1), "'gene_type'"),
    A("mapping_invalid_json", _file("m.json", "{not json", "--mapping", "dnam={}"), "JSON"),
    A("mapping_not_an_object", _file("m.json", "[1, 2]", "--mapping", "cnv={}"), "JSON object"),
    A("mapping_dnam_features_all_absent", _file("m.json", '{"g": ["cgNOPE1"]}', "--mapping", "dnam={}"),
      "'g'", "no feature"),
    A("mapping_cnv_features_all_absent", _file("m.json", '{"g": ["NOPE"]}', "--mapping", "cnv={}"),
      "'g'", "no feature"),
    A("mapping_rna_features_all_absent", _file("rna.json", '{"g": ["NOPE1"]}', "--mapping", "rna={}"),
      "'g'", "no feature"),
    A("mapping_file_absent", _file("nope.json", None, "--mapping", "cnv={}"), "no such file"),
    A("mapping_unknown_modality", _flags("--mapping", "protein=p.json"), "protein", "rna, cnv or dnam"),
    A("mapping_without_equals", _flags("--mapping", "cnv"), "--mapping", "MODALITY=PATH"),
    A("gene_sets_and_mapping_rna", _file("rna.json", '{"g": ["GENE0001"]}', "--mapping", "rna={}", keep=True),
      "--gene-sets", "--mapping rna"),
    A("neither_gene_sets_nor_mapping_rna", lambda d, tmp: (with_flag(d.args, "--gene-sets"), None),
      "--gene-sets", "--mapping rna"),
    A("features_folder_absent", _file("nope", None, "--features"), "--features", "folder"),
    A("features_folder_without_slides", _empty_features, "slide"),
    A("rna_file_absent", _file("nope.gz", None, "--rna"), "no such file"),
    A("fine_tune_fraction_above_one", _flags("--fine-tune-fraction", "1.5"), "--fine-tune-fraction", "[0, 1)"),
    A("val_fraction_one", _flags("--val-fraction", "1"), "--val-fraction", "[0, 1)"),
    A("cnv_features_zero", _flags("--cnv-features", "0"), "--cnv-features", "positive"),
    A("workers_zero", _flags("--workers", "0"), "--workers", "positive"),
    A("seed_negative", _flags("--seed", "-1"), "--seed", "2**32"),
    A("out_holds_foreign_files", _mine("notes.txt")[0], "did not write", check=_mine("notes.txt")[1]),
    A("out_is_a_file", _mine(".")[0], "not a folder", check=_mine(".")[1]),
    A("out_is_the_download_folder", lambda d, tmp: (d.args, d.root), "did not write", check=_download_kept,
      out=lambda d, tmp: d.root),
    A("rebuild_fails_first_build_kept", _rebuild, "[0, 1]", check=_first_build_kept),
]


def test_the_table_names_are_unique():
    names = [p.values[0].name for p in CASES]
    assert len(set(names)) == len(names) >= 50


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Case, dl: Download, tmp_path: Path, capsys):
    args, culprit = case.setup(dl, tmp_path)
    out = case.out(dl, tmp_path) if case.out else tmp_path / "out"
    capsys.readouterr()
    try:
        code = build(out, args)
    except SystemExit as e:   # argparse
        code = e.code
    except Exception as e:    # noqa: BLE001 — a traceback is the failure the case reports
        pytest.fail(f"{type(e).__name__} escaped main: {str(e)[:400]}", pytrace=False)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\n{err[-2000:]}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err[-2000:]}"
    line = lines[0]
    assert line.startswith("morpheus tcga build: error: "), line
    for word in [str(culprit)] * (culprit is not None) + list(case.expect):
        assert word in line, f"{word!r} not in: {line}"
    if os.environ.get("MORPHEUS_BAD_INPUT_TABLE"):     # the closing note's table: case → message
        with open(os.environ["MORPHEUS_BAD_INPUT_TABLE"], "a") as f:
            f.write(json.dumps({"case": case.name, "message": line.replace(str(tmp_path), "…")}) + "\n")
    if case.check is None:
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    else:
        case.check(dl, tmp_path)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert not left, f"temporary folders left beside OUT: {left}"


def test_the_download_is_untouched(dl: Download):
    assert snapshot(dl.root) == dl.snapshot
