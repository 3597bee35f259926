"""Faults of the environment (issue 23, first part): a torn tail in an append-only file of a
run, inputs as other tools write them (compressed, BOM, CRLF), and the bad-input cases still
open (a blank omics id, a metadata column twice)."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
import shutil
import zipfile

import numpy as np

import pytest
from conftest import TINY_DIM, TINY_OVERRIDES, synth_dataset, tiny_overrides, tiny_run_config

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


def _tensorboard_losses(folder) -> list[tuple[int, float]]:
    """The training losses TensorBoard's own reader shows for a run, in its order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("loss")]


def _same_losses(shown: list[tuple[int, float]], rows: list[dict]) -> None:
    assert [step for step, _ in shown] == [r["step"] for r in rows]
    assert [value for _, value in shown] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_torn_tails_in_metrics_and_tensorboard_are_dropped_and_the_run_resumes(tiny_dataset, tmp_path, capsys):
    common = ["train.decay_steps=8", "checkpoint.every=4"]
    pretrain(tiny_run_config(tiny_dataset, tmp_path, *common, "train.steps=6"), progress=False)
    (tmp_path / "checkpoints" / "6").rename(tmp_path / "gone")   # as if killed after step 6, before its save
    metrics, events = tmp_path / "metrics.jsonl", next((tmp_path / "tensorboard").glob("*tfevents*"))
    with open(metrics, "a") as f:       # a kill while appending: half a row, no newline
        f.write('{"step": 7, "loss": 1.2')
    with open(events, "ab") as f:       # and half a TensorBoard record
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x12\x34")
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, 7)) and "not a complete JSON row" in capsys.readouterr().err
    first = _tensorboard_losses(tmp_path / "tensorboard")
    _same_losses(first, rows)
    # Resumed from the step-4 checkpoint: steps 5-6 are trained again; metrics.jsonl and
    # TensorBoard (its purge marker hides the first session's steps 5-6) show each step once,
    # with the new values; the torn record is skipped.
    pretrain(tiny_run_config(tiny_dataset, tmp_path, *common, "train.steps=8"), progress=False)
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, 9))
    _same_losses(_tensorboard_losses(tmp_path / "tensorboard"), rows)
    assert len(list((tmp_path / "tensorboard").glob("*tfevents*"))) == 2


def _compress(path, kind):
    data = path.read_bytes()
    out = path.with_name(path.name + "." + kind)
    if kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(path.name, data)
        return out
    import zstandard

    opener = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
              "zst": zstandard.ZstdCompressor().compress}[kind]
    out.write_bytes(opener(data))
    return out


@pytest.mark.parametrize("kinds", [("gz", "bz2", "xz", None), ("zst", "zip", "gz", "zip")])
def test_compressed_bom_and_crlf_inputs_prepare_the_same_dataset(raw, tmp_path, kinds):
    plain = prepare(RawCohort.from_dir(raw), tmp_path / "plain", PrepareOptions(wsi_dim=TINY_DIM, progress=False))
    work = tmp_path / "raw"
    shutil.copytree(raw, work, symlinks=True)
    meta = work / "metadata.csv"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes().replace(b"\n", b"\r\n"))     # Excel's CSV
    if kinds[3]:
        meta = _compress(meta, kinds[3])
    omics = {m: _compress(work / "omics" / f"{m}.csv", kind) for m, kind in zip(("rna", "dnam", "cnv"), kinds)}
    cohort = RawCohort(meta, work / "features", omics, {m: work / "mappings" / f"{m}.json" for m in omics})
    other = prepare(cohort, tmp_path / "other", PrepareOptions(wsi_dim=TINY_DIM, progress=False))
    assert other.counts == plain.counts
    for m in omics:
        assert other.modalities[m].features == plain.modalities[m].features
    a = json.loads((tmp_path / "plain" / "manifest.json").read_text())["shards"]
    b = json.loads((tmp_path / "other" / "manifest.json").read_text())["shards"]
    assert [s["records"]["sha256"] for s in a] == [s["records"]["sha256"] for s in b]


def test_compressed_inputs_pandas_cannot_read_are_one_line(raw, tmp_path, capsys, monkeypatch):
    work = tmp_path / "raw"
    shutil.copytree(raw, work, symlinks=True)
    rna = work / "omics" / "rna.csv"
    args = ["prepare", "--raw", str(work), "--out", str(tmp_path / "ds"), "--wsi-dim", str(TINY_DIM), "--no-progress"]
    with zipfile.ZipFile(work / "two.zip", "w") as z:
        z.writestr("a.csv", "x\n")
        z.writestr("b.csv", "y\n")
    shutil.move(work / "two.zip", rna)
    assert main(args) == 2
    assert f"{rna}: a zip archive of 2 files; expected exactly one CSV" in _one_line(capsys)
    zst = _compress(raw / "omics" / "rna.csv", "zst")
    shutil.move(zst, rna)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "zstandard" else real(name, *a))
    assert main(args) == 2
    line = _one_line(capsys)
    assert f"{rna}: zstd-compressed" in line and "pip install zstandard" in line
    assert not (tmp_path / "ds").exists()


def test_float64_slides_prepare_the_same_patches(raw, tmp_path):
    """Patch encoders' HDF5 files hold float32 most often; float64 (numpy's default) too."""
    import h5py

    plain = prepare(RawCohort.from_dir(raw), tmp_path / "plain", PrepareOptions(wsi_dim=TINY_DIM, progress=False))
    work = tmp_path / "raw"
    shutil.copytree(raw, work)
    slides = sorted((work / "features").rglob("*.h5"))
    for f in slides[::2]:
        with h5py.File(f, "r+") as h:
            x = h["features"][()]
            del h["features"]
            h.create_dataset("features", data=x.astype(np.float64))
            assert h["features"].dtype == np.float64
    other = prepare(RawCohort.from_dir(work), tmp_path / "other", PrepareOptions(wsi_dim=TINY_DIM, progress=False))
    assert other.counts == plain.counts and other.patches.total == plain.patches.total
    a = json.loads((tmp_path / "plain" / "manifest.json").read_text())["shards"]
    b = json.loads((tmp_path / "other" / "manifest.json").read_text())["shards"]
    assert [s["patches"]["sha256"] for s in a] == [s["patches"]["sha256"] for s in b]


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


def _error_lines(capsys, command: str) -> list[str]:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"morpheus {command}: error:"), err
    return err[0]


def test_a_full_disk_during_training_checkpoints_and_export_is_one_line_and_loses_nothing(
        tiny_dataset, small_disk, tmp_path, capsys):
    import subprocess

    from morpheus_jax.ckpt.store import verify_step

    run = small_disk / "run"
    args = ["pretrain", "--no-progress", *tiny_overrides(tiny_dataset, run, "train.steps=6", "train.decay_steps=8",
                                                         "checkpoint.every=2")]
    # 4 MB hold the step-2 checkpoint (~2.5 MB) but not a second one beside it.
    assert main(args) == 2
    line = _error_lines(capsys, "pretrain")
    assert "no space left for the checkpoint of step 4" in line and str(run / "checkpoints") in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"] and verify_step(run / "checkpoints" / "2") is None
    # With room, the same command resumes from it.
    subprocess.run(["mount", "-o", "remount,size=16M", str(small_disk)], check=True)
    assert main(args) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 7))
    # Exports that do not fit: one line naming the file, nothing written (no temp file either).
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * (free - 300_000))
    for name in ("w.safetensors", "w.pt"):
        assert main(["export", "--checkpoint", str(run), "--out", str(small_disk / "out" / name)]) == 2
        line = _error_lines(capsys, "export")
        assert f"{small_disk / 'out' / name}: no space left on the device" in line
        assert not any((small_disk / "out").iterdir())
    # Metrics rows that no longer fit during training: one line naming the run folder.
    filler.unlink()
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 40_000))
    other = small_disk / "run2"
    assert main(["pretrain", "--no-progress", *tiny_overrides(tiny_dataset, other, "train.steps=400",
                                                              "train.decay_steps=400", "checkpoint.every=1000")]) == 2
    line = _error_lines(capsys, "pretrain")
    assert "no space left on the device" in line and str(other) in line


def _wait_for_rows(metrics, n, proc, timeout=300):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} metrics rows: {proc.poll()}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the process group", "SIGINT twice to the process group"])
def test_a_stopped_run_with_worker_processes_leaves_nothing_behind(tiny_dataset, tmp_path, how):
    """A scheduler's SIGTERM or a terminal's Ctrl-C (twice) reach the Grain workers too: the run
    saves and exits 0, no worker outlives it, no shared-memory segment is left, and nothing
    (a worker's KeyboardInterrupt, the resource tracker) prints a traceback or a warning."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "morpheus_jax.cli", "pretrain", "--no-progress",
           *tiny_overrides(tiny_dataset, run, "train.steps=5000", "train.decay_steps=5000", "data.worker_count=2")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_rows(run / "metrics.jsonl", 3, proc)
    if how.startswith("SIGTERM"):
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "saved checkpoint at step" in out
    assert "Traceback" not in err and "leaked" not in err and "Warning" not in err, err[-2000:]
    assert _group_left(proc.pid) == ""                  # no process of the group is left
    if os.path.isdir("/dev/shm"):
        assert not [n for n in os.listdir("/dev/shm") if f"-{proc.pid}-" in n]


def _group_left(pgid: int, wait: float = 5.0) -> str:
    """The processes of a process group still running after ``wait`` seconds ("" when none)."""
    import os
    import subprocess
    import time

    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return ""
        time.sleep(0.2)
    ps = subprocess.run(["ps", "-o", "pid,stat,args", "-g", str(pgid)], capture_output=True, text=True)
    return ps.stdout


@pytest.mark.slow
def test_three_kills_at_bad_moments_resume_to_the_uninterrupted_losses(tiny_dataset, tmp_path):
    """The CI version of ``benchmarks/kill_anywhere.py``: SIGKILL during a checkpoint write,
    just after a metrics append and during start-up, a rerun after each; the run then ends
    with the losses of an uninterrupted run, bitwise, and no session printed a traceback."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from kill_anywhere import kill_and_resume, losses, pretrain_command

    extra = ["train.steps=24", "train.decay_steps=40", "checkpoint.every=3", "checkpoint.keep=2"]
    reference = tmp_path / "reference"
    pretrain(tiny_run_config(tiny_dataset, reference, *extra), progress=False)
    run = tmp_path / "killed"
    result = kill_and_resume(pretrain_command(tiny_dataset, run, *TINY_OVERRIDES, *extra), run, tmp_path / "logs",
                             kills=3, seed=0, modes=("checkpoint", "append", "startup"))
    assert result["finished"] and result["killed"] == 3, result
    assert [s["seen"] for s in result["sessions"][:2]] == ["during a checkpoint write", "just after a metrics append"]
    assert result["tracebacks"] == 0, result
    assert losses(run) == losses(reference)


def _error_line(capsys, command: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"morpheus {command}: error:"), err
    return err[0]


def test_paths_the_system_refuses_are_one_line(raw, tiny_dataset, tmp_path, capsys):
    """A file where a folder is expected, a folder where a file is, a symlink loop, a download cut
    short: one line naming the path, exit 2, nothing written."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    run_args = ["pretrain", "--no-progress", *tiny_overrides(tiny_dataset, afile / "run", "train.steps=2")]
    assert main(run_args) == 2
    assert f"{afile / 'run'}: a part of the path is a file, not a folder" in _error_line(capsys, "pretrain")
    run = tmp_path / "run"
    (run / ".lock").mkdir(parents=True)
    assert main(["pretrain", "--no-progress", *tiny_overrides(tiny_dataset, run, "train.steps=2")]) == 2
    assert f"{run / '.lock'}: is a folder, expected a file" in _error_line(capsys, "pretrain")
    prep = ["prepare", "--wsi-dim", str(TINY_DIM), "--no-progress"]
    assert main([*prep, "--raw", str(raw), "--out", str(afile / "ds")]) == 2
    assert "a part of the path is a file, not a folder" in _error_line(capsys, "prepare")
    work = tmp_path / "raw"
    shutil.copytree(raw, work, symlinks=True)
    rna = work / "omics" / "rna.csv"
    rna.unlink()
    rna.symlink_to("rna.csv")
    assert main([*prep, "--raw", str(work), "--out", str(tmp_path / "ds")]) == 2
    assert f"{rna}: cannot resolve the path" in _error_line(capsys, "prepare")
    rna.unlink()
    whole = gzip.compress((raw / "omics" / "rna.csv").read_bytes())
    rna.write_bytes(whole[: len(whole) // 2])                          # a download cut short
    assert main([*prep, "--raw", str(work), "--out", str(tmp_path / "ds")]) == 2
    assert f"{rna}: cannot read omics CSV (Compressed file ended" in _error_line(capsys, "prepare")
    assert not (tmp_path / "ds").exists()


def test_a_read_only_folder_is_one_line(raw, tmp_path, capsys):
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    proc = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot bind-mount a folder here: {proc.stderr.strip() or proc.returncode}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True, capture_output=True)
        assert main(["prepare", "--raw", str(raw), "--out", str(ro / "ds"), "--wsi-dim", str(TINY_DIM),
                     "--no-progress"]) == 2
        assert f"{ro / 'ds'}: read-only file system" in _error_line(capsys, "prepare")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_outputs_of_the_wrong_kind_are_refused_before_any_work(pretrained_cohort, tmp_path, capsys):
    run, ds, _ = pretrained_cohort
    folder = tmp_path / "w.safetensors"
    (folder / "keep.txt").parent.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(run), "--out", str(folder), "--overwrite"]) == 2
    assert f"--out {folder}: is a folder" in _error_line(capsys, "export")
    assert (folder / "keep.txt").read_text() == "mine"
    afile = tmp_path / "ft"
    afile.write_text("mine")
    assert main(["finetune", "survival", "--checkpoint", str(run), "--dataset", str(ds), "--out", str(afile)]) == 2
    assert f"--out {afile}: is a file, not a folder" in _error_line(capsys, "finetune survival")
    assert afile.read_text() == "mine"


def test_a_damaged_metrics_file_is_one_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n' + "garbage\n" * 50 + '{"step": 2}\n{"st' + "\x00" * 64)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "51 lines (2, 3, 4, …) are not a complete JSON row" in err[0], err
