"""Classification metrics (MORPHEUS.md §4) as pure NumPy functions, and the fine-tuning
losses of a classifier head (JAX, per row).

- `binary_cross_entropy` (the authors' two-class head: one logit) and `softmax_cross_entropy`;

- `roc_auc`: binary ROC AUC, or the macro mean of one-vs-rest AUCs above two classes (as
  scikit-learn's ``roc_auc_score(..., multi_class="ovr", average="macro")``); tied scores
  count ½ (Mann-Whitney with average ranks, the area under the trapezoidal ROC curve);
- `balanced_accuracy`: mean recall over the classes present in ``y_true`` (scikit-learn's
  ``balanced_accuracy_score``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import rankdata

from morpheus_jax.core.errors import InputError


def binary_roc_auc(positive, score) -> float:
    """positive ``[n]`` bool, score ``[n]`` (higher = more positive) → AUC."""
    positive = np.asarray(positive).astype(bool).ravel()
    score = np.asarray(score, np.float64).ravel()
    if positive.shape != score.shape:
        raise InputError(f"labels and scores differ in length: {positive.size} vs {score.size}")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError("ROC AUC needs both positive and negative examples")
    ranks = rankdata(score)                        # average ranks: a tie counts ½
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(y_true, scores) -> float:
    """y_true ``[n]`` int classes in ``0 … C-1``; scores ``[n]`` (binary: score of class 1) or
    ``[n, C]`` (per-class scores, e.g. probabilities). C = 2: the AUC of class 1; C > 2: the
    unweighted mean over classes of class c vs the rest, scored by column c."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(scores, np.float64)
    if s.ndim == 1:
        return binary_roc_auc(y == 1, s)
    if s.ndim != 2 or s.shape[0] != y.size:
        raise InputError(f"scores must be [n] or [n, C] with n = {y.size}, got {list(s.shape)}")
    c = s.shape[1]
    if y.min(initial=0) < 0 or y.max(initial=0) >= c:
        raise InputError(f"labels must lie in 0 … {c - 1}")
    if c == 2:
        return binary_roc_auc(y == 1, s[:, 1])
    return float(np.mean([binary_roc_auc(y == k, s[:, k]) for k in range(c)]))


def balanced_accuracy(y_true, y_pred) -> float:
    """y_true, y_pred ``[n]`` class labels → mean over classes present in y_true of their recall."""
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise InputError("y_true and y_pred must be non-empty and of the same length")
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == k] == k) for k in classes]))


def softmax(logits) -> np.ndarray:
    """``[n, C]`` logits → probabilities (float64)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def binary_cross_entropy(logit, label) -> jax.Array:
    """logit ``[n]``, label ``[n]`` in {0, 1} (1 = the second class) → ``[n]`` BCE with logits."""
    return optax.sigmoid_binary_cross_entropy(logit, jnp.asarray(label).astype(jnp.float32))


def softmax_cross_entropy(logits, label) -> jax.Array:
    """logits ``[n, C]``, label ``[n]`` int class → ``[n]`` cross-entropy."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), jnp.asarray(label)[:, None], axis=-1)[:, 0]
