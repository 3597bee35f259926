"""Bad inputs and damaged states, one table: every bad input of prepare, inspect, pretrain,
export / import-torch and the downstream commands gets one line ``morpheus COMMAND: error: …``
naming the culprit, exit status 2, no traceback; what the user owned is left byte for byte,
and nothing that loads is left at the output paths. A damaged checkpoint met on resume is
set aside instead (``<step>.damaged``, kept), with a warning, and the run goes on from the
previous good step (exit 0).

A case that does not hold yet is marked ``pytest.mark.xfail(strict=True, reason=…)``, the reason
saying what happens instead (exit status, traceback type, message).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from morpheus_jax.cli.main import main

DIM = 8
TINY = ["data.num_patches=16", f"model.wsi_dim={DIM}", "model.hidden_size=16", "model.num_prototypes=2",
        "model.group_hidden=8", "model.encoder_heads=2", "model.decoder_heads=2", "model.encoder_mlp_dim=16",
        "model.decoder_mlp_dim=16", "model.group_buckets=1", "train.steps=4", "train.decay_steps=40",
        "train.global_batch_size=4", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
        "checkpoint.every=2", "checkpoint.keep=3", "data.eval_bag_bucket=64", "data.eval_batch_size=4", "mesh.data=1",
        "model.modalities=[rna]"]   # one modality: a third of the compile time


def tiny(ds, run_dir, *extra) -> list[str]:
    return [f"data.dir={ds}", "data.raw_dir=null", f"run_dir={run_dir}", *TINY, *extra]


@dataclasses.dataclass
class Ctx:
    raw: Path        # synthetic raw cohort (12 patients: pretrain 8, fine-tune 4; columns subtype, constant_label)
    ds: Path         # its prepared dataset
    ds2: Path        # the same cohort prepared without rna
    run: Path        # a finished 4-step run, checkpoints 2 and 4
    weights: Path    # `morpheus export` of the run (.safetensors + sidecar)
    names: dict      # ids, slide, group and feature names the cases damage ("{id0}" … in `named`)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    from morpheus_jax.apps.export import export_checkpoint
    from morpheus_jax.apps.pretrain import pretrain
    from morpheus_jax.core.config import load_config
    from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare
    from morpheus_jax.data.synth import write_synthetic_cohort

    root = tmp_path_factory.mktemp("bad_inputs")
    raw = root / "raw"
    write_synthetic_cohort(raw, n_patients=12, seed=0, feature_dim=DIM, mean_patches_per_slide=16,
                           groups_per_modality=3, progress=False)
    meta = read_meta(raw)
    meta.loc[meta["split"] == "val-pretrain", "split"] = "pretrain"   # no validation: a faster run
    meta["constant_label"] = "A"
    meta["subtype"] = "a"                                            # fine-tune patients: a, b, a, b
    meta.loc[meta.index[meta["split"] == "fine-tune"][1::2], "subtype"] = "b"
    write_meta(raw, meta)
    opts = PrepareOptions(wsi_dim=DIM, records_per_shard=4, progress=False)
    prepare(RawCohort.from_dir(raw), root / "ds", opts)
    cohort = RawCohort.from_dir(raw)
    cohort.omics.pop("rna"), cohort.mappings.pop("rna")
    prepare(cohort, root / "ds2", opts)
    pretrain(load_config(None, tiny(root / "ds", root / "run")), progress=False)
    assert step_dirs(root / "run") == [2, 4]
    export_checkpoint(root / "run", root / "w" / "model.safetensors")
    rna_ids = [line.split(",", 1)[0] for line in (raw / "omics" / "rna.csv").read_text().splitlines()]
    names = {"id0": meta["submitter_id"][0], "id3": meta["submitter_id"][3], "rna_id2": rna_ids[2],
             "slide0": Path(slides(raw)[0]).name, "group0": next(iter(json.loads((raw / "mappings" / "rna.json")
                                                                               .read_text()))),
             "feature0": mapped(raw, "rna")[0]}
    return Ctx(raw, root / "ds", root / "ds2", root / "run", root / "w" / "model.safetensors", names)


# -- small file surgery ------------------------------------------------------------------------------

def read_meta(raw: Path) -> pd.DataFrame:
    return pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)


def write_meta(raw: Path, meta: pd.DataFrame) -> None:
    meta.to_csv(raw / "metadata.csv", index=False)


def edit_meta(fn: Callable[[pd.DataFrame], pd.DataFrame | None]) -> Callable[[Path], None]:
    """``fn`` edits the metadata table in place or returns a new one."""
    def edit(raw):
        meta = read_meta(raw)
        new = fn(meta)
        write_meta(raw, meta if new is None else new)
    return edit


def set_meta(column: str, row: int, value: str) -> Callable[[Path], None]:
    def fn(meta):
        meta.loc[row, column] = value
    return edit_meta(fn)


def slides(raw: Path, row: int = 0) -> list[str]:
    return ast.literal_eval(read_meta(raw)["WSI"][row])


def slide(raw: Path, row: int = 0) -> Path:
    return raw / "features" / slides(raw, row)[0]


def write_slide(path: Path, features=None, *, group: bool = False) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        if group:
            f.create_group("features").create_dataset("x", data=np.zeros((4, DIM), np.float32))
        else:
            f.create_dataset("features", data=features)


def mapped(raw: Path, modality: str) -> list[str]:
    groups = json.loads((raw / "mappings" / f"{modality}.json").read_text())
    return [f for members in groups.values() for f in members]


def set_cell(raw: Path, modality: str, value: str, row: int = 1) -> None:
    """Put ``value`` into the first mapped column of data row ``row`` of an omics CSV."""
    path = raw / "omics" / f"{modality}.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index(mapped(raw, modality)[0])
    cells = lines[row].split(",")
    cells[col] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def edit_text(rel: str, fn: Callable[[str], str]) -> Callable[[Path], None]:
    def edit(raw):
        (raw / rel).write_text(fn((raw / rel).read_text()))
    return edit


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def scribble(path: Path, n: int = 256) -> None:
    """Random bytes written over the middle of a file (same size)."""
    data = bytearray(path.read_bytes())
    mid = max(0, len(data) // 2 - n // 2)
    noise = np.random.default_rng(0).integers(0, 256, min(n, len(data)), dtype=np.uint8).tobytes()
    data[mid: mid + len(noise)] = noise
    path.write_bytes(bytes(data))


def largest_file(folder: Path, parent: str | None = None) -> Path:
    """The largest file below ``folder`` (only those directly in a folder named ``parent``, if given)."""
    files = [p for p in folder.rglob("*") if p.is_file() and parent in (None, p.parent.name)]
    return max(files, key=lambda p: p.stat().st_size)


def step_dirs(run: Path) -> list[int]:
    ck = Path(run) / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.is_dir() else []


# -- what a case checks ----------------------------------------------------------------------------

def snapshot(path: Path) -> dict | None:
    """Relative path → sha256 of every file, plus the folders (None: absent)."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def loads(kind: str, path: Path) -> str | None:
    """Why ``path`` holds a result that loads (None: it does not)."""
    from morpheus_jax.data.records import load_manifest

    if not path.exists():
        return None
    if kind == "dataset":
        try:
            load_manifest(path)
        except Exception:  # noqa: BLE001 — any failure to load is what we want
            return None
        return f"{path}: a dataset that loads"
    if kind == "run":
        return f"{path}: checkpoints {step_dirs(path)}" if step_dirs(path) else None
    if kind == "file":
        return f"{path}: exists"
    if kind == "nothing":   # an output folder: absent or without any file
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        return f"{path}: holds {[str(p.relative_to(path)) for p in files[:3]]}" if files else None
    raise AssertionError(kind)


@dataclasses.dataclass
class Case:
    name: str
    setup: Callable[[Ctx, Path], list]   # builds the bad input under tmp_path, returns argv
    command: str                         # as in "morpheus COMMAND: error: …"
    code: int = 2
    named: tuple = ()                    # substrings of the error line ("{tmp}", "{ds}" … are filled in)
    owned: tuple = ()                    # the user's paths (relative: under tmp_path), unchanged afterwards
    outputs: tuple = ()                  # (kind, path): nothing there that loads afterwards
    fast: bool = False                   # fails within FAST_S seconds (before compiling)
    subprocess: bool = False             # run as a real process
    check: Callable | None = None        # check(ctx, tmp_path, stdout, stderr): more assertions


FAST_S = 5.0


def fill(s: str, ctx: Ctx, tmp: Path) -> str:
    return s.format(tmp=tmp, raw=ctx.raw, ds=ctx.ds, ds2=ctx.ds2, run=ctx.run, **ctx.names)


def resolve(s: str, ctx: Ctx, tmp: Path) -> Path:
    p = Path(fill(s, ctx, tmp))
    return p if p.is_absolute() else tmp / p


# -- the cases ---------------------------------------------------------------------------------------

def raw_copy(ctx: Ctx, tmp: Path) -> Path:
    shutil.copytree(ctx.raw, tmp / "raw")
    return tmp / "raw"


def prepare_argv(raw: Path, out: Path, *flags) -> list:
    return ["prepare", "--raw", raw, "--out", out, "--wsi-dim", str(DIM), *flags]


def P(name, edit, named, *flags, marks=(), **kw):
    """A prepare case: a copy of the raw cohort, ``edit(raw)`` damages it, out = tmp/out."""
    def setup(ctx, tmp):
        raw = raw_copy(ctx, tmp)
        if edit is not None:
            edit(raw)
        return prepare_argv(raw, tmp / "out", *flags)
    kw.setdefault("owned", ("raw",))
    kw.setdefault("outputs", (("dataset", "out"),))
    return pytest.param(Case(name, setup, "prepare", named=tuple(named), **kw), id=name, marks=marks)


def _ids_leading_zeros(raw):
    meta = read_meta(raw)
    ids = {sid: str(i + 1) for i, sid in enumerate(meta["submitter_id"])}
    meta["submitter_id"] = [f"{i + 1:04d}" for i in range(len(meta))]
    write_meta(raw, meta)
    for m in ("rna", "dnam", "cnv"):
        path = raw / "omics" / f"{m}.csv"
        lines = path.read_text().splitlines()
        out = [lines[0]] + [ids[line.split(",", 1)[0]] + "," + line.split(",", 1)[1] for line in lines[1:]]
        path.write_text("\n".join(out) + "\n")


def _dup_omics_column(raw):
    path = raw / "omics" / "rna.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    used = set(mapped(raw, "rna"))
    spare = next(i for i, c in enumerate(header) if i and c not in used)
    header[spare] = mapped(raw, "rna")[0]        # the same name twice (pandas would read it as NAME.1)
    path.write_text("\n".join([",".join(header), *lines[1:]]) + "\n")


def _dup_omics_row(raw):
    path = raw / "omics" / "rna.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[2]]) + "\n")


def _dup_mapping_key(raw):
    path = raw / "mappings" / "rna.json"
    groups = json.loads(path.read_text())
    (first, members), *rest = groups.items()
    items = [f"{json.dumps(first)}: {json.dumps(members)}", f"{json.dumps(first)}: {json.dumps(members[:2])}"]
    items += [f"{json.dumps(g)}: {json.dumps(v)}" for g, v in rest]
    path.write_text("{" + ", ".join(items) + "}")


def _mapping(fn):
    def edit(raw):
        path = raw / "mappings" / "rna.json"
        path.write_text(fn(json.loads(path.read_text())))
    return edit


def _feature_twice(groups):
    first = next(iter(groups))
    groups[first].append(groups[first][0])
    return json.dumps(groups)


def _feature_absent(groups):
    groups[next(iter(groups))].append("NOPE_GENE")
    return json.dumps(groups)


def _slide_outside(absolute: bool):
    def edit(raw):
        shutil.copy(slide(raw), raw / "outside.h5")
        meta = read_meta(raw)
        meta.loc[0, "WSI"] = repr([str(raw / "outside.h5") if absolute else "../outside.h5"])
        write_meta(raw, meta)
    return edit


def _wsi(value):
    return set_meta("WSI", 0, value)


def _no_slides(raw):
    meta = read_meta(raw)
    pre, ft = meta.index[meta["split"] == "pretrain"], meta.index[meta["split"] == "fine-tune"]
    drop = list(pre[2:]) + list(ft[2:])          # 8 of 12 (67 %): all but two patients of each split
    meta.loc[drop, "WSI"] = "[]"
    write_meta(raw, meta)


def _late_nan(raw):
    meta = read_meta(raw)
    last = int(meta.index[meta["split"] == "fine-tune"][-1])
    x = np.ones((20, DIM), np.float32)
    x[3, 1] = np.nan
    write_slide(slide(raw, last), x)


def _late_nan_check(ctx, tmp, out, err):
    root = tmp / "out"
    if not root.exists():
        return
    left = [str(p) for p in root.rglob("*") if ".tmp" in p.name]
    assert not left, f"temporary files left: {left}"
    for sub in ("records", "patches"):
        d = root / sub
        assert not d.is_dir() or any(d.iterdir()), f"empty {d} left"


def _zero_patch_slide(raw):
    write_slide(slide(raw), np.zeros((0, DIM), np.float32))


PREPARE = [
    P("metadata_empty_file", edit_text("metadata.csv", lambda t: ""), ["metadata.csv"]),
    P("metadata_header_only", edit_text("metadata.csv", lambda t: t.splitlines()[0] + "\n"), ["metadata.csv"]),
    P("metadata_without_wsi_column", edit_meta(lambda m: m.drop(columns="WSI")), ["metadata.csv", "'WSI'"],
      subprocess=True),
    P("metadata_ids_trailing_space", edit_meta(lambda m: m.assign(submitter_id=m["submitter_id"] + " ")),
      ["metadata.csv", "'{id0} '", "'{id0}'"]),
    P("ids_leading_zeros_in_metadata_only", _ids_leading_zeros, ["metadata.csv", "'0001'", "'1'"]),
    P("metadata_duplicate_submitter_id", edit_meta(lambda m: pd.concat([m, m.iloc[[3]]])),
      ["metadata.csv", "submitter_id", "{id3}"]),
    P("slide_listed_twice_for_one_patient", lambda raw: _wsi(repr(slides(raw) * 2))(raw),
      ["metadata.csv", "'WSI'", "{slide0}"]),
    P("slide_listed_for_two_patients", lambda raw: set_meta("WSI", 1, read_meta(raw)["WSI"][0])(raw),
      ["metadata.csv", "'WSI'", "{slide0}"]),
    P("omics_duplicate_column_name", _dup_omics_column, ["rna.csv", "'{feature0}'"]),
    P("omics_duplicate_submitter_id", _dup_omics_row, ["rna.csv", "{rna_id2}"]),
    P("mapping_duplicate_key", _dup_mapping_key, ["rna.json", "{group0}"]),
    P("mapping_feature_twice_in_a_group", _mapping(_feature_twice), ["rna.json", "{group0}"]),
    P("mapping_is_a_list", _mapping(lambda g: json.dumps(list(g.values()))), ["rna.json"]),
    P("mapping_is_empty_object", _mapping(lambda g: "{}"), ["rna.json"]),
    P("mapping_feature_absent_from_csv", _mapping(_feature_absent), ["rna.csv", "NOPE_GENE"]),
    P("omics_non_numeric_value", lambda raw: set_cell(raw, "rna", "abc"), ["rna.csv", "'{feature0}'", "'abc'"]),
    P("omics_inf_value", lambda raw: set_cell(raw, "rna", "inf"), ["rna.csv", "'{feature0}'", "infinite"]),
    P("dnam_beta_above_one", lambda raw: set_cell(raw, "dnam", "1.5"), ["dnam.csv", "1.5"]),
    P("cnv_negative", lambda raw: set_cell(raw, "cnv", "-1"), ["cnv.csv", "-1"]),
    P("omics_header_only", edit_text("omics/dnam.csv", lambda t: t.splitlines()[0] + "\n"), ["dnam.csv"]),
    P("omics_empty_file", edit_text("omics/cnv.csv", lambda t: ""), ["cnv.csv"]),
    P("slide_path_leaves_features_folder", _slide_outside(False), ["'WSI'", "../outside.h5"]),
    P("slide_path_absolute", _slide_outside(True), ["'WSI'", "outside.h5"]),
    P("slide_missing", _wsi("['TCGA-SYND/nope.h5']"), ["nope.h5"]),
    P("slide_truncated", lambda raw: truncate(slide(raw)), ["{slide0}"]),
    P("slide_features_is_a_group", lambda raw: write_slide(slide(raw), group=True),
      ["{slide0}", "features"]),
    P("slide_with_zero_patches", _zero_patch_slide, ["{slide0}"]),
    P("slide_wrong_feature_dim", lambda raw: write_slide(slide(raw), np.ones((20, DIM + 4), np.float32)),
      ["{slide0}", "12"]),
    P("slide_with_nan", lambda raw: write_slide(slide(raw), np.full((20, DIM), np.nan, np.float32)),
      ["{slide0}", "NaN"]),
    P("wsi_cell_unparsable", _wsi("[not a list"), ["metadata.csv", "'WSI'"]),
    P("split_unknown_value", set_meta("split", 0, "training"),
      ["metadata.csv", "'split'", "training"]),
    P("records_per_shard_zero", None, ["--records-per-shard"], "--records-per-shard", "0"),
    P("records_per_shard_negative", None, ["--records-per-shard"], "--records-per-shard", "-3"),
    P("chunk_rows_zero", None, ["--chunk-rows"], "--chunk-rows", "0"),
    P("workers_zero", None, ["--workers"], "--workers", "0"),
    P("wsi_dim_zero", None, ["--wsi-dim"], "--wsi-dim", "0"),
    P("patch_dtype_int8", None, ["--patch-dtype", "int8"], "--patch-dtype", "int8"),
    P("most_patients_without_slides", _no_slides, ["metadata.csv", "8", "no slide"]),
    P("shard_write_fails_late", _late_nan, ["NaN"], "--records-per-shard", "2", check=_late_nan_check),
]


def _out_is_file(ctx, tmp):
    (tmp / "out").write_text("my notes\n")
    return prepare_argv(raw_copy(ctx, tmp), tmp / "out")


def _out_is_raw(ctx, tmp):
    return prepare_argv(raw_copy(ctx, tmp), tmp / "raw")


def _out_in_features(ctx, tmp):
    return prepare_argv(raw_copy(ctx, tmp), tmp / "raw" / "features" / "ds")


def _out_user_folder(ctx, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine\n")
    return prepare_argv(raw_copy(ctx, tmp), tmp / "out")


def _existing_dataset(overwrite: bool):
    def setup(ctx, tmp):
        raw = raw_copy(ctx, tmp)
        shutil.copytree(ctx.ds, tmp / "ds")
        if overwrite:   # and the new inputs are bad
            set_meta("split", 0, "training")(raw)
            return prepare_argv(raw, tmp / "ds", "--overwrite")
        return prepare_argv(raw, tmp / "ds")
    return setup


def _old_dataset_loads(ctx, tmp, out, err):
    from morpheus_jax.data.records import load_manifest, verify_dataset

    assert verify_dataset(tmp / "ds", load_manifest(tmp / "ds")) == []


def _raw_absent(ctx, tmp):
    return prepare_argv(tmp / "no_raw", tmp / "out")


def _explicit_flags(omics: str):
    def setup(ctx, tmp):
        raw = raw_copy(ctx, tmp)
        return ["prepare", "--metadata", raw / "metadata.csv", "--features-dir", raw / "features",
                "--omics", omics.format(raw=raw), f"dnam={raw}/omics/dnam.csv", f"cnv={raw}/omics/cnv.csv",
                "--mapping", *[f"{m}={raw}/mappings/{m}.json" for m in ("rna", "dnam", "cnv")],
                "--out", tmp / "out", "--wsi-dim", str(DIM)]
    return setup


def C(name, setup, command, named, marks=(), **kw):
    return pytest.param(Case(name, setup, command, named=tuple(named), **kw), id=name, marks=marks)


PREPARE += [
    C("out_is_a_file", _out_is_file, "prepare", ["--out"], owned=("raw", "out")),
    C("out_is_the_raw_folder", _out_is_raw, "prepare", ["--out"], owned=("raw",)),
    C("out_inside_features_folder", _out_in_features, "prepare", ["--out"], owned=("raw",),
      outputs=(("dataset", "raw/features/ds"),)),
    C("out_holds_user_files", _out_user_folder, "prepare", ["--out", "notes.txt"], owned=("raw", "out")),
    C("existing_dataset_without_overwrite", _existing_dataset(False), "prepare", ["--overwrite"],
      owned=("raw", "ds"), check=_old_dataset_loads),
    C("overwrite_with_bad_inputs", _existing_dataset(True), "prepare", ["metadata.csv", "training"],
      owned=("raw", "ds"), outputs=(("dataset", ".ds.preparing"),), check=_old_dataset_loads),
    C("raw_folder_absent", _raw_absent, "prepare", ["metadata.csv"], outputs=(("dataset", "out"),)),
    C("omics_flag_without_equals", _explicit_flags("rna"), "prepare", ["--omics"], owned=("raw",),
      outputs=(("dataset", "out"),)),
    C("omics_flag_absent_csv", _explicit_flags("rna={raw}/omics/absent.csv"), "prepare", ["absent.csv"],
      owned=("raw",), outputs=(("dataset", "out"),)),
    C("omics_flag_unknown_modality", _explicit_flags("protein={raw}/omics/rna.csv"), "prepare", ["protein"],
      owned=("raw",), outputs=(("dataset", "out"),)),
]


# -- inspect -----------------------------------------------------------------------------------------

def I(name, damage, named, marks=(), **kw):
    def setup(ctx, tmp):
        shutil.copytree(ctx.ds, tmp / "ds")
        damage(tmp / "ds")
        return ["inspect", tmp / "ds"]
    kw.setdefault("owned", ("ds",))
    return C(name, setup, "inspect", named, marks=marks, **kw)


def _manifest_field(ds):
    m = json.loads((ds / "manifest.json").read_text())
    m["counts"]["pretrain"] = "eight"
    (ds / "manifest.json").write_text(json.dumps(m))


def _first_shard(ds, kind="records"):
    return ds / json.loads((ds / "manifest.json").read_text())["shards"][0][kind]["path"]


INSPECT = [
    C("inspect_absent_folder", lambda ctx, tmp: ["inspect", tmp / "absent"], "inspect", ["{tmp}/absent"]),
    I("inspect_manifest_not_json", lambda ds: (ds / "manifest.json").write_text("{not json"), ["manifest.json"],
      subprocess=True),
    I("inspect_manifest_field_damaged", _manifest_field, ["manifest.json", "counts.pretrain"]),
    I("inspect_shard_missing", lambda ds: _first_shard(ds).unlink(), ["pretrain-00000.array_record"]),
    I("inspect_shard_truncated", lambda ds: truncate(_first_shard(ds)), ["pretrain-00000.array_record"]),
]


# -- pretrain: all fail before compiling ---------------------------------------------------------------

def T(name, extra, named, *, ds="{ds}", copy_ds=None, marks=(), **kw):
    """A pretrain case on the shared dataset (or a damaged copy), run_dir = tmp/run."""
    def setup(ctx, tmp):
        data = fill(ds, ctx, tmp)
        if copy_ds is not None:
            shutil.copytree(ctx.ds, tmp / "ds")
            copy_ds(tmp / "ds")
            data = tmp / "ds"
        return ["pretrain", "--no-progress", *tiny(data, tmp / "run"), *[fill(e, ctx, tmp) for e in extra]]
    kw.setdefault("owned", ("ds",) if copy_ds is not None else (ds,))
    kw.setdefault("outputs", (("run", "run"),))
    return C(name, setup, "pretrain", named, fast=True, marks=marks, **kw)


def _bad_yaml(ctx, tmp):
    (tmp / "bad.yaml").write_text("train: {steps: [1,\n")
    return ["pretrain", "--no-progress", "--config", tmp / "bad.yaml", *tiny(ctx.ds, tmp / "run")]


def _intermixed(ctx, tmp):
    over = [o for o in tiny(ctx.ds, tmp / "run") if not o.startswith("data.dir=")]
    return ["pretrain", *over, "--no-progress", f"data.dir={tmp / 'ABSENT'}"]


def _no_unrecognized(ctx, tmp, out, err):
    assert "unrecognized" not in err, err


def _run_dir_is_file(ctx, tmp):
    (tmp / "run").write_text("my notes\n")
    return ["pretrain", "--no-progress", *tiny(ctx.ds, tmp / "run")]


PRETRAIN = [
    T("dataset_absent", [], ["{tmp}/absent"], ds="{tmp}/absent", owned=()),
    T("dataset_is_a_raw_cohort", [], ["{raw}"], ds="{raw}"),
    T("wsi_dim_differs_from_dataset", ["model.wsi_dim=16"], ["model.wsi_dim"]),
    T("num_patches_zero", ["data.num_patches=0"], ["data.num_patches"]),
    T("learning_rate_negative", ["train.learning_rate=-1e-3"], ["train.learning_rate"]),
    T("checkpoint_every_negative", ["checkpoint.every=-1"], ["checkpoint.every"]),
    T("checkpoint_keep_zero", ["checkpoint.keep=0"], ["checkpoint.keep"]),
    T("mesh_larger_than_devices", ["mesh.data=64"], ["mesh.data=64"]),
    T("batch_not_divisible_by_mesh", ["mesh.data=4", "train.global_batch_size=6"], ["train.global_batch_size"]),
    T("unknown_config_key", ["model.hidden=16"], ["model.hidden"], subprocess=True),
    T("override_without_equals", ["train.steps"], ["train.steps"]),
    T("override_wrong_type", ["train.steps=abc"], ["train.steps", "abc"]),
    C("config_yaml_malformed", _bad_yaml, "pretrain", ["bad.yaml"], fast=True, owned=("{ds}", "bad.yaml"),
      outputs=(("run", "run"),)),
    T("dataset_shard_truncated", [], ["pretrain-00000.array_record"],
      copy_ds=lambda ds: truncate(_first_shard(ds))),
    T("dataset_records_folder_missing", [], ["records"], copy_ds=lambda ds: shutil.rmtree(ds / "records")),
    T("dataset_lacks_a_modality", [], ["'rna'", "model.modalities"], ds="{ds2}"),
    C("flags_and_overrides_intermixed", _intermixed, "pretrain", ["ABSENT"], fast=True, owned=("{ds}",),
      outputs=(("run", "run"),), check=_no_unrecognized),
    C("run_dir_is_a_file", _run_dir_is_file, "pretrain", ["run_dir"], fast=True, owned=("{ds}", "run")),
]


# -- resume: a damaged latest checkpoint is set aside -------------------------------------------------

def R(name, damage, marks=()):
    """Resume a copy of the run after ``damage(checkpoints/4)``: step 4 set aside, resumed from 2."""
    def setup(ctx, tmp):
        shutil.copytree(ctx.run, tmp / "run")
        damage(tmp / "run" / "checkpoints" / "4")
        return ["pretrain", "--no-progress", *tiny(ctx.ds, tmp / "run", "train.steps=6")]

    def check(ctx, tmp, out, err):
        from morpheus_jax.core.log import read_jsonl

        ck = tmp / "run" / "checkpoints"
        assert (ck / "4.damaged").is_dir(), sorted(p.name for p in ck.iterdir())
        assert f"resumed from {ck / '2'} at step 2" in out, out
        assert step_dirs(tmp / "run") == [2, 4, 6], step_dirs(tmp / "run")
        steps = [r["step"] for r in read_jsonl(tmp / "run" / "metrics.jsonl") if "loss" in r]
        assert steps == list(range(1, 7)), steps
        assert any(str(ck / "4") in line and "warning" in line.lower() for line in err.splitlines()), \
            f"no warning naming {ck / '4'} on stderr"
    return C(name, setup, "pretrain", [], code=0, owned=("{ds}",), check=check, marks=marks)


def _resume_incompatible(ctx, tmp):
    shutil.copytree(ctx.run, tmp / "run")
    return ["pretrain", "--no-progress", *tiny(ctx.ds, tmp / "run", "train.steps=6", "model.hidden_size=32")]


RESUME = [
    # The largest state file is array data (d/) or Orbax metadata (_sharding, _METADATA): both kinds.
    R("resume_array_data_random_bytes", lambda step: scribble(largest_file(step / "state", "d"))),
    R("resume_state_metadata_random_bytes", lambda step: scribble(largest_file(step / "state", "state"))),
    R("resume_spec_metadata_truncated", lambda step: truncate(step / "spec" / "metadata")),
    R("resume_data_iterator_state_damaged",
      lambda step: (step / "data" / "process_0-of-1.json").write_text("{\"next_index\": ")),
    C("resume_incompatible_model", _resume_incompatible, "pretrain", ["model.hidden_size"],
      owned=("{ds}", "run")),
]


# -- export / import-torch ----------------------------------------------------------------------------

def _export_damaged(parent):
    def setup(ctx, tmp):
        shutil.copytree(ctx.run, tmp / "run")
        scribble(largest_file(tmp / "run" / "checkpoints" / "4" / "state", parent))
        return ["export", "--checkpoint", tmp / "run", "--out", tmp / "out.safetensors"]
    return setup


def _export_out_exists(ctx, tmp):
    (tmp / "out.safetensors").write_text("my weights\n")
    return ["export", "--checkpoint", ctx.run, "--out", tmp / "out.safetensors"]


def _weights(damage):
    def setup(ctx, tmp):
        w = tmp / "w.safetensors"
        shutil.copy(ctx.weights, w)
        shutil.copy(str(ctx.weights) + ".json", str(w) + ".json")
        damage(w)
        return ["import-torch", w, "--out", tmp / "ck"]
    return setup


def _drop_tensor(path):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(path))
    del sd["norm.weight"]
    save_file(sd, str(path))


def _import_out_taken(ctx, tmp):
    (tmp / "ck").mkdir()
    (tmp / "ck" / "notes.txt").write_text("mine\n")
    return ["import-torch", ctx.weights, "--out", tmp / "ck"]


def _import_mapping_flag(ctx, tmp):
    return ["import-torch", ctx.weights, "--mapping", "rna", "--out", tmp / "ck"]


EXPORT = [
    C("export_checkpoint_absent", lambda ctx, tmp: ["export", "--checkpoint", tmp / "nope", "--out",
                                                    tmp / "out.safetensors"],
      "export", ["{tmp}/nope"], outputs=(("file", "out.safetensors"),)),
    C("export_array_data_random_bytes", _export_damaged("d"), "export", ["{tmp}/run/checkpoints/4"], owned=("run",),
      outputs=(("file", "out.safetensors"),)),
    C("export_state_metadata_random_bytes", _export_damaged("state"), "export", ["{tmp}/run/checkpoints/4"],
      owned=("run",), outputs=(("file", "out.safetensors"),)),
    C("export_out_exists", _export_out_exists, "export", ["out.safetensors", "--overwrite"],
      owned=("{run}", "out.safetensors")),
    C("export_out_bad_suffix", lambda ctx, tmp: ["export", "--checkpoint", ctx.run, "--out", tmp / "out.txt"],
      "export", [".txt"], owned=("{run}",), outputs=(("file", "out.txt"),)),
    C("export_modalities_without_encoder_only",
      lambda ctx, tmp: ["export", "--checkpoint", ctx.run, "--modalities", "rna", "--out", tmp / "o.safetensors"],
      "export", ["--modalities", "--encoder-only"], owned=("{run}",), outputs=(("file", "o.safetensors"),)),
    C("import_truncated_file", _weights(truncate), "import-torch", ["w.safetensors"],
      owned=("w.safetensors",), outputs=(("nothing", "ck"),)),
    C("import_not_a_safetensors_file", _weights(lambda w: w.write_text("hello, not weights\n")), "import-torch",
      ["w.safetensors"], owned=("w.safetensors",), outputs=(("nothing", "ck"),)),
    C("import_file_missing_a_tensor", _weights(_drop_tensor), "import-torch", ["norm.weight"],
      owned=("w.safetensors",), outputs=(("nothing", "ck"),)),
    C("import_out_not_empty", _import_out_taken, "import-torch", ["{tmp}/ck", "--overwrite"], owned=("ck",)),
    C("import_mapping_without_equals", _import_mapping_flag, "import-torch", ["--mapping"],
      outputs=(("nothing", "ck"),)),
]


# -- downstream --------------------------------------------------------------------------------------

# (command, valid flags for the 4 fine-tune patients: 2 events; subtype a a b b): a case changes one thing.
EMBED, GEN, REC = ("embed", []), ("generate", []), ("evaluate reconstruction", [])
SURV = ("finetune survival", ["--folds", "2", "--epochs", "1", "--batch-size", "4"])
CLS = ("finetune classify", ["--full", "--folds", "2", "--epochs", "1", "--batch-size", "4"])
FEW_SHOT = ("finetune classify", ["--epochs", "1", "--batch-size", "4"])


def D(name, cmd, extra, named, out="out", *, dataset="{ds}", checkpoint="{run}", marks=(), **kw):
    """A downstream command on the shared run and dataset, --out tmp/OUT."""
    command, flags = cmd

    def setup(ctx, tmp):
        return [*command.split(), "--checkpoint", fill(checkpoint, ctx, tmp), "--dataset", fill(dataset, ctx, tmp),
                *flags, *[fill(e, ctx, tmp) for e in extra], "--out", tmp / out]
    kw.setdefault("owned", tuple(p for p in (dataset, checkpoint) if p in ("{ds}", "{run}")))
    kw.setdefault("outputs", (("nothing", out),))
    return C(name, setup, command, named, marks=marks, **kw)


def _junk_checkpoint(ctx, tmp):
    (tmp / "junk").mkdir()
    (tmp / "junk" / "notes.txt").write_text("mine\n")
    return ["embed", "--checkpoint", tmp / "junk", "--dataset", ctx.ds, "--out", tmp / "e.npz"]


def _damaged_dataset(ctx, tmp):
    shutil.copytree(ctx.ds, tmp / "ds")
    (tmp / "ds" / "manifest.json").write_text("{not json")
    return ["finetune", "classify", "--checkpoint", ctx.run, "--dataset", tmp / "ds", *CLS[1], "--task", "subtype",
            "--out", tmp / "out"]


DOWNSTREAM = [
    C("embed_checkpoint_is_a_user_folder", _junk_checkpoint, "embed", ["{tmp}/junk"], owned=("junk", "{ds}"),
      outputs=(("file", "e.npz"),)),
    D("embed_dataset_absent", EMBED, [], ["{tmp}/absent"], "e.npz", dataset="{tmp}/absent"),
    D("embed_out_bad_suffix", EMBED, [], [".csv"], "e.csv"),
    D("embed_unknown_modality", EMBED, ["--modalities", "wsi,protein"], ["--modalities", "protein"], "e.npz"),
    D("embed_batch_size_zero", EMBED, ["--batch-size", "0"], ["--batch-size"], "e.npz"),
    D("embed_unknown_split", EMBED, ["--split", "test"], ["split", "'test'"], "e.npz"),
    D("embed_dataset_lacks_modality", EMBED, ["--modalities", "wsi,rna"], ["{ds2}", "rna"], "e.npz",
      dataset="{ds2}"),
    D("generate_target_is_an_input", GEN, ["--target", "rna", "--from", "wsi,rna"], ["--target", "rna"],
      "g.csv"),
    D("generate_unknown_target", GEN, ["--target", "protein"], ["--target", "protein"], "g.csv"),
    D("reconstruction_unknown_target", REC, ["--target", "protein"], ["--target", "protein"]),
    D("reconstruction_group_column_one_class", REC, ["--target", "rna", "--group-column", "constant_label"],
      ["--group-column", "constant_label"]),
    D("reconstruction_group_column_absent", REC, ["--target", "rna", "--group-column", "NOPE"], ["NOPE"]),
    D("survival_time_column_absent", SURV, ["--time-column", "NOPE"], ["NOPE"]),
    D("survival_censorship_not_binary", SURV, ["--censorship-column", "survival_months"], ["survival_months"]),
    D("survival_folds_one", SURV, ["--folds", "1"], ["--folds"]),
    D("survival_folds_more_than_patients", SURV, ["--folds", "50"], ["folds", "50"]),
    D("survival_epochs_zero", SURV, ["--epochs", "0"], ["--epochs"]),
    D("survival_checkpoint_absent", SURV, [], ["{tmp}/nope"], checkpoint="{tmp}/nope"),
    D("classify_task_column_absent", CLS, ["--task", "NOPE"], ["NOPE"]),
    D("classify_task_with_one_class", CLS, ["--task", "constant_label"], ["constant_label"]),
    D("classify_more_shots_than_patients", FEW_SHOT, ["--task", "subtype", "--k", "5"], ["subtype", "5"]),
    D("classify_linear_probe_and_no_pretrain", CLS, ["--task", "subtype", "--linear-probe", "--no-pretrain"],
      ["--linear-probe", "--no-pretrain"]),
    D("classify_full_folds_more_than_patients", CLS, ["--task", "subtype", "--folds", "50"], ["folds", "50"]),
    D("classify_dropout_one", CLS, ["--task", "subtype", "--dropout", "1"], ["--dropout"]),
    D("classify_lr_negative", CLS, ["--task", "subtype", "--lr=-1e-4"], ["--lr"]),
    C("classify_dataset_damaged", _damaged_dataset, "finetune classify", ["{tmp}/ds/manifest.json"],
      owned=("ds", "{run}"), outputs=(("nothing", "out"),)),
]

CASES = PREPARE + INSPECT + PRETRAIN + RESUME + EXPORT + DOWNSTREAM


def test_the_table_is_large_and_names_are_unique():
    names = [p.values[0].name for p in CASES]
    assert len(names) >= 70 and len(set(names)) == len(names)


def error_lines(err: str) -> list[str]:
    """The non-empty lines of stderr, progress-bar frames (tqdm: ``…| 3/12 [00:01<…]``) left out."""
    segments = [seg for line in err.split("\n") for seg in line.split("\r")]
    return [seg for seg in segments if seg.strip() and not PROGRESS.search(seg)]


PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")


# -- the runner --------------------------------------------------------------------------------------

def run_command(argv: list[str], capsys, in_subprocess: bool) -> tuple[int, str, str]:
    if in_subprocess:
        p = subprocess.run([sys.executable, "-m", "morpheus_jax.cli", *argv], capture_output=True, text=True,
                           timeout=300, env={**os.environ}, check=False)
        return p.returncode, p.stdout, p.stderr
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:   # argparse
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:    # noqa: BLE001 — a traceback is a failure of the case, reported as such
        out, err = capsys.readouterr()
        pytest.fail(f"{type(e).__name__} escaped main: {str(e)[:300]}\nstderr: {err[-1000:]}", pytrace=False)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Case, ctx: Ctx, tmp_path: Path, capsys):
    argv = [str(a) for a in case.setup(ctx, tmp_path)]
    owned = {p: snapshot(resolve(p, ctx, tmp_path)) for p in case.owned}
    outputs = [(kind, resolve(p, ctx, tmp_path)) for kind, p in case.outputs]
    before = {path: step_dirs(path) for kind, path in outputs if kind == "run"}
    t0 = time.perf_counter()
    code, out, err = run_command(argv, capsys, case.subprocess)
    seconds = time.perf_counter() - t0

    assert "Traceback" not in err + out, err[-3000:]
    assert code == case.code, f"exit {code}, expected {case.code}\nstderr: {err[-2000:]}\nstdout: {out[-1500:]}"
    if case.code == 2:
        lines = error_lines(err)
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err[-2000:]}"
        prefix = f"morpheus {case.command}: error: "
        assert lines[0].startswith(prefix), lines[0]
        for name in case.named:
            assert fill(name, ctx, tmp_path) in lines[0], f"{fill(name, ctx, tmp_path)!r} not named in: {lines[0]}"
        if os.environ.get("MORPHEUS_BAD_INPUT_TABLE"):     # the closing note's table: case → message
            with open(os.environ["MORPHEUS_BAD_INPUT_TABLE"], "a") as f:
                f.write(json.dumps({"case": case.name, "message": lines[0].replace(str(tmp_path), "…")}) + "\n")
    for p, snap in owned.items():
        assert snapshot(resolve(p, ctx, tmp_path)) == snap, f"{p}: the user's files were changed"
    for kind, path in outputs:
        if kind == "run" and before.get(path):
            assert step_dirs(path) == before[path], f"{path}: new checkpoints {step_dirs(path)}"
        elif case.code:
            assert loads(kind, path) is None, loads(kind, path)
    if case.check is not None:
        case.check(ctx, tmp_path, out, err)
    if case.fast and not case.subprocess:
        assert seconds < FAST_S, f"took {seconds:.1f} s (expected to fail before compiling)"
