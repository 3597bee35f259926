"""Regression metrics (NumPy, float64) and the squared-error loss of a one-output head (JAX).

- `pearson_r`: the Pearson correlation (``scipy.stats.pearsonr``'s statistic; NaN when either
  side is constant);
- `mean_absolute_error`, `r2_score`: scikit-learn's ``mean_absolute_error`` and ``r2_score``
  (1 - SS_res / SS_tot; NaN when the targets are constant, where scikit-learn warns);
- `squared_error`: the per-row loss ``(prediction - target)²``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from morpheus_jax.core.errors import InputError


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, np.float64).ravel()
    p = np.asarray(y_pred, np.float64).ravel()
    if t.shape != p.shape:
        raise InputError(f"targets and predictions differ in length: {t.size} vs {p.size}")
    if t.size < 2:
        raise InputError(f"regression metrics need at least 2 patients, got {t.size}")
    return t, p


def pearson_r(y_true, y_pred) -> float:
    t, p = _pair(y_true, y_pred)
    dt, dp = t - t.mean(), p - p.mean()
    denom = np.sqrt((dt * dt).sum() * (dp * dp).sum())
    return float(np.clip((dt * dp).sum() / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def mean_absolute_error(y_true, y_pred) -> float:
    t, p = _pair(y_true, y_pred)
    return float(np.abs(t - p).mean())


def r2_score(y_true, y_pred) -> float:
    t, p = _pair(y_true, y_pred)
    total = ((t - t.mean()) ** 2).sum()
    return float(1.0 - ((t - p) ** 2).sum() / total) if total > 0 else float("nan")


def squared_error(prediction, target) -> jax.Array:
    """prediction ``[n]``, target ``[n]`` → ``[n]`` squared error."""
    return jnp.square(jnp.asarray(prediction, jnp.float32) - jnp.asarray(target, jnp.float32))
