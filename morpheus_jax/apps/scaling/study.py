"""A scaling study's fit: its points (seeds averaged), the law (plain or data-constrained), the
bootstrap, checks, forecasts and plans. `morpheus scaling fit / forecast / plan` call this.

A *point* is one ``(N, D, U)`` of the table; its runs differ only by seed. The fit goes
through the points' mean losses; a bootstrap resample redraws the points and, within each,
its seeds, so the between-seed spread widens every interval. A forecast of a single run adds
the pooled between-seed scatter on top of the fit's residuals.

The law: ``plain`` is ``L(N, D)`` (`fit`); ``data-constrained`` counts repeated samples as
worth less (`constrained`). ``auto`` takes the data-constrained law when some run passes over
its ``U`` unique samples more than `constrained.REPEATED_EPOCHS` times and every run knows
its ``U``; plain otherwise.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np
from scipy import optimize

from morpheus_jax.apps.scaling import constrained as cs
from morpheus_jax.apps.scaling import fit as ft
from morpheus_jax.core.errors import InputError

KINDS = ("auto", "plain", "data-constrained")


@dataclasses.dataclass
class Point:
    params: float
    samples: float
    unique: float | None
    losses: list[float]
    runs: list[str]
    flops: float | None = None
    hidden_size: float | None = None

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses))

    @property
    def variance(self) -> float | None:
        """Between-seed variance of one run's loss (None with one seed)."""
        return float(np.var(self.losses, ddof=1)) if len(self.losses) > 1 else None


def _number(v) -> float | None:
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) and v > 0 else None


def points_of(rows: list[dict], params_column: str = "params") -> list[Point]:
    """The table's points: rows with equal N, D and U (seeds of one run) merged, in table order."""
    for i, r in enumerate(rows):
        for k in (params_column, "samples", "loss"):
            if _number(r.get(k)) is None:
                run = f" (run {r['run']})" if r.get("run") else ""
                raise InputError(f"row {i + 1}{run}: {k} must be a positive number, got {r.get(k)!r}")
    out: dict[tuple, Point] = {}
    for i, r in enumerate(rows):
        u = _number(r.get("U"))
        key = (float(r[params_column]), float(r["samples"]), u)
        p = out.setdefault(key, Point(*key, [], [], _number(r.get("flops")), _number(r.get("hidden_size"))))
        p.losses.append(float(r["loss"]))
        p.runs.append(str(r.get("run") or f"row {i + 1}"))
    return list(out.values())


def pooled_variance(points: list[Point]) -> float | None:
    """One run's between-seed loss variance pooled over the points with several seeds."""
    multi = [p for p in points if len(p.losses) > 1]
    if not multi:
        return None
    dof = sum(len(p.losses) - 1 for p in multi)
    return float(sum(p.variance * (len(p.losses) - 1) for p in multi) / dof)


def pooled_log_sd(points: list[Point]) -> float:
    """The between-seed scatter of one run's log loss (0 with one seed per point)."""
    multi = [p for p in points if len(p.losses) > 1]
    if not multi:
        return 0.0
    dev = [x - np.mean(np.log(p.losses)) for p in multi for x in np.log(p.losses)]
    return float(np.sqrt(np.sum(np.square(dev)) / sum(len(p.losses) - 1 for p in multi)))


def choose_kind(points: list[Point], requested: str = "auto") -> tuple[str, str]:
    """The law to fit and why (one line)."""
    if requested not in KINDS:
        raise InputError(f"law must be one of {KINDS}, got {requested!r}")
    missing = [p.runs[0] for p in points if p.unique is None]
    epochs = max((p.samples / p.unique for p in points if p.unique), default=0.0)
    if requested == "data-constrained":
        if missing:
            raise InputError(f"the data-constrained law needs U (unique pretraining patients) of every run; "
                             f"{', '.join(missing[:3])} has none (a table needs a U column; a run folder needs "
                             f"its dataset at data.dir)")
        return requested, "asked for (--data-constrained)"
    if requested == "plain":
        return requested, "asked for (--plain)"
    if missing or epochs <= cs.REPEATED_EPOCHS:
        why = "some runs have no U" if missing else f"every run is within {cs.REPEATED_EPOCHS:g} epochs of its data"
        return "plain", why
    return "data-constrained", f"runs repeat their data up to {epochs:.3g} epochs (U known for every run)"


@dataclasses.dataclass
class Study:
    kind: str
    law: ft.Law | cs.ConstrainedLaw
    boot: list
    relation: ft.ComputeRelation
    points: list[Point]
    objective: float
    note: dict

    def predict(self, params, samples, unique=None, law=None):
        law = law or self.law
        if isinstance(law, cs.ConstrainedLaw):
            if unique is None:
                raise InputError("the data-constrained law forecasts at a cohort size: give U (--patients)")
            return law.loss(params, samples, unique)
        return law.loss(params, samples)

    def residuals_log(self) -> np.ndarray:
        p = self.points
        pred = self.predict([x.params for x in p], [x.samples for x in p], [x.unique or 1.0 for x in p])
        return np.log([x.loss for x in p]) - np.log(pred)


def _relation(points: list[Point], relation: ft.ComputeRelation | None) -> ft.ComputeRelation:
    if relation is not None:
        return relation
    if all(p.flops for p in points):
        return ft.measured_relation([p.params for p in points], [p.flops / p.samples for p in points])
    return ft.ComputeRelation()


def _bootstrap(points: list[Point], refit, n: int, seed: int) -> list:
    """``refit(idx, losses)`` on ``n`` resamples: points with replacement, each point's seeds too."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.integers(len(points), size=len(points))
        losses = np.array([np.mean(rng.choice(points[i].losses, size=len(points[i].losses))) for i in idx])
        out.append(refit(idx, losses))
    return out


def fit_study(rows: list[dict], *, kind: str = "auto", params_column: str = "params", n_boot: int = 200,
              seed: int = 0, confidence: float = 0.95, relation: ft.ComputeRelation | None = None) -> Study:
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence (--confidence) must be in (0, 1), e.g. 0.95, got {confidence}")
    pts = points_of(rows, params_column)
    kind, why = choose_kind(pts, kind)
    relation = _relation(pts, relation)
    n, d, loss = (np.array([getattr(p, k) for p in pts], float) for k in ("params", "samples", "loss"))
    note = {"law": kind, "law_reason": why}
    with ft.single_threaded_blas():
        if kind == "plain":
            law, objective = ft.fit_law(n, d, loss)
            start = ft._theta(law)
            boot = _bootstrap(pts, lambda i, y: ft.fit_law(n[i], d[i], y, starts=2, extra_starts=[start])[0],
                              n_boot, seed)
        else:
            u = np.array([p.unique for p in pts], float)
            law, objective, boot, note["r_star_n_note"] = _fit_constrained(pts, n, d, u, loss, relation.gamma,
                                                                        n_boot, seed, confidence)
    return Study(kind, law, boot, relation, pts, objective, note)


def _fit_constrained(pts, n, d, u, loss, gamma, n_boot, seed, confidence):
    """R*_D always; R*_N as well when the ladder pins it (`constrained.pins_params`)."""
    def boot_of(law):
        start = cs._theta(law)
        return _bootstrap(pts, lambda i, y: cs.fit_constrained(n[i], d[i], u[i], y, with_params=law.r_star_n
                                                               is not None, gamma=gamma, starts=[start])[0],
                          n_boot, seed)

    law, objective = cs.fit_constrained(n, d, u, loss, gamma=gamma)
    if len(n) < 7:
        return law, objective, boot_of(law), f"R*_N not fitted: 7 points needed, the study has {len(n)}"
    with_n, objective_n = cs.fit_constrained(n, d, u, loss, gamma=gamma, with_params=True)
    past = np.unique(n[n > with_n.unique_params(u)])
    if len(past) < 2 or n_boot < 2:
        reason = ("needs a bootstrap (--bootstrap > 1)" if len(past) >= 2 else
                  f"{len(past)} model size(s) past U_N (the compute-optimal size for the cohort); R*_N needs 2")
        return law, objective, boot_of(law), f"R*_N not fitted: {reason}"
    boot_n = boot_of(with_n)
    reason = cs.pins_params(with_n, n, u, boot_n, confidence)
    if reason is None:
        return with_n, objective_n, boot_n, "R*_N fitted: the ladder pins it"
    return law, objective, boot_of(law), f"R*_N not fitted: {reason}"


def report(study: Study, rows: list[dict], params_column: str = "params", confidence: float = 0.95) -> dict:
    """fit.json: the law, its intervals, the compute relation, the frontier, residuals and checks."""
    law, pts, rel = study.law, study.points, study.relation
    keys = [k for k in ("E", "A", "B", "alpha", "beta", "r_star_d", "r_star_n") if getattr(law, k, None) is not None]
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    ints = {k: [float(v) for v in np.percentile([getattr(b, k) for b in study.boot], q)]
            for k in keys} if study.boot else {}
    res = study.residuals_log()
    uniques = sorted({p.unique for p in pts if p.unique})
    compute = np.array([p.flops or rel.compute(p.params, p.samples) for p in pts], float)
    budgets = np.logspace(np.log10(compute.min()) - 1, np.log10(compute.max()) + 2, 13)
    if study.kind == "plain":
        front = ft.frontier(law, budgets, rel, study.boot, confidence)
    else:   # at the cohort's U (the most common one)
        u = max(uniques, key=lambda x: sum(p.unique == x for p in pts))
        front = [{"U": u, **plan(study, u, c, confidence=confidence, bootstrap=False)} for c in budgets]
    out = {"law": study.kind, "law_reason": study.note["law_reason"], **{k: getattr(law, k) for k in keys},
           "intervals": ints, "confidence": confidence, "bootstrap_samples": len(study.boot),
           "huber_delta": ft.HUBER_DELTA, "objective": study.objective, "n_points": len(pts), "n_runs": len(rows),
           "params_column": params_column, "compute_relation": rel.as_dict(), "frontier": front,
           "residuals_log": [float(x) for x in res], "residual_rms_log": float(np.sqrt(np.mean(res ** 2))),
           "seed_log_sd": pooled_log_sd(pts), "U": uniques, "ladder_epochs": ladder_epochs(pts),
           "width_violations": width_violations(pts), "repeated_data": repeated_data(pts) if study.kind == "plain"
           else [], "widths": widths(pts),
           "bootstrap_laws": [dataclasses.asdict(b) for b in study.boot]}
    if study.kind == "plain":
        out["optimal_exponents"] = {"params": law.beta / (law.alpha + rel.gamma * law.beta),
                                    "samples": 1 - rel.gamma * law.beta / (law.alpha + rel.gamma * law.beta)}
    else:
        out["r_star_n_note"] = study.note["r_star_n_note"]
    return out


def widths(points: list[Point]) -> list[list[float]]:
    """``[hidden size, params]`` of each model size of the study (for `plan`'s width)."""
    seen = {}
    for p in points:
        if p.hidden_size:
            seen.setdefault(p.hidden_size, p.params)
    return [[h, n] for h, n in sorted(seen.items())]


# -- checks ------------------------------------------------------------------------------------------------

def width_violations(points: list[Point], rtol: float = 1e-9) -> list[str]:
    """At equal data (equal ``samples``), points whose model is larger than another's but whose
    mean loss is higher by more than twice the standard error of the difference (the seeds'
    spread; 0 with one seed per point): one line per such point, naming it and the smaller
    point it lost to. A sign of a learning rate tuned for one width only, or of runs stopped
    before they converged; a law fitted through them extrapolates badly."""
    pooled = pooled_variance(points)
    groups: dict[float, list[Point]] = {}
    for p in points:
        key = next((k for k in groups if abs(k - p.samples) <= rtol * max(k, 1.0)), p.samples)
        groups.setdefault(key, []).append(p)
    out = []
    for d, group in sorted(groups.items()):
        group = sorted(group, key=lambda p: p.params)
        for pos, p in enumerate(group):
            smaller = [s for s in group[:pos] if s.params < p.params]
            if not smaller:
                continue
            best = min(smaller, key=lambda s: s.loss)
            se = [((x.variance if x.variance is not None else pooled) or 0.0) / len(x.losses) for x in (p, best)]
            margin = 2.0 * float(np.sqrt(sum(se)))
            if p.loss > best.loss + margin:
                spread = f", more than twice the seeds' standard error {margin / 2:.3g}" if margin else ""
                out.append(f"at {d:.6g} samples, {p.runs[0]} ({p.params:.4g} params) ends at loss {p.loss:.4g}, "
                           f"above the smaller {best.runs[0]} ({best.params:.4g} params, loss {best.loss:.4g})"
                           + spread)
    return out


def repeated_data(points: list[Point], max_epochs: float = ft.MAX_EPOCHS) -> list[str]:
    """Points that saw their training patients more than ``max_epochs`` times: one line each.
    The plain ``L(N, D)`` counts D as fresh samples; past a few epochs a repeated sample is
    worth less than a new one (Muennighoff et al. 2023), which the data-constrained law
    (``--data-constrained``) measures."""
    return [f"{p.runs[0]} trained on {p.samples:.6g} samples of {int(p.unique)} patients "
            f"({p.samples / p.unique:.3g} epochs, more than {max_epochs:g})"
            for p in points if p.unique and p.samples / p.unique > max_epochs]


def ladder_epochs(points: list[Point]) -> float | None:
    """The most passes any point made over its unique samples (None without U)."""
    return max((p.samples / p.unique for p in points if p.unique), default=None)


def past_the_ladder(kind: str, epochs: float | None, longest: float | None, r_star_ci=None) -> str | None:
    """One line when a data-constrained forecast or plan reaches past the ladder's longest run.
    The law is monotone in D: it describes repeated epochs whose value decays, not a validation
    loss that rises as a model overfits its cohort, so past the ladder it is a lower bound
    (README "Scaling on a fixed cohort")."""
    if kind != "data-constrained" or not epochs or not longest or epochs <= longest * (1 + 1e-9):
        return None
    line = (f"{epochs:.4g} epochs is past the ladder's longest run ({longest:.4g} epochs): the law cannot show a "
            "loss that rises as a model overfits its cohort, so read the forecast as a lower bound and check "
            "it with one run at that length")
    if r_star_ci and r_star_ci[1] >= np.exp(cs.RHO_BOUNDS[1]) * (1 - 1e-6):
        line += (f"; R*_D is not pinned (its interval [{r_star_ci[0]:.3g}, {r_star_ci[1]:.3g}] reaches the "
                 "bound: the ladder shows no loss of value from repetition)")
    return line


# -- forecasts and plans -------------------------------------------------------------------------------------

def forecast(study: Study, params: float, samples: float, unique: float | None = None, *,
             confidence: float = 0.95, seed: int = 0) -> dict:
    """The law's loss at ``(params, samples[, unique])`` with a prediction interval:
    percentiles over the bootstrap laws of their prediction times ``exp(ε)``, ε a draw from
    the fit's log residuals plus the between-seed scatter of one run."""
    for name, v in (("--params", params), ("--samples", samples)) + ((("--patients", unique),) if unique else ()):
        if not (np.isfinite(v) and v > 0):
            raise InputError(f"{name} must be a positive number, got {v!r}")
    point = float(study.predict(params, samples, unique))
    out = {"params": float(params), "samples": float(samples), "loss": point, "confidence": confidence,
           "law": study.kind}
    if unique:
        out.update(U=float(unique), epochs=float(samples) / float(unique))
    if study.boot:
        rng = np.random.default_rng(seed)
        preds = np.array([study.predict(params, samples, unique, law=b) for b in study.boot], float)
        res = study.residuals_log()
        eps = rng.choice(res, size=preds.size) if len(res) else np.zeros(preds.size)
        eps = eps + rng.normal(0.0, pooled_log_sd(study.points), size=preds.size)
        q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
        lo, hi = np.percentile(preds * np.exp(eps), q)
        out["interval"] = [float(min(lo, point)), float(max(hi, point))]
    return out


def score(fc: dict, actual: float) -> dict:
    """A forecast beside the run it forecast: the actual loss, the relative error
    ``actual / forecast - 1`` and whether the actual lies in the prediction interval."""
    out = {**fc, "actual": float(actual), "error": float(actual) / fc["loss"] - 1.0}
    if "interval" in fc:
        out["inside_interval"] = bool(fc["interval"][0] <= actual <= fc["interval"][1])
    return out


def _optimum(predict, unique: float, compute: float, relation: ft.ComputeRelation) -> tuple[float, float, float]:
    """``(N, D, loss)`` minimising ``predict(N, D = C / (k N^γ), U)``: a grid over log N, then Brent."""
    def f(log_n):
        n = np.exp(log_n)
        return np.log(predict(n, compute / (relation.k * n ** relation.gamma), unique))

    grid = np.linspace(np.log(1e2), np.log(compute / relation.k) / relation.gamma, 400)
    vals = np.array([f(x) for x in grid])
    i = int(np.nanargmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = optimize.minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
    n = float(np.exp(res.x))
    return n, compute / (relation.k * n ** relation.gamma), float(np.exp(res.fun))


def plan(study: Study, unique: float, compute: float, *, confidence: float = 0.95, bootstrap: bool = True) -> dict:
    """The model size and training length (epochs over ``unique`` patients) that minimise the
    forecast loss at ``compute`` FLOPs (``C = k N^γ D``), with bootstrap intervals."""
    for name, v in (("--patients", unique), ("--compute", compute)):
        if not (isinstance(v, numbers.Real) and np.isfinite(v) and v > 0):
            raise InputError(f"{name} must be a positive number, got {v!r}")
    n, d, loss = _optimum(lambda *a: study.predict(*a), unique, compute, study.relation)
    out = {"compute": float(compute), "params": n, "samples": d, "epochs": d / unique, "loss": loss}
    if bootstrap and study.boot:
        q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
        opt = np.array([_optimum(lambda *a, b=b: study.predict(*a, law=b), unique, compute, study.relation)
                        for b in study.boot])
        for j, k in enumerate(("params", "samples", "loss")):
            out[f"{k}_ci"] = [float(v) for v in np.percentile(opt[:, j], q)]
        out["epochs_ci"] = [x / unique for x in out["samples_ci"]]
    return out


def width_for(params: float, sizes: list[list[float]]) -> dict | None:
    """The hidden size of a model of ``params`` parameters in the study's family of shapes
    (params as a polynomial in the hidden size through the study's widths, degree ≤ 2)."""
    if len(sizes) < 2:
        return None
    h, n = np.array(sizes, float).T
    coef = np.polyfit(h, n, min(2, len(h) - 1))
    roots = np.roots(np.r_[coef[:-1], coef[-1] - params])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
    if not real:
        return None
    width = float(min(real))
    return {"hidden_size": width, "inside_ladder": bool(h.min() <= width <= h.max()),
            "ladder_hidden_sizes": [float(x) for x in h]}


def load_study(fit_dir) -> tuple[Study, dict]:
    """The study a ``fit.json`` (from `scaling fit --out DIR`) describes, for forecasts and
    plans without its runs (no points: no residuals)."""
    import json  # lazy: only plans read fits back
    from pathlib import Path

    from morpheus_jax.core.errors import MissingPath

    path = Path(fit_dir) / "fit.json"
    if not path.is_file():
        raise MissingPath(f"{path}: no fit here (write one with `morpheus scaling fit RUNS --out {fit_dir}`)")
    try:
        fit = json.loads(path.read_text())
        kind = fit.get("law", "plain")
        rel = ft.ComputeRelation(**{k: fit["compute_relation"][k] for k in ("k", "gamma", "source")})
        if kind == "plain":
            make = lambda d: ft.Law(**{k: d[k] for k in ("E", "A", "B", "alpha", "beta")})  # noqa: E731
        else:
            make = lambda d: cs.ConstrainedLaw(**{k: d.get(k) for k in (  # noqa: E731
                "E", "A", "B", "alpha", "beta", "r_star_d", "r_star_n")}, gamma=rel.gamma)
        law = make(fit)
        boot = [make(b) for b in fit.get("bootstrap_laws", [])]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a fit written by `morpheus scaling fit` ({type(e).__name__}: {e})") from None
    return Study(kind, law, boot, rel, [], float(fit.get("objective", 0.0)), {"law_reason": fit.get("law_reason")}), fit
