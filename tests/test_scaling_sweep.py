"""Ladders: expansion and names, budgets, status, launch commands, and a small real sweep
(2 runs, in process) that is skipped when finished and resumed when interrupted."""

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_OVERRIDES

from morpheus_jax.apps.scaling import sweep as sw
from morpheus_jax.apps.scaling.ladder import expand, load_ladder, resolve_steps, run_config, run_status
from morpheus_jax.cli.main import main as cli_main
from morpheus_jax.cli.scaling import register
from morpheus_jax.core.config import load_config
from morpheus_jax.core.errors import LadderError
from morpheus_jax.model.flops import step_flops

ROOT = Path(__file__).resolve().parent.parent
PAPER_SIZES = ROOT / "morpheus_jax" / "configs" / "paper_group_sizes.json"


def _cli(argv):
    return cli_main([str(a) for a in argv])


def write_ladder(path: Path, **body) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def grid_ladder(tmp_path):
    return write_ladder(tmp_path / "grid.yaml", name="grid", base="demo", out=str(tmp_path / "runs"),
                        fixed={"train.steps": 100, "data": {"num_patches": 64}},
                        axes={"model.hidden_size": [64, 128], "model.encoder_layers": [1],
                              "model.num_prototypes": [8], "data.train_fraction": [0.5, 1.0]})


def test_expansion_names_and_overrides(tmp_path):
    ladder = load_ladder(grid_ladder(tmp_path))
    runs = expand(ladder)
    assert [r.name for r in runs] == ["h64-l1-p8-frac0.5", "h64-l1-p8-frac1", "h128-l1-p8-frac0.5", "h128-l1-p8-frac1"]
    assert runs[2].run_dir == tmp_path / "runs" / "h128-l1-p8-frac0.5"
    cfg = run_config(ladder, runs[2])
    assert (cfg.model.hidden_size, cfg.data.train_fraction, cfg.data.num_patches, cfg.train.steps) == (128, 0.5, 64, 100)
    assert cfg.run_dir == str(runs[2].run_dir)
    # Bundle axes: named points setting several keys; budgets as keys.
    path = write_ladder(tmp_path / "b.yaml", base="demo", axes={
        "model": [{"name": "small", "model.hidden_size": 32, "model.encoder_mlp_dim": 64},
                  {"model.hidden_size": 64, "model.encoder_mlp_dim": 128}],
        "budget.flops": [1e15, 3e16]})
    runs = expand(load_ladder(path))
    assert [r.name for r in runs] == ["small-c1e15", "small-c3e16", "h64-mlp128-c1e15", "h64-mlp128-c3e16"]
    assert runs[0].budget == {"budget.flops": 1e15} and "budget.flops" not in runs[0].config_overrides
    assert load_ladder(path).out == Path("runs/scaling/b")


@pytest.mark.parametrize("body,message", [
    ({"axes": {"hidden": [1, 2]}}, "dotted config key"),
    ({"axes": {"model.hidden_size": [64, 64]}}, "repeated"),
    ({"axes": {"budget.samples": [1], "m": [{"budget.flops": 1.0}]}}, "several budgets"),
    ({"axes": {"model.hidden_size": [64]}, "whatever": 1}, "unknown ladder keys"),
    ({"fixed": {"run_dir": "x"}}, "run_dir"),
    ({"axes": {"model.hidden_sise": [64]}}, "unknown config key 'model.hidden_sise'"),
    ({"base": "no_such_config"}, "not found"),
])
def test_ladder_errors(tmp_path, body, message):
    path = write_ladder(tmp_path / "bad.yaml", **{"base": "demo", **body})
    with pytest.raises(LadderError, match=message):
        ladder = load_ladder(path)
        for run in expand(ladder):
            run_config(ladder, run)


def test_budgets_resolve_to_steps(tmp_path):
    sizes = json.loads(PAPER_SIZES.read_text())
    groups = {m: v["sizes"] for m, v in sizes.items()}
    paper = load_config("paper")
    per_step = step_flops(paper.model, groups, 32, paper.data.num_patches, paper.masking.ratio)["useful"]
    path = write_ladder(tmp_path / "b.yaml", base="paper", group_sizes=str(PAPER_SIZES), fixed={
        "train.global_batch_size": 32},
        axes={"budget": [{"budget.samples": 3201}, {"budget.tokens": 54 * 32 * 10},
                         {"budget.flops": per_step * 6.6}]})
    ladder = load_ladder(path)
    rows = sw.plan(ladder)
    assert [r["steps"] for r in rows] == [101, 10, 7]
    assert all(r["config"].train.steps == r["steps"] and r["config"].train.epochs is None for r in rows)
    cfg = rows[0]["config"]
    assert resolve_steps(cfg, {"budget.flops": 1e12}, None) is None      # needs the groups
    assert resolve_steps(cfg, {"budget.flops": 1e12}, groups) == round(1e12 / per_step)


def test_status_dry_run_and_launch_commands(tmp_path, capsys, monkeypatch):
    path = grid_ladder(tmp_path)
    runs = tmp_path / "runs"
    (runs / "h64-l1-p8-frac0.5").mkdir(parents=True)
    (runs / "h64-l1-p8-frac0.5" / "final.json").write_text("{}")
    (runs / "h64-l1-p8-frac1" / "checkpoints" / "40").mkdir(parents=True)
    assert run_status(runs / "h64-l1-p8-frac1") == "interrupted"
    assert run_status(runs / "nothing") == "pending"
    assert _cli(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 done, 1 interrupted, 2 pending" in out
    for line in out.splitlines():
        if line.strip().startswith("h64-l1-p8-frac1 "):
            assert "interrupted" in line and " 100 " in line
    assert sorted(p.name for p in runs.iterdir()) == ["h64-l1-p8-frac0.5", "h64-l1-p8-frac1"]   # nothing written

    assert _cli(["sweep", str(path), "--launcher", "tpu_vm", "--zone", "us-east5-a",
                 "--accelerator", "v5litepod-32"]) == 0
    cmds = capsys.readouterr().out.strip().splitlines()[-3:]
    assert cmds[0].startswith("launch/tpu_vm.sh --name grid-h64-l1-p8-frac1 --zone us-east5-a "
                              "--accelerator v5litepod-32 -- --config demo ")
    assert "model.hidden_size=64" in cmds[0] and f"run_dir={runs}/h64-l1-p8-frac1" in cmds[0]
    assert "frac0-5" in cmds[1] and "data.train_fraction=0.5" in cmds[1]
    assert _cli(["sweep", str(path), "--launcher", "slurm", "--only", "h128-l1-p8-frac1"]) == 0
    cmd = capsys.readouterr().out.strip().splitlines()[-1]
    assert cmd.startswith("sbatch --job-name=grid-h128-l1-p8-frac1 launch/slurm_gpu.sbatch --config demo ")
    assert _cli(["sweep", str(path), "--launcher", "tpu_vm"]) == 2       # no zone
    assert "--zone" in capsys.readouterr().err

    submitted = []
    monkeypatch.setattr(sw.subprocess, "run", lambda cmd: submitted.append(cmd) or argparse.Namespace(returncode=0))
    assert _cli(["sweep", str(path), "--launcher", "slurm", "--submit"]) == 0
    assert [c[1] for c in submitted] == ["--job-name=grid-h64-l1-p8-frac1", "--job-name=grid-h128-l1-p8-frac0-5",
                                         "--job-name=grid-h128-l1-p8-frac1"]


def test_small_sweep_runs_skips_and_resumes(tiny_dataset, tmp_path, capsys):
    fixed = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in TINY_OVERRIDES)}
    fixed.update({"data.dir": str(tiny_dataset), "data.raw_dir": None, "train.log_every": 2})
    path = write_ladder(tmp_path / "small.yaml", name="small", base="demo", out=str(tmp_path / "runs"), fixed=fixed,
                        axes={"data": [{"name": "half", "data.train_fraction": 0.5, "budget.samples": 24},
                                       {"name": "full", "data.train_fraction": 1.0, "budget.samples": 40}]})
    assert _cli(["sweep", str(path), "--no-progress"]) == 0
    runs = tmp_path / "runs"
    for name, steps in (("half", 3), ("full", 5)):
        final = json.loads((runs / name / "final.json").read_text())
        assert final["step"] == steps and "val_loss" in final
        info = json.loads((runs / name / "scaling.json").read_text())
        assert info["params"] > 0 and info["flops_per_step"] > 0
    rows = sw.collect(runs)
    assert [(r["run"], r["samples"], r["steps"]) for r in rows] == [("full", 40, 5), ("half", 24, 3)]
    assert rows[0]["params"] == rows[1]["params"] and rows[0]["U"] > rows[1]["U"]
    assert rows[0]["flops"] == pytest.approx(rows[1]["flops"] * 5 / 3)
    sw.write_table(rows, tmp_path / "t.csv")
    assert [r["loss"] for r in sw.read_table(tmp_path / "t.csv")] == [r["loss"] for r in rows]
    capsys.readouterr()
    # forecast reads the runs folder as fit does; two runs cannot pin a law: one line, exit 2.
    assert _cli(["scaling", "forecast", str(runs), "--params", str(2 * rows[0]["params"]), "--samples", "80",
                 "--bootstrap", "4"]) == 2
    err = capsys.readouterr().err
    assert "parameters needs at least" in err and "runs (finished runs or table rows), got 2" in err, err

    # Finished runs are skipped; an interrupted one (checkpoints, no final.json) resumes.
    (runs / "half" / "final.json").unlink()
    shutil.rmtree(runs / "full" / "tensorboard")
    assert _cli(["sweep", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming half" in out and "starting full" not in out and "resuming full" not in out
    assert not (runs / "full" / "tensorboard").exists()
    assert json.loads((runs / "half" / "final.json").read_text())["step"] == 3


def test_every_flag_has_help():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    register(sub)
    nested = next(a for a in sub.choices["scaling"]._actions if a.dest == "scaling_command")
    parsers = [sub.choices["sweep"], sub.choices["scaling"], *nested.choices.values()]
    assert set(nested.choices) == {"fit", "forecast", "plan", "flops"}
    for parser in parsers:
        text = parser.format_help()
        for action in parser._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 8, (parser.prog, action.dest)
            for opt in action.option_strings:
                assert opt in text


def test_shipped_ladders_expand():
    tiny = sw.plan(load_ladder("tiny"))
    assert [r["run"].name for r in tiny] == ["h16-n1600", "h16-n4800", "h32-n1600", "h32-n4800", "h64-n1600",
                                              "h64-n4800"]
    assert [r["steps"] for r in tiny] == [50, 150] * 3
    lrt = sw.plan(load_ladder("lr_transfer"))
    assert len(lrt) == 24 and {r["config"].model.parametrization for r in lrt} == {"standard", "mup"}
    assert {r["config"].train.learning_rate for r in lrt} == {1e-3, 3e-3, 1e-2, 3e-2}
    forecast = sw.plan(load_ladder("forecast"))
    assert [r["steps"] for r in forecast] == [100, 200, 400] * 3
    assert all(r["config"].model.parametrization == "mup" for r in forecast)
    (held,) = sw.plan(load_ladder("forecast_heldout"))
    widest, longest = max(r["config"].model.hidden_size for r in forecast), max(r["steps"] for r in forecast)
    assert held["config"].model.hidden_size == 2 * widest and held["steps"] == 2 * longest
    assert held["config"].data == forecast[0]["config"].data
    assert held["config"].train.learning_rate == forecast[0]["config"].train.learning_rate
    epochs = sw.plan(load_ladder("epochs"))
    assert len(epochs) == 18 and [r["run"].name for r in epochs][:2] == ["h16-ep1", "h16-ep2"]
    counts = sorted({r["config"].train.epochs for r in epochs})
    assert counts[0] == 1 and counts[-1] >= 32 and {r["config"].model.parametrization for r in epochs} == {"mup"}
    (long_run,) = sw.plan(load_ladder("forecast_epochs_heldout"))
    assert long_run["config"].train.epochs >= 4 * counts[-1]
    assert long_run["config"].data == epochs[0]["config"].data and long_run["config"].train == dataclasses.replace(
        epochs[-1]["config"].train, epochs=long_run["config"].train.epochs)
    assert long_run["config"].model == epochs[-1]["config"].model
    paper = {r["run"].name: r for r in sw.plan(load_ladder(ROOT / "configs" / "scaling" / "paper_ladder.yaml"))}
    assert len(paper) == 24 and paper["paper-frac1"]["config"].model.hidden_size == 256
    from morpheus_jax.model.flops import param_counts
    r = paper["paper-frac1"]
    assert param_counts(r["config"].model, r["layouts"])["total"] / 1e6 == pytest.approx(33.98, abs=0.01)
