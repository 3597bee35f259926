"""Kill a pretraining run with SIGKILL at random moments, rerun it each time, and check that
it ends exactly where an uninterrupted run ends.

A small run (synthetic cohort, tiny model, a checkpoint every few steps) is first trained
without interruption: its per-step losses (metrics.jsonl) and final validation loss are the
reference. Then the same command is started over and over in one run folder and killed
with SIGKILL at one of these moments, in turn:

- ``checkpoint``: while Orbax writes a checkpoint (its temporary folder exists);
- ``append``: just after the run folder's metrics file grew (a row being appended, the
  TensorBoard event after it);
- ``startup``: 0.3–8 s after the start (imports, dataset check, restore, compile);
- ``random``: 0–3 s after the session logged its first row.

Every second session reads its batches in 2 Grain worker processes, and every second kill
takes the whole process group (workers and resource tracker too) rather than the training
process alone. After the kills the command runs to the end. The run passes when the final
per-step losses and validation loss equal the reference bitwise and no session, killed or
not, printed a traceback.

    python benchmarks/kill_anywhere.py [--kills 20] [--steps 120] [--every 4] [--seed 0] [--json]

`kill_and_resume` is also what the 3-kill test in ``tests/test_faults.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

MODES = ("checkpoint", "append", "startup", "random")

# A model small enough that a session's start-up (imports, compile) dominates its steps.
TINY = ["data.num_patches=48", "model.wsi_dim=32", "model.hidden_size=32", "model.num_prototypes=4",
        "model.group_hidden=32", "model.encoder_heads=4", "model.decoder_heads=4", "model.encoder_mlp_dim=64",
        "model.decoder_mlp_dim=64", "model.encoder_dropout=0.1", "train.global_batch_size=8",
        "train.learning_rate=3e-3", "train.warmup_steps=5", "train.log_every=1", "train.eval_every=0",
        "data.eval_bag_bucket=1024", "mesh.data=1"]


def pretrain_command(dataset: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "morpheus_jax.cli", "pretrain", "--no-progress", f"data.dir={dataset}",
            "data.raw_dir=null", f"run_dir={run_dir}", *overrides]


def _rows(metrics: Path) -> int:
    try:
        return metrics.read_bytes().count(b"\n")
    except OSError:
        return 0


def _wait_for(moment: str, proc: subprocess.Popen, run_dir: Path, rng: random.Random, limit: float) -> str:
    """Wait for ``moment`` in the running session; returns what was seen when it came."""
    start, metrics, ckpts = time.time(), run_dir / "metrics.jsonl", run_dir / "checkpoints"
    if moment == "startup":
        time.sleep(rng.uniform(0.3, 8.0))
        return "startup"
    size0 = metrics.stat().st_size if metrics.exists() else 0
    rows0 = _rows(metrics)
    while proc.poll() is None and time.time() - start < limit:
        if moment == "checkpoint" and _writing(ckpts, start):
            time.sleep(rng.uniform(0.0, 0.02))
            return "during a checkpoint write"
        if moment == "append" and metrics.exists() and metrics.stat().st_size != size0:
            time.sleep(rng.uniform(0.0, 0.005))
            return "just after a metrics append"
        if moment == "random" and _rows(metrics) > rows0:
            time.sleep(rng.uniform(0.0, 3.0))
            return "during training"
        time.sleep(0.002)
    return "timed out waiting"


def _writing(ckpts: Path, since: float) -> bool:
    """Whether a checkpoint write of this session is under way (a temporary folder made after
    ``since``; a killed session's leftover is older)."""
    try:
        for p in ckpts.iterdir():
            if "tmp" in p.name and p.stat().st_mtime >= since:
                return True
    except OSError:           # the folder or an entry vanished while listed (a save finishing)
        pass
    return False


def kill_and_resume(command: list[str], run_dir: Path, logs: Path, *, kills: int, seed: int,
                    modes: tuple[str, ...] = MODES, limit: float = 300.0) -> dict:
    """``kills`` sessions of ``command`` killed at ``modes`` in turn, then one run to the end.
    Returns the record of every session and whether any printed a traceback."""
    rng = random.Random(seed)
    logs.mkdir(parents=True, exist_ok=True)
    sessions = []
    for i in range(kills + 1):
        last = i == kills
        extra = ["data.worker_count=2"] if i % 2 else []
        out, err = logs / f"session{i:02d}.out", logs / f"session{i:02d}.err"
        t0 = time.time()
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(command + extra, stdout=fo, stderr=fe, start_new_session=True)
            record = {"session": i, "workers": 2 if extra else 0}
            if last:
                record["returncode"] = proc.wait(timeout=limit * 4)
            else:
                mode = modes[i % len(modes)]
                seen = _wait_for(mode, proc, run_dir, rng, limit)
                whole_group = i % 4 in (1, 2)
                if proc.poll() is None:
                    (os.killpg if whole_group else os.kill)(proc.pid, signal.SIGKILL)
                record.update(mode=mode, seen=seen, signal_to="process group" if whole_group else "process",
                              returncode=proc.wait())
        record["seconds"] = round(time.time() - t0, 2)
        text = err.read_text(errors="replace")
        record["traceback"] = "Traceback" in text
        record["rows_after"] = _rows(run_dir / "metrics.jsonl")
        record["steps_saved"] = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*")
                                       if p.name.isdigit()) if (run_dir / "checkpoints").is_dir() else []
        sessions.append(record)
    return {"sessions": sessions, "tracebacks": sum(s["traceback"] for s in sessions),
            "finished": sessions[-1]["returncode"] == 0,
            "killed": sum(1 for s in sessions[:-1] if s["returncode"] == -signal.SIGKILL)}


def losses(run_dir: Path) -> tuple[list[tuple[int, float]], float | None]:
    """(per-step training losses from metrics.jsonl, final validation loss)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = run_dir / "final.json"
    val = json.loads(final.read_text()).get("val_loss") if final.exists() else None
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], val


def _cohort(work: Path) -> Path:
    from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare
    from morpheus_jax.data.synth import write_synthetic_cohort

    ds = work / "ds"
    if not (ds / "manifest.json").exists():
        write_synthetic_cohort(work / "raw", n_patients=80, seed=11, feature_dim=32, mean_patches_per_slide=60,
                               progress=False)
        prepare(RawCohort.from_dir(work / "raw"), ds, PrepareOptions(wsi_dim=32, progress=False))
    return ds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=4, help="checkpoint.every")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("kill_anywhere_work"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from train_step import cpu_model

    work = args.work.resolve()
    ds = _cohort(work)
    overrides = [*TINY, f"train.steps={args.steps}", f"train.decay_steps={args.steps}",
                 f"checkpoint.every={args.every}", "checkpoint.keep=2"]
    t0 = time.time()
    ref_dir = work / f"reference-{args.seed}"
    if not (ref_dir / "final.json").exists():
        subprocess.run(pretrain_command(ds, ref_dir, *overrides), check=True, capture_output=True)
    t_ref = time.time() - t0
    run_dir = work / f"killed-{args.seed}-{int(time.time())}"
    result = kill_and_resume(pretrain_command(ds, run_dir, *overrides), run_dir, run_dir.with_suffix(".logs"),
                             kills=args.kills, seed=args.seed)
    ref, got = losses(ref_dir), losses(run_dir)
    result.update(cpu=cpu_model(), steps=args.steps, checkpoint_every=args.every, reference_seconds=round(t_ref, 1),
                  seconds=round(time.time() - t0 - t_ref, 1), losses_equal=ref[0] == got[0],
                  val_loss_equal=ref[1] == got[1], reference_val_loss=ref[1], val_loss=got[1],
                  first_difference=next(((a, b) for a, b in zip(ref[0], got[0]) if a != b), None))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for s in result["sessions"]:
            print(f"session {s['session']:2d} ({s['workers']} workers): "
                  + (f"killed {s['seen']} (SIGKILL to the {s['signal_to']}) after {s['seconds']} s"
                     if "mode" in s else f"ran to the end in {s['seconds']} s, exit {s['returncode']}")
                  + f"; checkpoints {s['steps_saved']}; traceback: {s['traceback']}")
        print(f"{result['killed']} kills, {result['tracebacks']} tracebacks; per-step losses equal the uninterrupted "
              f"run's bitwise: {result['losses_equal']}; val loss {result['val_loss']} vs {result['reference_val_loss']} "
              f"(equal: {result['val_loss_equal']}); CPU {result['cpu']}")
    ok = result["finished"] and result["losses_equal"] and result["val_loss_equal"] and not result["tracebacks"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
