"""The scaling-law fit: recovery of a known law, bootstrap intervals, the compute-optimal
frontier against its closed form, and `morpheus scaling fit` on a table."""

import csv
import json
import shutil

import numpy as np
import pytest
from scipy import optimize

from morpheus_jax.apps.scaling import fit as ft
from morpheus_jax.apps.scaling import study as st
from morpheus_jax.apps.scaling import sweep as sw
from morpheus_jax.cli.main import main as cli_main

TRUTH = ft.Law(E=0.6, A=30.0, B=60.0, alpha=0.35, beta=0.30)


def sample_law(seed, n=8, noise=0.01):
    """An n×n ladder over N, D in [1e5, 1e9], losses with 1 % multiplicative noise."""
    rng = np.random.default_rng(seed)
    big_n, big_d = (x.ravel() for x in np.meshgrid(np.logspace(5, 9, n), np.logspace(5, 9, n)))
    return big_n, big_d, TRUTH.loss(big_n, big_d) * np.exp(rng.normal(0.0, noise, big_n.shape))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_exponents(seed):
    n, d, loss = sample_law(seed)
    with ft.single_threaded_blas():
        law, _ = ft.fit_law(n, d, loss)
    assert law.alpha == pytest.approx(TRUTH.alpha, rel=0.05)
    assert law.beta == pytest.approx(TRUTH.beta, rel=0.05)
    assert law.E == pytest.approx(TRUTH.E, rel=0.05)


def test_exact_data_is_fitted_exactly():
    n, d, _ = sample_law(0, n=6)
    with ft.single_threaded_blas():
        law, objective = ft.fit_law(n, d, TRUTH.loss(n, d))
    for k, v in TRUTH.as_dict().items():
        assert getattr(law, k) == pytest.approx(v, rel=1e-3), k
    assert objective < 1e-6


def test_table_fit_has_intervals_around_the_fit():
    n, d, loss = sample_law(3)
    rows = [{"params": a, "samples": b, "loss": c} for a, b, c in zip(n, d, loss)]
    study = st.fit_study(rows, n_boot=12, seed=0)
    report, boot = st.report(study, rows), study.boot
    assert study.kind == "plain" and len(boot) == 12 and report["bootstrap_samples"] == 12
    for k in ("E", "A", "B", "alpha", "beta"):
        lo, hi = report["intervals"][k]
        assert lo <= hi and lo <= report[k] * 1.05 and hi >= report[k] * 0.95, k
    assert report["compute_relation"] == {"form": "C = k * N^gamma * D", "k": 6.0, "gamma": 1.0, "source": "6ND"}
    assert all(r["params_ci"][0] <= r["params_ci"][1] for r in report["frontier"])


def test_compute_optimal_matches_closed_form():
    law = TRUTH
    budgets = np.logspace(15, 24, 10)
    n_opt, d_opt = ft.optimal_allocation(law, budgets, ft.ComputeRelation(6.0, 1.0))
    a, b = law.alpha, law.beta
    g = (a * law.A / (b * law.B)) ** (1 / (a + b))
    np.testing.assert_allclose(n_opt, g * (budgets / 6) ** (b / (a + b)), rtol=1e-12)
    np.testing.assert_allclose(d_opt, (budgets / 6) ** (a / (a + b)) / g, rtol=1e-12)
    np.testing.assert_allclose(6 * n_opt * d_opt, budgets, rtol=1e-12)
    # And it is the minimum of L along C = k N^γ D, for C = 6ND and for a measured-style relation.
    for rel in (ft.ComputeRelation(6.0, 1.0), ft.ComputeRelation(40.0, 0.7)):
        for c in (1e16, 1e20):
            res = optimize.minimize_scalar(lambda x: law.loss(np.exp(x), c / (rel.k * np.exp(x) ** rel.gamma)),
                                           bounds=(0, 60), method="bounded", options={"xatol": 1e-10})
            assert np.exp(res.x) == pytest.approx(ft.optimal_allocation(law, c, rel)[0], rel=1e-4)


def test_measured_relation():
    n = np.array([1e5, 3e5, 1e6, 3e6])
    rel = ft.measured_relation(n, 3.0 * n ** 0.8)
    assert rel.k == pytest.approx(3.0) and rel.gamma == pytest.approx(0.8)
    one = ft.measured_relation([1e6, 1e6], [5e7, 5e7])
    assert one.gamma == 1.0 and one.k == pytest.approx(50.0)


def _cli(argv):
    return cli_main([str(a) for a in argv])


def test_fit_command_on_a_table(tmp_path, capsys):
    n, d, loss = sample_law(4, n=5)
    table = tmp_path / "runs.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["params", "samples", "loss", "flops"])
        for row in zip(n, d, loss, 20.0 * n ** 0.9 * d):
            w.writerow(row)
    out = tmp_path / "fit"
    assert _cli(["scaling", "fit", "--table", str(table), "--out", str(out), "--bootstrap", "8"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert {"E", "A", "B", "alpha", "beta", "intervals", "frontier", "compute_relation"} <= set(fit)
    assert set(fit["intervals"]) == {"E", "A", "B", "alpha", "beta"}
    assert fit["compute_relation"]["gamma"] == pytest.approx(0.9)    # measured from the flops column
    assert (out / "table.csv").read_text().startswith("params,samples,loss")
    for png in ("loss_vs_compute.png", "optimal_allocation.png"):
        assert (out / png).stat().st_size > 10_000
    assert "alpha" in capsys.readouterr().out
    # Errors: both sources, no source, a table without the columns.
    assert _cli(["scaling", "fit", str(tmp_path), "--table", str(table), "--out", str(out)]) == 2
    assert _cli(["scaling", "fit", "--out", str(out)]) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("params,loss\n1,2\n")
    assert _cli(["scaling", "fit", "--table", str(bad), "--out", str(out)]) == 2
    assert "samples" in capsys.readouterr().err


def _ladder_table(path, widths, datas, loss_of, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "params", "samples", "loss"])
        for i, n in enumerate(widths):
            for j, d in enumerate(datas):
                w.writerow([f"w{i}-d{j}", n, d, loss_of(n, d) * np.exp(rng.normal(0.0, noise))])
    return path


def test_forecast_of_a_held_out_run_from_a_ladder(tmp_path, capsys):
    """fit → forecast: a 4 × 3 ladder drawn from a known law (1 % scatter) forecasts a run at
    2× the widest model and 2× the longest training within its noise, inside the interval."""
    widths, datas = np.logspace(5, 6.5, 4), np.logspace(5, 6.5, 3)
    table = _ladder_table(tmp_path / "ladder.csv", widths, datas, TRUTH.loss)
    n, d = 2 * widths[-1], 2 * datas[-1]
    assert _cli(["scaling", "forecast", "--table", table, "--params", n, "--samples", d, "--bootstrap", 40,
                 "--json"]) == 0
    captured = capsys.readouterr()
    fc = json.loads(captured.out)
    assert "not monotone" not in captured.err
    truth = float(TRUTH.loss(n, d))
    lo, hi = fc["interval"]
    assert fc["loss"] == pytest.approx(truth, rel=0.03)
    assert lo < truth < hi and lo <= fc["loss"] <= hi and hi / lo < 1.3
    assert fc["params"] == n and fc["samples"] == d and fc["fit"]["n_points"] == 12
    # The human form names the numbers; bad arguments are one line, exit 2.
    assert _cli(["scaling", "forecast", "--table", table, "--params", n, "--samples", d, "--bootstrap", 8]) == 0
    assert "prediction interval" in capsys.readouterr().out
    assert _cli(["scaling", "forecast", "--table", table, "--params", -1, "--samples", d]) == 2
    assert "--params" in capsys.readouterr().err


def test_fit_warns_when_a_wider_model_ends_higher(tmp_path, capsys):
    """A ladder whose widest model has the highest loss at one data size (as an untuned rate
    gives): `scaling fit` and `scaling forecast` warn, naming the run and the best smaller run
    it lost to."""
    widths, datas = np.logspace(5, 6.5, 4), np.logspace(5, 6.5, 3)

    def bad(n, d):
        return TRUTH.loss(n, d) * (1.25 if (n == widths[-1] and d == datas[0]) else 1.0)

    table = _ladder_table(tmp_path / "bad.csv", widths, datas, bad, noise=0.0)
    assert _cli(["scaling", "fit", "--table", table, "--out", tmp_path / "fit", "--bootstrap", 4, "--no-plots"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "not monotone in width" in x]
    assert len(lines) == 1 and "w3-d0" in lines[0] and "smaller w2-d0" in lines[0], err
    assert json.loads((tmp_path / "fit" / "fit.json").read_text())["width_violations"] == [
        lines[0].split("not monotone in width: ")[1].split(" (an untuned")[0]]
    assert _cli(["scaling", "forecast", "--table", table, "--params", 1e7, "--samples", 1e7, "--bootstrap", 0]) == 0
    assert "w3-d0" in capsys.readouterr().err
    # Unit: equal data only; a tie is not a violation.
    rows = [{"run": "a", "params": 1.0, "samples": 10.0, "loss": 2.0}, {"run": "b", "params": 2.0, "samples": 10.0,
                                                                          "loss": 2.0},
            {"run": "c", "params": 4.0, "samples": 20.0, "loss": 3.0}]
    assert st.width_violations(st.points_of(rows)) == []
    rows[1]["loss"] = 2.1
    found = st.width_violations(st.points_of(rows))
    assert len(found) == 1 and found[0].startswith("at 10 samples, b")


def _fake_runs(root, widths, datas, loss_of, noise=0.01, seed=0):
    """Finished run folders (config.yaml, final.json, scaling.json) as `morpheus pretrain`
    leaves them, with losses drawn from a law: what `scaling fit RUNS_DIR` collects."""
    from morpheus_jax.core.config import load_config, save_config

    rng = np.random.default_rng(seed)
    cfg = load_config("demo", ["train.global_batch_size=1", f"data.dir={root}/no_dataset"])
    for i, n in enumerate(widths):
        for j, d in enumerate(datas):
            run = root / f"w{i}-d{j}"
            run.mkdir(parents=True)
            save_config(cfg, run / "config.yaml")
            (run / "final.json").write_text(json.dumps({"step": int(d), "val_loss": float(
                loss_of(n, d) * np.exp(rng.normal(0.0, noise)))}))
            (run / "scaling.json").write_text(json.dumps({"params": int(n), "params_without_group_mlps": int(n // 2),
                                                          "flops_per_step": 50.0 * n, "flops_per_sample": 50.0 * n}))
    return root


def test_forecast_scores_a_held_out_run(tmp_path, capsys):
    """`scaling forecast --held-out RUN`: the run (a folder inside the runs folder, or a row's
    name in a table) is left out of the fit, forecast from its own N and D, and scored; the
    result equals forecasting the same N, D from the ladder without it; --plot draws it."""
    widths, datas = np.logspace(5, 6.5, 4), np.logspace(5, 6.5, 3)
    runs = _fake_runs(tmp_path / "runs", widths, datas, TRUTH.loss)
    held_n, held_d = int(2 * widths[-1]), int(2 * datas[-1])
    _fake_runs(tmp_path / "held", [held_n], [held_d], TRUTH.loss, seed=1)
    (tmp_path / "held" / "w0-d0").rename(runs / "heldout")        # inside the runs folder: not fitted
    png = tmp_path / "fc.png"
    assert _cli(["scaling", "forecast", runs, "--held-out", runs / "heldout", "--bootstrap", 40, "--plot", png,
                 "--json"]) == 0
    fc = json.loads(capsys.readouterr().out)
    actual = json.loads((runs / "heldout" / "final.json").read_text())["val_loss"]
    assert fc["fit"]["n_points"] == 12 and fc["run"] == "heldout"
    assert (fc["params"], fc["samples"]) == (held_n, held_d)
    assert fc["actual"] == actual and fc["error"] == pytest.approx(actual / fc["loss"] - 1, abs=1e-12)
    assert abs(fc["error"]) < 0.05 and fc["inside_interval"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    shutil.move(runs / "heldout", tmp_path / "heldout")
    assert _cli(["scaling", "forecast", runs, "--params", held_n, "--samples", held_d, "--bootstrap", 40,
                 "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["loss"] == fc["loss"] and plain["interval"] == fc["interval"]
    # A table: the held-out run by name; the human form reports it.
    rows = [{"run": f"w{i}-d{j}", "params": n, "samples": d, "loss": float(TRUTH.loss(n, d))}
            for i, n in enumerate(widths) for j, d in enumerate(datas)]
    table = tmp_path / "t.csv"
    sw.write_table(rows + [{"run": "big", "params": held_n, "samples": held_d, "loss": actual}], table)
    assert _cli(["scaling", "forecast", "--table", table, "--held-out", "big", "--bootstrap", 8]) == 0
    out = capsys.readouterr().out
    assert "held-out run big: loss" in out and "from the forecast" in out and "on 12 points (12 runs)" in out
    # Bad combinations: one line each, exit 2.
    for argv, needle in ((["--held-out", "nope"], "nope"), (["--held-out", "big", "--params", 1e6], "leave out"),
                         ([], "--held-out")):
        assert _cli(["scaling", "forecast", "--table", table, "--bootstrap", 0] + argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_fit_warns_when_runs_repeat_their_data(tmp_path, capsys):
    """Runs that see their patients more than 4 times are named (the law counts fresh
    samples); rows without a patient count (a table) are not judged."""
    rows = [{"run": "short", "params": 1e5, "samples": 400.0, "loss": 1.0, "U": 100},
            {"run": "long", "params": 1e5, "samples": 401.0, "loss": 0.9, "U": 100},
            {"run": "table", "params": 1e5, "samples": 1e6, "loss": 0.8}]
    pts = st.points_of(rows)
    assert st.repeated_data(pts) == ["long trained on 401 samples of 100 patients (4.01 epochs, more than 4)"]
    assert st.repeated_data(pts, max_epochs=10) == []
    # Through the CLI (the plain law asked for; a table written before U calls it patients).
    widths, datas = np.logspace(5, 6.5, 3), np.logspace(5, 6.5, 2)
    table = tmp_path / "t.csv"
    sw.write_table([{"run": f"w{i}-d{j}", "params": n, "samples": d, "loss": float(TRUTH.loss(n, d)),
                     "patients": d / 5 if (i, j) == (1, 1) else d}
                    for i, n in enumerate(widths) for j, d in enumerate(datas)], table)
    assert _cli(["scaling", "fit", "--table", table, "--out", tmp_path / "fit", "--bootstrap", 0, "--no-plots",
                 "--plain"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "repeated data" in x]
    assert len(lines) == 1 and "w1-d1 trained on" in lines[0] and "(5 epochs" in lines[0], lines
    assert json.loads((tmp_path / "fit" / "fit.json").read_text())["repeated_data"] == [
        lines[0].split("repeated data: ")[1].split("; the plain law")[0]]
