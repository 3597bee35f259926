"""The data-constrained law: ``L(N, D)`` where a repeated sample is worth less than a new one.

Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", §3: with ``U`` unique
samples (here: the run's pretraining patients) and ``R = D/U − 1`` repetitions, the effective
data is

    D' = U + U · R*_D · (1 − exp(−R / R*_D))        (D' = D while D ≤ U)

so the k-th pass over the cohort is worth ``exp(−(k−1)/R*_D)`` of a fresh one and ``D'`` tends
to ``U (1 + R*_D)``. Excess parameters decay the same way: ``U_N`` is the compute-optimal size
for ``U`` samples under the law (``α A U^β / (γ β B)`` to the power ``1/α``, with ``C = k N^γ
D``), ``R_N = N/U_N − 1`` and ``N' = U_N + U_N R*_N (1 − exp(−R_N / R*_N))``. The loss is
``E + A/N'^α + B/D'^β``; every parameter, ``log R*`` included, is fitted jointly (Huber loss on
log residuals, as the plain fit), from plain fits on ``D'`` at a grid of ``R*_D``.

``R*_N`` is fitted only where the ladder pins it: at least two model sizes past ``U_N`` and a
bootstrap interval of ``R*_N`` clear of its bounds; else the fit keeps ``N' = N``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import optimize

from morpheus_jax.apps.scaling.fit import _BOUNDS, HUBER_DELTA, Law, fit_law, huber_of_lse
from morpheus_jax.core.errors import InputError

# log R* bounds: R* from 0.05 (a second pass is worth nothing) to 1e4 (repetition as good as new data).
RHO_BOUNDS = (float(np.log(0.05)), float(np.log(1e4)))
RHO_STARTS = tuple(float(np.log(r)) for r in (1.0, 4.0, 16.0, 64.0, 1000.0))
RHO_N_START = float(np.log(5.0))
# Past this many passes over its data (samples / U) a run counts as repeating (the default law switches).
REPEATED_EPOCHS = 1.5


@dataclasses.dataclass(frozen=True)
class ConstrainedLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    r_star_d: float
    r_star_n: float | None = None
    gamma: float = 1.0            # the compute relation's exponent (C = k N^γ D), for U_N

    @property
    def base(self) -> Law:
        return Law(self.E, self.A, self.B, self.alpha, self.beta)

    def unique_params(self, u):
        """``U_N``: the compute-optimal model size for ``u`` samples."""
        u = np.asarray(u, float)
        return (self.alpha * self.A * u ** self.beta / (self.gamma * self.beta * self.B)) ** (1.0 / self.alpha)

    def effective_data(self, d, u):
        return effective(d, u, self.r_star_d)

    def effective_params(self, n, u):
        if self.r_star_n is None:
            return np.asarray(n, float)
        return effective(n, self.unique_params(u), self.r_star_n)

    def loss(self, n, d, u):
        return self.base.loss(self.effective_params(n, u), self.effective_data(d, u))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_theta(cls, theta, gamma: float = 1.0) -> "ConstrainedLaw":
        base = Law.from_theta(theta[:5])
        r_n = float(np.exp(theta[6])) if len(theta) > 6 else None
        return cls(base.E, base.A, base.B, base.alpha, base.beta, float(np.exp(theta[5])), r_n, gamma)


def effective(x, unique, r_star):
    """``x`` itself up to ``unique``, then ``unique (1 + R* (1 − exp(−R/R*)))``, ``R = x/unique − 1``."""
    x, unique = np.asarray(x, float), np.asarray(unique, float)
    rep = np.maximum(x / unique - 1.0, 0.0)
    return np.where(x <= unique, x, unique * (1.0 + r_star * (1.0 - np.exp(-rep / r_star))))


def _log_effective(log_x, log_u, rho):
    """``log x'`` and its derivatives by ``log u`` and ``rho = log R*``."""
    rs = np.exp(rho)
    rep = np.exp(np.minimum(log_x - log_u, 50.0)) - 1.0     # 50: past any fitted R*
    repeated = rep > 0
    r = np.maximum(rep, 0.0)
    ex = np.exp(-r / rs)
    g = 1.0 + rs * (1.0 - ex)
    value = np.where(repeated, log_u + np.log(g), log_x)
    d_log_u = np.where(repeated, 1.0 - ex * (r + 1.0) / g, 0.0)
    d_rho = np.where(repeated, rs * ((1.0 - ex) - (r / rs) * ex) / g, 0.0)
    return value, d_log_u, d_rho


def objective(theta, log_n, log_d, log_u, log_l, delta=HUBER_DELTA, gamma=1.0):
    """Σ Huber_δ(log L̂ − log L) / δ and its gradient; θ = (a, b, e, α, β, log R*_D[, log R*_N])."""
    a, b, e, alpha, beta, rho_d = theta[:6]
    log_dp, _, dd_rho = _log_effective(log_d, log_u, rho_d)
    if len(theta) > 6:
        log_un = (np.log(alpha) + a + beta * log_u - np.log(gamma) - np.log(beta) - b) / alpha
        log_np, dn_un, dn_rho = _log_effective(log_n, log_un, theta[6])
    else:
        log_un, log_np, dn_un, dn_rho = 0.0, log_n, 0.0, 0.0
    value, p0, p1, p2 = huber_of_lse(a - alpha * log_np, b - beta * log_dp, e, log_l, delta)
    via_un = -alpha * p0 * dn_un          # d r / d log U_N
    grad = [p0.sum() + (via_un / alpha).sum(),
            p1.sum() - (via_un / alpha).sum(),
            p2.sum(),
            (-p0 * log_np + via_un * (1.0 / alpha ** 2 - log_un / alpha)).sum(),
            (-p1 * log_dp + via_un * (log_u - 1.0 / beta) / alpha).sum(),
            (-beta * p1 * dd_rho).sum()]
    if len(theta) > 6:
        grad.append((-alpha * p0 * dn_rho).sum())
    return value, np.array(grad)


def _theta(law: ConstrainedLaw) -> np.ndarray:
    t = [np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta, np.log(law.r_star_d)]
    return np.array(t + ([np.log(law.r_star_n)] if law.r_star_n is not None else []))


def _bounds(with_params: bool):
    # α, β > 0 strictly: U_N divides by them.
    base = [b if i < 3 else (1e-3, b[1]) for i, b in enumerate(_BOUNDS)]
    return base + [RHO_BOUNDS] * (2 if with_params else 1)


def fit_constrained(params, samples, unique, loss, *, with_params: bool = False, gamma: float = 1.0,
                    delta: float = HUBER_DELTA, starts=None) -> tuple[ConstrainedLaw, float]:
    """Best data-constrained law and its objective. ``starts``: θ vectors to start from
    (default: plain fits on ``D'`` at each of `RHO_STARTS`)."""
    n, d, u, l_ = (np.asarray(x, float) for x in (params, samples, unique, loss))
    k = 7 if with_params else 6
    if len(l_) < k:
        raise InputError(f"fitting {k} parameters needs at least {k} runs (finished runs or table rows), got {len(l_)}")
    logs = (np.log(n), np.log(d), np.log(u), np.log(l_))
    if starts is None:
        starts = []
        for rho in RHO_STARTS:
            plain, _ = fit_law(n, effective(d, u, np.exp(rho)), l_, delta=delta, starts=4)
            starts.append(np.r_[np.log(plain.A), np.log(plain.B), np.log(plain.E),
                                max(plain.alpha, 1e-2), max(plain.beta, 1e-2), rho]
                          .tolist() + ([RHO_N_START] if with_params else []))
    best, best_value = None, np.inf
    for theta0 in starts:
        res = optimize.minimize(objective, np.asarray(theta0, float), args=(*logs, delta, gamma), jac=True,
                                method="L-BFGS-B", bounds=_bounds(with_params),
                                options={"maxiter": 3000, "ftol": 1e-13, "gtol": 1e-10})
        if res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    return ConstrainedLaw.from_theta(best, gamma), best_value


def pins_params(law: ConstrainedLaw, params, unique, boot: list[ConstrainedLaw], confidence: float) -> str | None:
    """None when ``R*_N`` is pinned by the ladder, else why not (one line)."""
    sizes = np.unique(np.asarray(params, float)[np.asarray(params, float) > law.unique_params(unique)])
    if len(sizes) < 2:
        return (f"{len(sizes)} model size(s) past U_N (the compute-optimal size for the cohort); "
                "R*_N needs at least 2")
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    lo, hi = np.percentile([np.log(b.r_star_n) for b in boot], q)
    if lo <= RHO_BOUNDS[0] + 0.05 or hi >= RHO_BOUNDS[1] - 0.05:
        return (f"its {confidence:.0%} bootstrap interval [{np.exp(lo):.3g}, {np.exp(hi):.3g}] reaches the "
                f"bounds [{np.exp(RHO_BOUNDS[0]):.3g}, {np.exp(RHO_BOUNDS[1]):.3g}]")
    return None
