"""Fitting ``L(N, D) = E + A/N^α + B/D^β`` and the compute-optimal frontier.

Chinchilla's third approach (Hoffmann et al. 2022, §3.3): with ``A = e^a, B = e^b,
E = e^e`` the model is ``log L̂ = LSE(a − α log N, b − β log D, e)``; the parameters
minimise the Huber loss (δ = 1e-3) of the log residuals ``log L̂ − log L``, by L-BFGS-B
from the best points of a grid of initialisations. Confidence intervals: percentiles of
the parameters refitted on bootstrap resamples of the rows.

Compute: ``C = k · N^γ · D`` FLOPs for N parameters and D training samples. ``k = 6,
γ = 1`` is the transformer rule of thumb (``C = 6ND``); from a sweep, ``k, γ`` are a
least-squares fit of ``log(FLOPs per sample) = log k + γ log N`` over the runs' analytic
training FLOPs (MORPHEUS spends few FLOPs per parameter in its per-group MLPs and many in
its WSI tokenizer, so 6 is far off). Minimising L on ``C = k N^γ D`` gives

    N_opt = G · (C/k)^(β/(α+γβ)),   G = (αA / (γβB))^(1/(α+γβ)),   D_opt = C / (k N_opt^γ)

which for γ = 1 is ``N_opt = G (C/k)^(β/(α+β))``, ``D_opt = G⁻¹ (C/k)^(α/(α+β))``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import numbers

import numpy as np
from scipy import optimize
from scipy.special import logsumexp

from morpheus_jax.core.errors import InputError

HUBER_DELTA = 1e-3
# Epochs over the training patients past which a run is reported as repeating its data (repeated_data).
MAX_EPOCHS = 4.0
# Chinchilla's grid of initialisations.
GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 1.01, 0.5),
        "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}
# θ = (a, b, e, alpha, beta)
_BOUNDS = [(-50.0, 100.0), (-50.0, 100.0), (-50.0, 20.0), (0.0, 5.0), (0.0, 5.0)]


@dataclasses.dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_theta(cls, theta) -> "Law":
        a, b, e, alpha, beta = (float(x) for x in theta)
        return cls(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


@dataclasses.dataclass(frozen=True)
class ComputeRelation:
    """``C = k · N^γ · D``."""

    k: float = 6.0
    gamma: float = 1.0
    source: str = "6ND"

    def compute(self, n, d):
        return self.k * np.asarray(n, float) ** self.gamma * np.asarray(d, float)

    def as_dict(self) -> dict:
        return {"form": "C = k * N^gamma * D", "k": self.k, "gamma": self.gamma, "source": self.source}


def measured_relation(params, flops_per_sample) -> ComputeRelation:
    """Least-squares ``log(FLOPs/sample) = log k + γ log N`` (γ = 1 when N takes one value)."""
    x, y = np.log(np.asarray(params, float)), np.log(np.asarray(flops_per_sample, float))
    if np.ptp(x) < 1e-9:
        return ComputeRelation(float(np.exp(np.mean(y - x))), 1.0, "measured (one model size: gamma = 1)")
    gamma, logk = np.polyfit(x, y, 1)
    return ComputeRelation(float(np.exp(logk)), float(gamma), "measured (analytic FLOPs of the runs)")


def single_threaded_blas():
    """L-BFGS-B calls BLAS on 5-vectors; a multi-threaded BLAS on a busy machine makes each
    call ~100× slower. Limits BLAS to one thread when threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits  # lazy: start-up time
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


# -- the objective ---------------------------------------------------------------------------------------

def _objective(theta, log_n, log_d, log_l, delta):
    """Σ Huber_δ(log L̂ − log L) / δ and its gradient (divided by δ: same optimum, O(1) scale)."""
    a, b, e, alpha, beta = theta
    t0, t1 = a - alpha * log_n, b - beta * log_d
    m = np.maximum(np.maximum(t0, t1), e)
    w0, w1, w2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    s = w0 + w1 + w2
    r = m + np.log(s) - log_l
    absr = np.abs(r)
    value = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum() / delta
    dr = np.clip(r, -delta, delta) / (delta * s)     # Huber' times the softmax normaliser
    g0, g1 = dr * w0, dr * w1
    grad = np.array([g0.sum(), g1.sum(), (dr * w2).sum(), -(g0 * log_n).sum(), -(g1 * log_d).sum()])
    return value, grad


def _grid_values(log_n, log_d, log_l, delta) -> tuple[np.ndarray, np.ndarray]:
    """All grid initialisations θ ``[K, 5]`` and their objective values ``[K]``."""
    thetas = np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])))
    a, b, e, alpha, beta = (thetas[:, i: i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n[None], b - beta * log_d[None], np.broadcast_to(e, (len(thetas), len(log_n)))])
    r = logsumexp(terms, axis=0) - log_l[None]
    absr = np.abs(r)
    values = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum(1) / delta
    return thetas, values


def fit_law(params, samples, loss, *, delta: float = HUBER_DELTA, starts: int = 16,
            extra_starts=()) -> tuple[Law, float]:
    """Best law and its objective: L-BFGS-B from the ``starts`` best grid points (and ``extra_starts``)."""
    log_n, log_d, log_l = (np.log(np.asarray(x, float)) for x in (params, samples, loss))
    if len(log_l) < 5:
        raise InputError(f"fitting 5 parameters needs at least 5 runs (finished runs or table rows), got {len(log_l)}")
    thetas, values = _grid_values(log_n, log_d, log_l, delta)
    inits = list(thetas[np.argsort(values, kind="stable")[:starts]]) + [np.asarray(t, float) for t in extra_starts]
    best, best_value = None, np.inf
    for theta0 in inits:
        res = optimize.minimize(_objective, theta0, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                                bounds=_BOUNDS, options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9})
        if res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    return Law.from_theta(best), best_value


def _theta(law: Law) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def bootstrap(params, samples, loss, law: Law, *, n: int = 200, seed: int = 0, delta: float = HUBER_DELTA,
              starts: int = 2) -> list[Law]:
    """Laws refitted on ``n`` resamples of the rows (with replacement), each started from the
    full fit and its resample's best ``starts`` grid points."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(x, float) for x in (params, samples, loss)]
    out = []
    for _ in range(n):
        idx = rng.integers(len(arrays[0]), size=len(arrays[0]))
        out.append(fit_law(*(x[idx] for x in arrays), delta=delta, starts=starts, extra_starts=[_theta(law)])[0])
    return out


# -- the compute-optimal frontier ------------------------------------------------------------------------

def optimal_allocation(law: Law, compute, relation: ComputeRelation = ComputeRelation()):
    """``(N_opt, D_opt)`` minimising ``L(N, D)`` subject to ``C = k N^γ D`` (closed form)."""
    c = np.asarray(compute, float) / relation.k
    g, a, b = relation.gamma, law.alpha, law.beta
    big_g = (a * law.A / (g * b * law.B)) ** (1.0 / (a + g * b))
    n_opt = big_g * c ** (b / (a + g * b))
    d_opt = c / n_opt ** g
    return n_opt, d_opt


def frontier(law: Law, budgets, relation: ComputeRelation, boot: list[Law] = (), confidence: float = 0.95) -> list[dict]:
    """Optimal N, D and loss at each compute budget (with bootstrap intervals)."""
    budgets = np.asarray(budgets, float)
    n_opt, d_opt = optimal_allocation(law, budgets, relation)
    rows = [{"compute": float(c), "params": float(n), "samples": float(d), "loss": float(law.loss(n, d))}
            for c, n, d in zip(budgets, n_opt, d_opt)]
    if boot:
        q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
        alloc = [optimal_allocation(b, budgets, relation) for b in boot]
        ns = np.stack([x[0] for x in alloc])
        ds = np.stack([x[1] for x in alloc])
        for i, row in enumerate(rows):
            row["params_ci"] = [float(v) for v in np.percentile(ns[:, i], q)]
            row["samples_ci"] = [float(v) for v in np.percentile(ds[:, i], q)]
    return rows


def intervals(boot: list[Law], confidence: float = 0.95) -> dict[str, list[float]]:
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    return {k: [float(v) for v in np.percentile([getattr(b, k) for b in boot], q)]
            for k in ("E", "A", "B", "alpha", "beta")}


def fit_table(rows: list[dict], *, params_column: str = "params", n_boot: int = 200, seed: int = 0,
              confidence: float = 0.95, relation: ComputeRelation | None = None) -> tuple[dict, list[Law]]:
    """The whole fit of a scaling table: (report for fit.json, bootstrap laws). The report
    holds the law, its intervals, the compute relation and the frontier.

    ``relation`` None: measured from a ``flops`` column when every row has one, else 6ND."""
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence (--confidence) must be in (0, 1), e.g. 0.95, got {confidence}")
    for i, r in enumerate(rows):
        for k in (params_column, "samples", "loss"):
            v = r.get(k)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or v <= 0:
                run = f" (run {r['run']})" if r.get("run") else ""
                raise InputError(f"row {i + 1}{run}: {k} must be a positive number, got {v!r}")
    n = np.array([r[params_column] for r in rows], float)
    d = np.array([r["samples"] for r in rows], float)
    loss = np.array([r["loss"] for r in rows], float)
    with single_threaded_blas():
        law, objective = fit_law(n, d, loss)
        boot = bootstrap(n, d, loss, law, n=n_boot, seed=seed) if n_boot > 0 else []
    if relation is None:
        if all(r.get("flops") for r in rows):
            fps = np.array([r["flops"] for r in rows], float) / d
            relation = measured_relation(n, fps)
        else:
            relation = ComputeRelation()
    compute = np.array([r["flops"] for r in rows], float) if all(r.get("flops") for r in rows) \
        else relation.compute(n, d)
    lo, hi = np.log10(compute.min()) - 1, np.log10(compute.max()) + 2
    budgets = np.logspace(lo, hi, 13)
    out = {**law.as_dict(), "intervals": intervals(boot, confidence) if boot else {},
           "confidence": confidence, "bootstrap_samples": len(boot), "huber_delta": HUBER_DELTA,
           "objective": objective, "n_points": len(rows), "params_column": params_column,
           "compute_relation": relation.as_dict(),
           "optimal_exponents": {"params": law.beta / (law.alpha + relation.gamma * law.beta),
                                 "samples": 1 - relation.gamma * law.beta / (law.alpha + relation.gamma * law.beta)},
           "frontier": frontier(law, budgets, relation, boot, confidence),
           "residuals_log": [float(x) for x in np.log(loss) - np.log(law.loss(n, d))],
           "residual_rms_log": float(np.sqrt(np.mean((np.log(law.loss(n, d)) - np.log(loss)) ** 2))),
           "width_violations": width_violations(rows, params_column),
           "repeated_data": repeated_data(rows)}
    return out, boot


# -- checks and forecasts ------------------------------------------------------------------------------

def _name(row: dict, i: int) -> str:
    return str(row.get("run") or f"row {i + 1}")


def width_violations(rows: list[dict], params_column: str = "params", rtol: float = 1e-9) -> list[str]:
    """At equal data (equal ``samples``), runs whose model is larger than another's but whose
    final loss is higher: one line per such run, naming it and the smaller run it lost to (the
    smaller run with the lowest loss). A sign of a learning rate tuned for one width only, or of
    runs stopped before they converged; a law fitted through them extrapolates badly."""
    groups: dict[float, list[int]] = {}
    for i, r in enumerate(rows):
        key = next((k for k in groups if abs(k - r["samples"]) <= rtol * max(k, 1.0)), r["samples"])
        groups.setdefault(key, []).append(i)
    out = []
    for d, idx in sorted(groups.items()):
        idx = sorted(idx, key=lambda i: rows[i][params_column])
        for pos, j in enumerate(idx):
            smaller = [i for i in idx[:pos] if rows[i][params_column] < rows[j][params_column]]
            if not smaller:
                continue
            best = min(smaller, key=lambda i: rows[i]["loss"])
            if rows[j]["loss"] > rows[best]["loss"]:
                out.append(f"at {d:.6g} samples, {_name(rows[j], j)} ({rows[j][params_column]:.4g} params) ends at "
                           f"loss {rows[j]['loss']:.4g}, above the smaller {_name(rows[best], best)} "
                           f"({rows[best][params_column]:.4g} params, loss {rows[best]['loss']:.4g})")
    return out


def repeated_data(rows: list[dict], max_epochs: float = MAX_EPOCHS) -> list[str]:
    """Runs that saw their training patients more than ``max_epochs`` times (rows with a
    ``patients`` column: collected runs): one line each. ``L(N, D)`` counts D as fresh
    samples; past a few epochs a repeated sample is worth less than a new one (Muennighoff et
    al. 2023 find ~4 epochs nearly as good as fresh data), and a wide model memorises its
    patients, so a law fitted through such runs measures the cohort, not the model."""
    out = []
    for i, r in enumerate(rows):
        patients = r.get("patients")
        if isinstance(patients, numbers.Real) and patients > 0 and r["samples"] / patients > max_epochs:
            out.append(f"{_name(r, i)} trained on {r['samples']:.6g} samples of {int(patients)} patients "
                       f"({r['samples'] / patients:.3g} epochs, more than {max_epochs:g})")
    return out


def forecast(law: Law, boot: list[Law], params: float, samples: float, residuals, *,
             confidence: float = 0.95, seed: int = 0) -> dict:
    """The law's loss at ``(params, samples)`` with a prediction interval: percentiles over
    the bootstrap laws of their prediction times ``exp(ε)``, ε drawn from the fit's log
    residuals (the runs' own scatter around the law, so a single new run, not only the mean
    law, should fall inside)."""
    if not (np.isfinite(params) and params > 0 and np.isfinite(samples) and samples > 0):
        raise InputError(f"--params and --samples must be positive numbers, got {params!r} and {samples!r}")
    point = float(law.loss(params, samples))
    out = {"params": float(params), "samples": float(samples), "loss": point, "confidence": confidence}
    if boot:
        rng = np.random.default_rng(seed)
        preds = np.array([b.loss(params, samples) for b in boot], float)
        eps = rng.choice(np.asarray(residuals, float), size=preds.size) if len(residuals) else 0.0
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
