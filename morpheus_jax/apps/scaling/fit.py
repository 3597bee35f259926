"""Fitting ``L(N, D) = E + A/N^α + B/D^β`` and the compute-optimal frontier.

Chinchilla's third approach (Hoffmann et al. 2022, §3.3): with ``A = e^a, B = e^b,
E = e^e`` the model is ``log L̂ = LSE(a − α log N, b − β log D, e)``; the parameters
minimise the Huber loss (δ = 1e-3) of the log residuals ``log L̂ − log L``, by L-BFGS-B
from the best points of a grid of initialisations (confidence intervals, checks and
forecasts of a study: `study`; the data-constrained law: `constrained`).

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

def huber_of_lse(t0, t1, e, log_l, delta):
    """``Σ Huber_δ(r) / δ`` of the log residuals ``r = LSE(t0, t1, e) − log L``, and ``Huber'_δ(r) / δ``
    times each term's softmax weight (``∂ value / ∂ t0``, ``∂ t1``, ``∂ e`` per row)."""
    m = np.maximum(np.maximum(t0, t1), e)
    w0, w1, w2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    s = w0 + w1 + w2
    r = m + np.log(s) - log_l
    absr = np.abs(r)
    value = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum() / delta
    h = np.clip(r, -delta, delta) / (delta * s)
    return value, h * w0, h * w1, h * w2


def _objective(theta, log_n, log_d, log_l, delta):
    """Σ Huber_δ(log L̂ − log L) / δ and its gradient (divided by δ: same optimum, O(1) scale)."""
    a, b, e, alpha, beta = theta
    value, g0, g1, g2 = huber_of_lse(a - alpha * log_n, b - beta * log_d, e, log_l, delta)
    return value, np.array([g0.sum(), g1.sum(), g2.sum(), -(g0 * log_n).sum(), -(g1 * log_d).sum()])


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
