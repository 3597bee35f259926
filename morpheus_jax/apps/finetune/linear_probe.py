"""Linear probe: multinomial logistic regression on frozen embeddings (NumPy + SciPy L-BFGS).

Features are standardised with the training rows' mean and std; the objective is
scikit-learn's default ``0.5·‖W‖² + C·Σ cross-entropy`` (C = 1, intercept not penalised).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from morpheus_jax.metrics.classification import softmax


class LogisticRegression:
    def __init__(self, c: float = 1.0, max_iter: int = 1000):
        self.c, self.max_iter = float(c), int(max_iter)

    def fit(self, x, y, n_classes: int) -> "LogisticRegression":
        """x ``[n, d]``, y ``[n]`` int classes in ``0 … n_classes-1``."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.int64)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-8
        z = (x - self.mean) / self.std
        n, d = z.shape
        onehot = np.eye(n_classes)[y]

        def objective(theta):
            w, b = theta[: d * n_classes].reshape(d, n_classes), theta[d * n_classes:]
            logits = z @ w + b
            logits = logits - logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            p = np.exp(logp)
            loss = 0.5 * (w ** 2).sum() - self.c * (onehot * logp).sum()
            g = self.c * (p - onehot)
            return loss, np.concatenate([(w + z.T @ g).ravel(), g.sum(0)])

        res = minimize(objective, np.zeros(d * n_classes + n_classes), jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter})
        self.w = res.x[: d * n_classes].reshape(d, n_classes)
        self.b = res.x[d * n_classes:]
        return self

    def predict_proba(self, x) -> np.ndarray:
        """``[n, d]`` → ``[n, n_classes]`` class probabilities."""
        z = (np.asarray(x, np.float64) - self.mean) / self.std
        return softmax(z @ self.w + self.b)
