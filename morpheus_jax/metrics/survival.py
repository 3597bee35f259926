"""Survival metrics and the discrete-time objective (MORPHEUS.md §4), as pure functions.

- `quantile_cuts` / `bin_index`: event times → ``n_bins`` intervals cut at quantiles of the
  observed event times (the first and last interval are open-ended);
- `logistic_hazard_nll`: pycox's ``NLLLogistiHazardLoss`` (JAX; NumPy arrays work too);
- `risk_from_logits`: risk score = sum of the hazard logits (higher = worse);
- `concordance_index_censored`: scikit-survival's censored concordance index.

Conventions: ``event`` is 1 when the event was observed (``1 - censorship``), 0 when censored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from morpheus_jax.core.errors import InputError


def event_from_censorship(censorship) -> np.ndarray:
    """``[n]`` censorship (1 = censored) → ``[n]`` int event indicator (1 = observed)."""
    c = np.asarray(censorship, np.float64)
    if not np.isin(c, (0.0, 1.0)).all():
        raise InputError("censorship must hold 0 (event observed) and 1 (censored) only")
    return (1 - c).astype(np.int32)


def quantile_cuts(times, events, n_bins: int = 5) -> np.ndarray:
    """Interior cut points ``[n_bins - 1]``: quantiles ``1/n … (n-1)/n`` of the observed event
    times (linear interpolation, as ``pandas.qcut``). times, events ``[n]``."""
    times = np.asarray(times, np.float64)
    observed = times[np.asarray(events).astype(bool)]
    if n_bins < 1:
        raise InputError(f"n_bins must be >= 1, got {n_bins}")
    if observed.size == 0:
        raise InputError("no observed events: cannot place time bins at quantiles of the event times")
    return np.quantile(observed, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])


def bin_index(times, cuts) -> np.ndarray:
    """``[n]`` interval of each time: number of cut points ≤ t (intervals closed on the left,
    ``[c_k, c_{k+1})``, as ``pandas.cut(..., right=False)``), in ``0 … len(cuts)``."""
    return np.searchsorted(np.asarray(cuts, np.float64), np.asarray(times, np.float64), side="right").astype(np.int32)


def logistic_hazard_nll(phi, idx, events, reduction: str = "mean"):
    """Negative log-likelihood of the discrete-time logistic-hazard model (pycox).

    phi ``[n, K]`` hazard logits, idx ``[n]`` int interval of each duration, events ``[n]``
    (1 = observed). Per row: ``Σ_{k ≤ idx} BCE(phi_k, y_k)`` with ``y_k = event·[k = idx]``.
    ``reduction``: ``"mean"`` (scalar), ``"sum"`` or ``"none"`` (``[n]``).
    """
    phi = jnp.asarray(phi, jnp.float32)
    idx = jnp.asarray(idx, jnp.int32)
    events = jnp.asarray(events, jnp.float32)
    k = jnp.arange(phi.shape[-1])
    y = jnp.where(k[None, :] == idx[:, None], events[:, None], 0.0)
    # BCE with logits, stable: max(x, 0) - x y + log(1 + exp(-|x|)).
    bce = jnp.maximum(phi, 0.0) - phi * y + jnp.log1p(jnp.exp(-jnp.abs(phi)))
    loss = jnp.sum(jnp.where(k[None, :] <= idx[:, None], bce, 0.0), axis=-1)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    if reduction == "mean":
        return jnp.mean(loss)
    raise InputError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def risk_from_logits(phi) -> jax.Array:
    """``[n, K]`` hazard logits → ``[n]`` risk score (sum over intervals; higher = worse)."""
    return jnp.sum(jnp.asarray(phi), axis=-1)


def concordance_index_censored(event, time, estimate, tied_tol: float = 1e-8) -> tuple[float, int, int, int, int]:
    """Harrell's censored concordance index, as scikit-survival's ``concordance_index_censored``.

    event ``[n]`` (1 = observed), time ``[n]``, estimate ``[n]`` risk (higher = earlier event).
    A pair (i, j) is comparable when i had an event and ``t_j > t_i``, or ``t_j = t_i`` and j
    is censored; it is concordant when ``r_i > r_j``; risks within ``tied_tol`` count ½.
    Returns ``(cindex, concordant, discordant, tied_risk, tied_time)``; cindex is NaN when
    there is no comparable pair (scikit-survival raises instead).
    """
    event = np.asarray(event).astype(bool).ravel()
    time = np.asarray(time, np.float64).ravel()
    est = np.asarray(estimate, np.float64).ravel()
    if not (event.shape == time.shape == est.shape):
        raise InputError(f"event, time and estimate must have the same length, got "
                         f"{event.shape[0]}, {time.shape[0]}, {est.shape[0]}")
    if not (np.isfinite(time).all() and np.isfinite(est).all()):
        raise InputError("time and estimate must be finite")
    n = time.size
    concordant = discordant = tied_risk = tied_time = comparable_total = 0
    rows = np.flatnonzero(event)
    step = max(1, (1 << 22) // max(n, 1))          # bounded [rows, n] blocks
    for start in range(0, rows.size, step):
        i = rows[start: start + step]
        same = time[None, :] == time[i, None]
        censored_same = same & ~event[None, :]
        comparable = (time[None, :] > time[i, None]) | censored_same
        diff = est[None, :] - est[i, None]
        ties = comparable & (np.abs(diff) <= tied_tol)
        con = comparable & (diff < 0) & ~ties
        n_comp, n_ties, n_con = int(comparable.sum()), int(ties.sum()), int(con.sum())
        comparable_total += n_comp
        tied_risk += n_ties
        concordant += n_con
        discordant += n_comp - n_con - n_ties
        tied_time += int(censored_same.sum())
    cindex = (concordant + 0.5 * tied_risk) / comparable_total if comparable_total else float("nan")
    return float(cindex), concordant, discordant, tied_risk, tied_time
