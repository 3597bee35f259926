"""Survival metrics and the discrete-time objective (MORPHEUS.md §4), as pure functions.

- `km_quantile_cuts` / `discrete_time_labels`: the authors' discrete-time labels, pycox's
  ``LabTransDiscreteTime(cuts, scheme='quantiles')`` (cut points at Kaplan–Meier quantiles;
  events rounded up to a cut, censored times down);
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


def _check_times(times, events) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(times, np.float64).ravel()
    e = np.asarray(events).ravel()
    if t.shape != e.shape:
        raise InputError(f"times and events must have the same length, got {t.size} and {e.size}")
    if t.size == 0:
        raise InputError("no survival times given")
    if not np.isfinite(t).all() or (t < 0).any():
        raise InputError("survival times must be finite and non-negative")
    return t, e.astype(bool)


def kaplan_meier(times, events) -> tuple[np.ndarray, np.ndarray]:
    """The Kaplan–Meier curve ``(grid, survival)`` at the distinct times, ``(0, 1)`` prepended when
    every time is positive; computed as pycox's ``utils.kaplan_meier`` does (the product as
    ``exp(Σ log)``, 0 from the first step that leaves nobody), so cut points found on it agree
    to the last bit."""
    t, e = _check_times(times, events)
    grid, inverse = np.unique(t, return_inverse=True)
    deaths = np.bincount(inverse, weights=e.astype(np.float64), minlength=grid.size)
    leaving = np.bincount(inverse, minlength=grid.size)
    at_risk = t.size - np.concatenate([[0], np.cumsum(leaving)[:-1]])
    survive = 1.0 - deaths / at_risk
    surv = np.zeros_like(survive)
    gone = np.flatnonzero(survive == 0)
    stop = gone[0] if gone.size else survive.size
    surv[:stop] = np.exp(np.cumsum(np.log(survive[:stop])))
    if grid[0] > 0:
        grid, surv = np.concatenate([[0.0], grid]), np.concatenate([[1.0], surv])
    return grid, surv


def km_quantile_cuts(times, events, num_cuts: int = 5) -> np.ndarray:
    """Cut points of pycox's ``LabTransDiscreteTime(num_cuts, scheme='quantiles')`` (the
    authors' survival labels): the times where the Kaplan–Meier curve crosses ``num_cuts``
    equally spaced levels between its lowest and highest value, duplicates dropped, the first
    set to 0; the last is the largest time. There are at most ``num_cuts`` of them."""
    if num_cuts < 2:
        raise InputError(f"the quantile scheme needs at least 2 cut points, got {num_cuts}")
    grid, surv = kaplan_meier(times, events)
    levels = np.linspace(surv.min(), surv.max(), num_cuts)
    at = np.searchsorted(surv[::-1], levels)[::-1]
    cuts = np.unique(grid[::-1][at])
    cuts[0] = 0.0
    return cuts


def discrete_time_labels(times, events, cuts) -> tuple[np.ndarray, np.ndarray]:
    """pycox's ``LabTransDiscreteTime.transform``: ``(index, event)`` per patient. A time past
    the last cut is censored there; an event time is rounded up to the next cut, a censored
    time down to the previous one; ``index`` is that cut's position in ``cuts`` (``0 …
    len(cuts) - 1``, the network's output for it)."""
    t, e = _check_times(times, events)
    cuts = np.asarray(cuts, np.float64)
    e = e & (t <= cuts[-1])
    t = np.minimum(t, cuts[-1])
    up = np.searchsorted(cuts, t, side="left")
    down = np.searchsorted(cuts, t, side="right") - 1
    if (down[~e] < 0).any():
        raise InputError(f"a censored time lies before the first cut point {cuts[0]:g}")
    return np.where(e, up, down).astype(np.int32), e.astype(np.int32)


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
