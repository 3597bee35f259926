"""Faults of the environment (issue 23, first part): a torn tail in an append-only file of a
run, inputs as other tools write them (compressed, BOM, CRLF), and the bad-input cases still
open (a blank omics id, a metadata column twice)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil

import numpy as np

import pytest
from conftest import TINY_DIM, TINY_OVERRIDES, synth_dataset, tiny_run_config

from morpheus_jax.apps.pretrain import pretrain
from morpheus_jax.cli.main import main
from morpheus_jax.core.log import read_jsonl
from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    synth_dataset(root, patients=40, seed=5, dim=TINY_DIM, patches_per_slide=20)
    return root / "raw"


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("morpheus prepare: error:"), err
    return err[0]


def test_a_torn_metrics_line_is_dropped_and_the_run_resumes(tiny_dataset, tmp_path, capsys):
    common = ["train.decay_steps=8", "checkpoint.every=4"]
    pretrain(tiny_run_config(tiny_dataset, tmp_path, *common, "train.steps=4"), progress=False)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:       # a kill while appending: half a row, no newline
        f.write('{"step": 5, "loss": 1.2')
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "not a complete JSON row" in capsys.readouterr().err
    pretrain(tiny_run_config(tiny_dataset, tmp_path, *common, "train.steps=8"), progress=False)
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, 9))


def _compress(path, kind):
    data = path.read_bytes()
    opener = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[kind]
    out = path.with_name(path.name + "." + kind)
    out.write_bytes(opener(data))
    return out


def test_compressed_bom_and_crlf_inputs_prepare_the_same_dataset(raw, tmp_path):
    plain = prepare(RawCohort.from_dir(raw), tmp_path / "plain", PrepareOptions(wsi_dim=TINY_DIM, progress=False))
    work = tmp_path / "raw"
    shutil.copytree(raw, work, symlinks=True)
    meta = work / "metadata.csv"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes().replace(b"\n", b"\r\n"))     # Excel's CSV
    omics = {m: work / "omics" / f"{m}.csv" for m in ("rna", "dnam", "cnv")}
    omics = {"rna": _compress(omics["rna"], "gz"), "dnam": _compress(omics["dnam"], "bz2"),
             "cnv": _compress(omics["cnv"], "xz")}
    cohort = RawCohort(meta, work / "features", omics, {m: work / "mappings" / f"{m}.json" for m in omics})
    other = prepare(cohort, tmp_path / "other", PrepareOptions(wsi_dim=TINY_DIM, progress=False))
    assert other.counts == plain.counts
    for m in omics:
        assert other.modalities[m].features == plain.modalities[m].features
    a = json.loads((tmp_path / "plain" / "manifest.json").read_text())["shards"]
    b = json.loads((tmp_path / "other" / "manifest.json").read_text())["shards"]
    assert [s["records"]["sha256"] for s in a] == [s["records"]["sha256"] for s in b]


def test_a_blank_omics_id_and_a_repeated_metadata_column_are_one_line_errors(raw, tmp_path, capsys):
    work = tmp_path / "raw"
    shutil.copytree(raw, work, symlinks=True)
    rna = work / "omics" / "rna.csv"
    lines = rna.read_text().splitlines()
    lines[3] = "," + lines[3].split(",", 1)[1]
    rna.write_text("\n".join(lines) + "\n")
    assert main(["prepare", "--raw", str(work), "--out", str(tmp_path / "ds"), "--wsi-dim", str(TINY_DIM),
                 "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "rna.csv" in line and "row 4" in line and "submitter_id" in line
    shutil.copy(raw / "omics" / "rna.csv", rna)
    meta = work / "metadata.csv"
    header, rest = meta.read_text().split("\n", 1)
    meta.write_text(header + ",IDH\n" + "\n".join(r + ",1" if r else r for r in rest.split("\n")))
    assert main(["prepare", "--raw", str(work), "--out", str(tmp_path / "ds"), "--wsi-dim", str(TINY_DIM),
                 "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "metadata.csv" in line and "'IDH' appears twice" in line
    assert not (tmp_path / "ds" / "manifest.json").exists()




def test_one_writer_per_run_folder(tiny_dataset, tmp_path, capsys):
    """A second pretrain on a folder in use refuses in one line naming the holder; a lock
    left by a process that died is taken over with a warning."""
    import os
    import subprocess
    import sys

    from morpheus_jax.core.runlock import RunLock

    holder = RunLock(tmp_path).acquire()
    args = ["pretrain", "--no-progress", f"data.dir={tiny_dataset}", "data.raw_dir=null", f"run_dir={tmp_path}",
            f"model.wsi_dim={TINY_DIM}", "train.steps=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by pid {os.getpid()} on host" in err[0] and "one run folder, one writer" in err[0]
    assert not (tmp_path / "metrics.jsonl").exists()
    holder.release()
    # A holder killed without releasing: the OS dropped its lock; its record is taken over.
    code = (f"import os; from morpheus_jax.core.runlock import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
            "os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    lock = RunLock(tmp_path).acquire()
    assert "no longer running" in capsys.readouterr().err
    lock.release()


def test_a_rerun_on_another_dataset_names_both_and_how_to_continue(tiny_dataset, raw, tmp_path, capsys):
    other = tmp_path / "other"
    prepare(RawCohort.from_dir(raw), other, PrepareOptions(wsi_dim=TINY_DIM, progress=False))
    run = tmp_path / "run"
    common = ["train.decay_steps=8", "checkpoint.every=2"]
    pretrain(tiny_run_config(tiny_dataset, run, *common, "train.steps=2"), progress=False)
    args = ["pretrain", "--no-progress", f"data.dir={other}", "data.raw_dir=null", f"run_dir={run}"]
    assert main([*args, *TINY_OVERRIDES, *common, "train.steps=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tiny_dataset) in err[0] and str(other) in err[0]
    assert "new run_dir" in err[0] and "data.continue_on_new_data=true" in err[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped with the reason elsewhere)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_prepare_onto_a_full_disk_is_one_line_and_writes_no_manifest(raw, small_disk, capsys):
    import h5py

    feats = raw / "features"
    big = small_disk.parent / "raw"
    shutil.copytree(raw, big, symlinks=True)
    for f in sorted((big / "features").rglob("*.h5"))[:20]:     # ~10 MB of patches: more than the disk holds
        with h5py.File(f, "r+") as h:
            x = h["features"][()]
            del h["features"]
            h.create_dataset("features", data=np.repeat(x, 200, axis=-2))
    assert main(["prepare", "--raw", str(big), "--out", str(small_disk / "ds"), "--wsi-dim", str(TINY_DIM),
                 "--no-progress", "--patch-dtype", "float32"]) == 2
    line = _one_line(capsys)
    assert "no space left" in line and str(small_disk) in line
    assert not (small_disk / "ds" / "manifest.json").exists() and feats.exists()


def test_a_damaged_array_header_is_one_line_before_training(tiny_dataset, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    header = next((ds / "patches").glob("pretrain-*.zarr")) / "zarr.json"
    header.write_text(header.read_text()[:40])
    assert main(["pretrain", "--no-progress", f"data.dir={ds}", "data.raw_dir=null", f"run_dir={tmp_path / 'run'}",
                 *TINY_OVERRIDES]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(header) in err[0] and "damaged array header" in err[0]
