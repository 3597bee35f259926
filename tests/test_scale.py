"""Scale-out on CPU: meshes, two processes, exact resume, restore onto other meshes,
damaged checkpoints, launch scripts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_overrides, tiny_run_config

from morpheus_jax.apps.pretrain import pretrain
from morpheus_jax.ckpt.store import Checkpointer, checkpoint_dir, restore_params
from morpheus_jax.core.errors import CheckpointError, IncompatibleCheckpoint
from morpheus_jax.core.log import read_jsonl
from morpheus_jax.engine.run import build_run

ROOT = Path(__file__).resolve().parent.parent
MESHES = {"1dev": ["mesh.data=1"], "data8": ["mesh.data=8"], "data2_fsdp4": ["mesh.data=2", "mesh.fsdp=4"],
          "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}
STEPS = ["train.steps=10"]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def mesh_runs(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("meshes")
    for name, overrides in MESHES.items():
        pretrain(tiny_run_config(tiny_dataset, out / name, *STEPS, *overrides), progress=False)
    return {name: _losses(out / name) for name in MESHES}


@pytest.mark.parametrize("name", [n for n in MESHES if n != "1dev"])
def test_meshes_give_single_device_losses(mesh_runs, name):
    ref, got = mesh_runs["1dev"], mesh_runs[name]
    assert sorted(got) == list(range(1, 11))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (name, step)


def test_param_sharding_follows_rules(tiny_dataset, tmp_path):
    run = build_run(tiny_run_config(tiny_dataset, tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    spec = {n: run.param_shardings[n].spec for n in run.codec.names}
    assert tuple(spec["encoder_blocks.0.mlp.linear1.kernel"]) == ("fsdp", "tensor")
    assert tuple(spec["encoder_blocks.0.attn.qkv.kernel"]) == ("fsdp", "tensor")
    assert tuple(spec["omics_decoders.rna.reverse_tokenizer.w1"])[0] == "tensor"
    state = run.init_state()
    shards = state["params"]["encoder_blocks.0.mlp.linear1.kernel"].addressable_shards
    assert {tuple(s.data.shape) for s in shards} == {(16, 32)}  # [32, 64] split 2 x 2
    # Optimizer moments follow their parameters.
    mu = state["opt_state"][0].mu["encoder_blocks.0.mlp.linear1.kernel"]
    assert mu.sharding == state["params"]["encoder_blocks.0.mlp.linear1.kernel"].sharding


def test_two_processes_match_one_process(mesh_runs, tiny_dataset, tmp_path):
    """Two processes × 4 devices give the 8-device losses; a checkpoint that one process
    cannot read is skipped by both (they resume from the same earlier step)."""
    run = tmp_path / "mp"
    args = tiny_overrides(tiny_dataset, run, *STEPS, "mesh.data=8", "checkpoint.every=5")
    env = {**os.environ, "PYTHON": sys.executable}

    def launch():
        proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "-n", "2", "-d", "4", "-l", str(tmp_path),
                               "--", "--no-progress", *args], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:] + (tmp_path / "process_1.log").read_text()[-2000:]
        got, ref = _losses(run), mesh_runs["data8"]
        assert sorted(got) == sorted(ref)
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5), step
        return proc.stdout + proc.stderr

    launch()
    # Run-folder files have one writer (process 0: its lock, emptied on exit, and the dataset's
    # fingerprint among them), and no temp file is left behind.
    assert {p.name for p in run.iterdir() if p.is_file()} == {
        "config.yaml", "parameters.txt", "metrics.jsonl", "final.json", ".lock", "dataset.json"}
    assert (run / ".lock").read_text() == ""
    (checkpoint_dir(run) / "10" / "data" / "process_1-of-2.json").write_text("{truncated")
    out = launch()
    assert f"checkpoint {checkpoint_dir(run) / '10'} is damaged (" in out and "process_1-of-2.json" in out
    assert f"resumed from {checkpoint_dir(run) / '5'} at step 5" in out


def test_a_failing_process_ends_the_job_promptly(tmp_path):
    """Process 0 finds no dataset while process 1 waits for it at a barrier: the job ends
    with process 0's one-line error and status 2, not after JAX's 5-minute shutdown barrier."""
    args = tiny_overrides(tmp_path / "absent", tmp_path / "run", "mesh.data=8")
    env = {**os.environ, "PYTHON": sys.executable}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "-n", "2", "-d", "4", "-l", str(tmp_path),
                           "--", "--no-progress", *args], env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"morpheus pretrain: error: {tmp_path / 'absent'}: no prepared dataset" in proc.stderr
    assert "process 0 of 2 failed" in proc.stderr
    assert elapsed < 150, f"the job took {elapsed:.0f} s to end"


def test_launcher_stops_the_others_when_one_fails(tmp_path):
    """launch/local.sh: the first failure's status is the job's, and the other processes
    are sent SIGTERM, then SIGKILL (a stand-in for python that ignores SIGTERM)."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    'for ((i = 1; i <= $#; i++)); do [[ "${!i}" == --process-id ]] && { j=$((i + 1)); id=${!j}; }; done\n'
                    'echo "started $id" >> "$(dirname "$0")/events"\n'
                    'if [[ $id == 2 ]]; then sleep 1; exit 7; fi\n'
                    "trap 'echo \"TERM $id\" >> \"$(dirname \"$0\")/events\"' TERM\n"
                    "while true; do sleep 0.1; done\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "MORPHEUS_KILL_GRACE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "-n", "3", "-d", "1", "-p", "5555", "-l",
                           str(tmp_path / "logs"), "--", "x=1"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert "process 2 exited with status 7; stopping the others" in proc.stderr
    events = sorted((tmp_path / "events").read_text().split("\n")[:-1])
    assert events == ["TERM 0", "TERM 1", "started 0", "started 1", "started 2"]


RESUME = ["train.steps=40", "checkpoint.every=5"]


def test_exact_resume_after_sigterm_and_after_raising_steps(tiny_dataset, tmp_path):
    pretrain(tiny_run_config(tiny_dataset, tmp_path / "straight", *RESUME), progress=False)
    straight = _losses(tmp_path / "straight")
    # Interrupted: SIGTERM once step 20 is logged; the process saves and exits 0.
    run = tmp_path / "killed"
    args = tiny_overrides(tiny_dataset, run, *RESUME)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, "-m", "morpheus_jax.cli", "pretrain", "--no-progress", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if max(_losses(run) if (run / "metrics.jsonl").exists() else {0: 0}) >= 20:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved checkpoint at step" in out
    stopped = max(_losses(run))
    assert 20 <= stopped < 40 and (checkpoint_dir(run) / str(stopped)).is_dir()
    pretrain(tiny_run_config(tiny_dataset, run, *RESUME), progress=False)
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(stopped + 1, 41):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
    # A finished 20-step run extended to 40 steps (same decay_steps) continues the same way.
    short = [r for r in RESUME if not r.startswith("train.steps")] + ["train.steps=20"]
    pretrain(tiny_run_config(tiny_dataset, tmp_path / "extended", *short), progress=False)
    pretrain(tiny_run_config(tiny_dataset, tmp_path / "extended", *RESUME), progress=False)
    extended = _losses(tmp_path / "extended")
    for step in range(1, 41):
        assert extended[step] == pytest.approx(straight[step], rel=1e-6), step


def test_resume_with_another_bucket_count_continues_the_same_losses(tiny_dataset, tmp_path):
    """Checkpoints hold the canonical parameter layout: a run saved with model.group_buckets=4
    resumes with group_buckets=2 (a speed knob) and continues the straight run's losses."""
    common = ["train.decay_steps=8", "checkpoint.every=4"]
    pretrain(tiny_run_config(tiny_dataset, tmp_path / "straight", *common, "train.steps=8", "model.group_buckets=4"),
             progress=False)
    straight = _losses(tmp_path / "straight")
    run = tmp_path / "r"
    pretrain(tiny_run_config(tiny_dataset, run, *common, "train.steps=4", "model.group_buckets=4"), progress=False)
    pretrain(tiny_run_config(tiny_dataset, run, *common, "train.steps=8", "model.group_buckets=2"), progress=False)
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_restore_onto_other_meshes_and_continue(tiny_dataset, tmp_path):
    """A checkpoint written on (data=4, fsdp=2) restores onto (data=8) and onto one device
    with equal parameters, and training continues from it."""
    from morpheus_jax.engine.run import model_spec
    run_dir = tmp_path / "r"
    source = build_run(tiny_run_config(tiny_dataset, run_dir, "mesh.data=4", "mesh.fsdp=2"))
    state = source.init_state()
    assert any(len(s.device_set) > 1 and s.spec != jax.sharding.PartitionSpec()
               for s in jax.tree.leaves(source.state_shardings["params"]))
    state["step"] = state["step"] + 4
    ckpt = Checkpointer(checkpoint_dir(run_dir), keep=3)
    ckpt.save(4, state, None, model_spec(source.cfg, source.manifest))
    ckpt.close()
    saved = restore_params(checkpoint_dir(run_dir) / "4")
    for mesh in (["mesh.data=8"], ["mesh.data=1"]):
        run = build_run(tiny_run_config(tiny_dataset, run_dir, *mesh))
        ckpt = Checkpointer(checkpoint_dir(run_dir), keep=3)
        step, restored, data_ok = ckpt.restore_latest(run.abstract_state(), None)
        ckpt.close()
        assert step == 4 and not data_ok
        for name, value in saved.items():
            got = restored["params"][name]
            assert got.sharding == run.state_shardings["params"][name]
            np.testing.assert_array_equal(np.asarray(got), np.asarray(value))
    pretrain(tiny_run_config(tiny_dataset, run_dir, "train.steps=6", "mesh.data=8"), progress=False)
    losses = _losses(run_dir)
    assert sorted(losses) == [5, 6] and all(np.isfinite(list(losses.values())))


def test_damaged_latest_checkpoint_is_skipped_and_incompatible_config_refused(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "r"
    pretrain(tiny_run_config(tiny_dataset, run_dir, "train.steps=6", "checkpoint.every=3", "checkpoint.keep=3"),
             progress=False)
    ckdir = checkpoint_dir(run_dir)
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [3, 6]
    # Step 6 damaged (its array data gone, as after a crash mid-write on a filesystem without
    # atomic renames); a save killed mid-way (Orbax's temporary folder) is also present.
    shutil.rmtree(ckdir / "6" / "state" / "d", ignore_errors=True)
    for p in (ckdir / "6" / "state").glob("ocdbt.process_*"):
        shutil.rmtree(p, ignore_errors=True)
    (ckdir / "9.orbax-checkpoint-tmp-1234").mkdir()
    run = build_run(tiny_run_config(tiny_dataset, run_dir, "train.steps=6"))
    ckpt = Checkpointer(ckdir, keep=3)
    step, state, _ = ckpt.restore_latest(run.abstract_state())
    ckpt.close()
    assert step == 3 and int(state["step"]) == 3
    out = capsys.readouterr().err
    assert f"checkpoint {ckdir / '6'} is damaged (" in out and "missing" in out
    # Set aside for inspection, out of the step list: the run saves step 6 again.
    assert (ckdir / "6.damaged" / "state").is_dir() and not (ckdir / "6").exists()
    # Whatever part is damaged: random bytes in an array file, a truncated spec, an altered
    # checksum list; each is set aside in turn and the previous step restored.
    for damage in ("bytes", "spec", "checksums"):
        shutil.copytree(ckdir / "3", ckdir / "5")
        if damage == "bytes":
            target = max((p for p in (ckdir / "5" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
            data = bytearray(target.read_bytes())
            data[len(data) // 2: len(data) // 2 + 16] = os.urandom(16)
            target.write_bytes(bytes(data))
        elif damage == "spec":
            target = ckdir / "5" / "spec" / "metadata"
            target.write_text(target.read_text()[:40])
        else:
            target = ckdir / "5" / "checksums.json"
            target.write_text("{")
        ckpt = Checkpointer(ckdir, keep=3)
        step, state, _ = ckpt.restore_latest(run.abstract_state())
        ckpt.close()
        assert step == 3 and int(state["step"]) == 3, damage
        out = capsys.readouterr().err
        assert f"checkpoint {ckdir / '5'} is damaged ({target}" in out, (damage, out)
        assert not (ckdir / "5").exists()
        shutil.rmtree(next(ckdir.glob("5.damaged*")))
    pretrain(tiny_run_config(tiny_dataset, run_dir, "train.steps=6", "checkpoint.every=3", "checkpoint.keep=3"),
             progress=False)
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [3, 6]
    assert sorted(_losses(run_dir)) == list(range(1, 7))
    with pytest.raises(IncompatibleCheckpoint, match=r"model.hidden_size: 32 != 48"):
        pretrain(tiny_run_config(tiny_dataset, run_dir, "train.steps=8", "model.hidden_size=48"), progress=False)
    # A checkpoint of the 0.1 bucketed layout (no param_layout in its spec) is refused, not set aside.
    meta = ckdir / "6" / "spec" / "metadata"
    spec = json.loads(meta.read_text())
    del spec["param_layout"]
    meta.write_text(json.dumps(spec))
    (ckdir / "6" / "checksums.json").unlink()            # 0.1 wrote none
    with pytest.raises(CheckpointError, match="morpheus-jax 0.1"):
        pretrain(tiny_run_config(tiny_dataset, run_dir, "train.steps=8"), progress=False)
    assert (ckdir / "6" / "state").is_dir()


def test_launch_scripts_dry_run():
    tpu = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "--name", "m1", "--zone", "us-west4-a",
                          "--accelerator", "v5litepod-32", "--spot", "--dry-run", "--", "--config", "paper",
                          "run_dir=gs://bucket/run"], capture_output=True, text=True)
    assert tpu.returncode == 0, tpu.stderr
    lines = tpu.stdout.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create m1 --zone us-west4-a --accelerator-type v5litepod-32")
    assert "--spot" in lines[0]
    assert all("--worker=all" in line for line in lines[1:])
    assert "morpheus\\ pretrain\\ --no-progress\\ --config\\ paper\\ run_dir=gs://bucket/run" in lines[-1]
    slurm = subprocess.run(["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), "--dry-run", "train.steps=10"],
                           capture_output=True, text=True, env={**os.environ, "SLURM_JOB_NUM_NODES": "2"})
    assert slurm.returncode == 0, slurm.stderr
    assert slurm.stdout.startswith("srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=1 bash -c ")
    assert "morpheus_jax.cli\\ pretrain\\ --no-progress\\ train.steps=10" in slurm.stdout
    local = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "-n", "3", "-d", "2", "-p", "5555", "--dry-run",
                            "--", "train.steps=5"], capture_output=True, text=True)
    assert local.returncode == 0
    assert [line.split("--process-id ")[1] for line in local.stdout.strip().splitlines()] == [
        "0 train.steps=5", "1 train.steps=5", "2 train.steps=5"]
    for script in ("local.sh", "tpu_vm.sh", "slurm_gpu.sbatch"):
        help_ = subprocess.run(["bash", str(ROOT / "launch" / script), "--help"], capture_output=True, text=True)
        assert help_.returncode == 0 and "usage:" in help_.stdout
    assert jax.device_count() == 8
