"""Scaling on a fixed cohort: the data-constrained law (Muennighoff et al. 2023) recovered from
a table drawn from a known one, `scaling plan` against a brute-force optimum, seeds averaged
with their spread in the intervals and the width check, and the CLI."""

import csv
import json

import numpy as np
import pytest
from scipy import optimize

from morpheus_jax.apps.scaling import constrained as cs
from morpheus_jax.apps.scaling import fit as ft
from morpheus_jax.apps.scaling import ladder as ld
from morpheus_jax.apps.scaling import study as st
from morpheus_jax.cli.main import main as cli_main

TRUTH = cs.ConstrainedLaw(E=0.6, A=30.0, B=60.0, alpha=0.35, beta=0.30, r_star_d=8.0)
U = 1000.0
WIDTHS = np.logspace(5, 6.5, 4)
EPOCHS = (1, 2, 4, 8, 16, 32)


def _cli(argv):
    try:
        return cli_main([str(a) for a in argv])
    except SystemExit as e:   # argparse
        return e.code


def ladder_rows(law=TRUTH, noise=0.005, seeds=1, seed=0):
    """An epochs ladder drawn from ``law``: 4 widths x 6 epoch counts over U patients."""
    rng = np.random.default_rng(seed)
    return [{"run": f"w{i}-ep{e}-s{s}", "params": float(n), "samples": U * e, "U": U, "seed": s,
             "hidden_size": 16.0 * 2 ** i, "loss": float(law.loss(n, U * e, U) * np.exp(rng.normal(0.0, noise)))}
            for i, n in enumerate(WIDTHS) for e in EPOCHS for s in range(seeds)]


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_effective_data_and_gradient():
    """D' is D up to U, then tends to U (1 + R*); the objective's gradient is the numerical one."""
    d = np.array([500.0, 1000.0, 2000.0, 1e9])
    np.testing.assert_allclose(cs.effective(d, U, 8.0), [500.0, 1000.0, 1000 * (1 + 8 * (1 - np.exp(-1 / 8))),
                                                         9000.0], rtol=1e-12)
    rng = np.random.default_rng(0)
    n, dd = np.repeat(WIDTHS, 6), np.tile(U * np.array(EPOCHS, float), 4)
    logs = (np.log(n), np.log(dd), np.log(np.full(n.shape, U)), np.log(1.0 + rng.random(n.size)))
    for theta in ([2.0, 3.0, -0.5, 0.3, 0.4, 2.0], [5.0, 3.0, -0.5, 0.4, 0.3, 1.0, 1.5]):
        theta = np.array(theta)
        value = lambda t: cs.objective(t, *logs, 0.1)[0]  # noqa: E731
        np.testing.assert_allclose(cs.objective(theta, *logs, 0.1)[1], optimize.approx_fprime(theta, value, 1e-7),
                                   atol=1e-4 * np.abs(optimize.approx_fprime(theta, value, 1e-7)).max())


def test_fit_recovers_a_known_r_star_within_its_interval():
    rows = ladder_rows()
    study = st.fit_study(rows, n_boot=30, seed=0)
    report = st.report(study, rows)
    assert study.kind == "data-constrained" and "32 epochs" in report["law_reason"]
    lo, hi = report["intervals"]["r_star_d"]
    assert lo <= TRUTH.r_star_d <= hi and hi / lo < 3, (lo, hi)
    assert study.law.r_star_d == pytest.approx(TRUTH.r_star_d, rel=0.25)
    assert report["U"] == [U] and report["widths"][0] == [16.0, WIDTHS[0]]
    # The plain law of the same runs misses a long run that the data-constrained law forecasts.
    plain = st.fit_study(rows, kind="plain", n_boot=0)
    long_run = float(TRUTH.loss(WIDTHS[-1], 128 * U, U))
    dc = st.forecast(study, WIDTHS[-1], 128 * U, U)
    assert abs(dc["loss"] / long_run - 1) < 0.02 < abs(plain.predict(WIDTHS[-1], 128 * U) / long_run - 1)
    assert dc["interval"][0] <= long_run <= dc["interval"][1] and dc["epochs"] == 128


def _brute_force(law, unique, compute, rel):
    log_n = np.linspace(np.log(1e2), np.log(compute / rel.k) / rel.gamma, 200_001)
    n = np.exp(log_n)
    d = compute / (rel.k * n ** rel.gamma)
    loss = law.loss(n, d, unique) if isinstance(law, cs.ConstrainedLaw) else law.loss(n, d)
    i = int(np.argmin(loss))
    return n[i], d[i], loss[i]


@pytest.mark.parametrize("compute", [1e12, 1e15])
def test_plan_returns_the_known_optimum(compute):
    rel = ft.ComputeRelation(20.0, 0.9, "test")
    study = st.Study("data-constrained", TRUTH, [], rel, [], 0.0, {})
    plan = st.plan(study, U, compute)
    n, d, loss = _brute_force(TRUTH, U, compute, rel)
    assert plan["params"] == pytest.approx(n, rel=1e-3) and plan["loss"] == pytest.approx(loss, rel=1e-9)
    assert plan["epochs"] == pytest.approx(d / U, rel=1e-3) and plan["samples"] == pytest.approx(d, rel=1e-3)
    # Plain law: the closed-form compute-optimal allocation.
    plain = st.Study("plain", TRUTH.base, [], rel, [], 0.0, {})
    n_opt, d_opt = ft.optimal_allocation(TRUTH.base, compute, rel)
    assert st.plan(plain, U, compute)["params"] == pytest.approx(float(n_opt), rel=1e-5)
    # A small cohort moves the optimum to a larger model trained for fewer epochs than the plain law's.
    assert plan["epochs"] < float(d_opt) / U


def test_width_for_inverts_the_ladder_family():
    sizes = [[h, 3.0 * h * h + 100.0 * h + 5000.0] for h in (16.0, 32.0, 64.0)]
    w = st.width_for(3.0 * 48 ** 2 + 100.0 * 48 + 5000.0, sizes)
    assert w["hidden_size"] == pytest.approx(48.0) and w["inside_ladder"]
    assert not st.width_for(3.0 * 500 ** 2 + 100.0 * 500 + 5000.0, sizes)["inside_ladder"]


def test_seeds_are_averaged_and_their_spread_widens_intervals():
    noisy = ladder_rows(noise=0.02, seeds=3, seed=1)
    pts = st.points_of(noisy)
    assert len(pts) == 24 and all(len(p.losses) == 3 for p in pts)
    assert st.pooled_log_sd(pts) == pytest.approx(0.02, rel=0.25)
    # The same means as one run each: the fit is the same, the intervals narrower.
    means = [{**{k: v for k, v in noisy[3 * i].items() if k != "seed"}, "loss": p.loss} for i, p in enumerate(pts)]
    assert st.pooled_log_sd(st.points_of(means)) == 0.0
    study, study_means = st.fit_study(noisy, n_boot=20), st.fit_study(means, n_boot=20)
    assert study.law.r_star_d == pytest.approx(study_means.law.r_star_d, rel=1e-6)
    fc, fc_means = (st.forecast(s, WIDTHS[-1], 64 * U, U) for s in (study, study_means))
    log_width = lambda fc: np.log(fc["interval"][1] / fc["interval"][0])  # noqa: E731
    assert log_width(fc) > 1.5 * log_width(fc_means)
    # The width check compares against the seeds' spread: a wider point 1 standard error above
    # a smaller one is not flagged; one far above it is.
    rows = [{"run": f"{name}-s{s}", "params": n, "samples": 10.0, "loss": base + dev, "seed": s}
            for name, n, base in (("small", 1.0, 2.0), ("wide", 2.0, 2.03))
            for s, dev in enumerate((-0.05, 0.0, 0.05))]
    assert st.width_violations(st.points_of(rows)) == []
    for r in rows:
        if r["run"].startswith("wide"):
            r["loss"] += 0.2
    (line,) = st.width_violations(st.points_of(rows))
    assert line.startswith("at 10 samples, wide-s0") and "standard error" in line


def test_fit_forecast_and_plan_commands(tmp_path, capsys):
    rows = ladder_rows()
    table = write_csv(rows, tmp_path / "epochs.csv")
    out = tmp_path / "fit"
    assert _cli(["scaling", "fit", "--table", table, "--out", out, "--bootstrap", 10, "--data-constrained"]) == 0
    printed = capsys.readouterr().out
    fit = json.loads((out / "fit.json").read_text())
    assert fit["law"] == "data-constrained" and "r_star_d" in fit["intervals"] and "r_star_d" in printed
    assert len(fit["bootstrap_laws"]) == 10 and fit["frontier"][0]["U"] == U
    assert (out / "loss_vs_epochs.png").read_bytes()[:4] == b"\x89PNG"
    assert fit["ladder_epochs"] == max(EPOCHS)
    assert _cli(["scaling", "plan", "--patients", 6400, "--compute", 1e14, "--fit", out, "--json"]) == 0
    shown = capsys.readouterr()
    plan = json.loads(shown.out)
    assert ("past the ladder" in shown.err) == (plan["epochs"] > max(EPOCHS))
    study, _ = st.load_study(out)
    n, d, _ = _brute_force(study.law, 6400.0, 1e14, study.relation)
    assert plan["params"] == pytest.approx(n, rel=1e-3) and plan["epochs"] == pytest.approx(d / 6400, rel=1e-3)
    assert plan["params_ci"][0] <= plan["params"] <= plan["params_ci"][1] and plan["width"]["hidden_size"] > 0
    # forecast: U from the table (one cohort), the held-out run by name, a plot.
    held = {"run": "long", "params": WIDTHS[-1], "samples": 128 * U, "U": U, "seed": 0, "hidden_size": 128.0,
            "loss": float(TRUTH.loss(WIDTHS[-1], 128 * U, U))}
    table2 = write_csv(rows + [held], tmp_path / "with_held.csv")
    assert _cli(["scaling", "forecast", "--table", table2, "--held-out", "long", "--bootstrap", 10, "--json",
                 "--plot", tmp_path / "fc.png"]) == 0
    shown = capsys.readouterr()
    fc = json.loads(shown.out)
    assert fc["law"] == "data-constrained" and fc["epochs"] == 128 and abs(fc["error"]) < 0.02
    assert "past the ladder: 128 epochs is past the ladder's longest run (32 epochs)" in shown.err
    assert fc["inside_interval"] and (tmp_path / "fc.png").stat().st_size > 10_000
    # One line, exit 2: the data-constrained law without U; plan without a fit; both laws asked.
    no_u = write_csv([{k: v for k, v in r.items() if k != "U"} for r in rows], tmp_path / "no_u.csv")
    for argv, needle in ((["scaling", "fit", "--table", no_u, "--out", out, "--data-constrained"], "needs U"),
                         (["scaling", "plan", "--patients", 10, "--compute", 1e9, "--fit", tmp_path], "no fit here"),
                         (["scaling", "plan", "--patients", -1, "--compute", 1e9, "--fit", out], "--patients"),
                         (["scaling", "fit", "--table", table, "--out", out, "--plain", "--data-constrained"],
                          "not allowed with")):
        assert _cli(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    # Without U the default is the plain law, as before.
    assert _cli(["scaling", "fit", "--table", no_u, "--out", tmp_path / "plain", "--bootstrap", 0, "--no-plots"]) == 0
    assert json.loads((tmp_path / "plain" / "fit.json").read_text())["law"] == "plain"


def test_a_forecast_past_the_ladder_says_so():
    assert st.past_the_ladder("data-constrained", 32.0, 32.0) is None
    assert st.past_the_ladder("plain", 128.0, 32.0) is None
    line = st.past_the_ladder("data-constrained", 128.0, 32.0, [10.6, 25.0])
    assert line.startswith("128 epochs is past the ladder's longest run (32 epochs)") and "R*_D" not in line
    line = st.past_the_ladder("data-constrained", 128.0, 32.0, [30.3, 1e4])
    assert "R*_D is not pinned (its interval [30.3, 1e+04] reaches the bound" in line


def test_ladder_seeds_expand_each_point(tmp_path):
    path = tmp_path / "l.yaml"
    path.write_text("name: s\nbase: demo\nseeds: 2\naxes:\n  train.epochs: [1, 2]\n")
    runs = ld.expand(ld.load_ladder(path))
    assert [r.name for r in runs] == ["ep1-seed1999", "ep1-seed2000", "ep2-seed1999", "ep2-seed2000"]
    assert [r.overrides["seed"] for r in runs] == [1999, 2000, 1999, 2000]
    assert [r.name for r in ld.expand(ld.load_ladder(path, seeds=1))] == ["ep1", "ep2"]
    with pytest.raises(Exception, match="positive integer"):
        ld.load_ladder(path, seeds=0)
