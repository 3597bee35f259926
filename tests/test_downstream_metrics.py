"""Downstream metrics against independent references, on random data with ties and censoring."""

import numpy as np
import pytest

from morpheus_jax.metrics import classification as cls
from morpheus_jax.metrics import regression as reg
from morpheus_jax.metrics import survival as surv


def _survival_data(seed, n, censor_rate=0.4):
    rng = np.random.default_rng(seed)
    time = rng.integers(1, max(3, n // 4), n).astype(float)          # many tied times
    event = rng.random(n) >= censor_rate
    risk = np.round(rng.normal(size=n), 1)                            # many tied risks
    return event, time, risk


@pytest.mark.parametrize("seed,n", [(0, 7), (1, 40), (2, 200), (3, 3000)])
def test_concordance_index_matches_scikit_survival(seed, n):
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    event, time, risk = _survival_data(seed, n)
    ref = sksurv_metrics.concordance_index_censored(event, time, risk)
    ours = surv.concordance_index_censored(event.astype(int), time, risk)
    assert abs(ours[0] - ref[0]) < 1e-6
    assert tuple(ours[1:]) == tuple(int(v) for v in ref[1:])


def test_concordance_index_edge_cases():
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    time = np.array([1.0, 1.0, 2.0, 2.0, 3.0])
    event = np.array([True, False, True, True, False])
    risk = np.array([0.5, 0.5, 0.2, 0.2, 0.2])
    ref = sksurv_metrics.concordance_index_censored(event, time, risk)
    assert surv.concordance_index_censored(event, time, risk) == pytest.approx(ref, abs=1e-12)
    # Perfect, reversed and constant risks.
    t = np.arange(1.0, 11.0)
    e = np.ones(10, bool)
    assert surv.concordance_index_censored(e, t, -t)[0] == 1.0
    assert surv.concordance_index_censored(e, t, t)[0] == 0.0
    assert surv.concordance_index_censored(e, t, np.zeros(10))[0] == 0.5
    # No event: no comparable pair (scikit-survival raises; we return NaN).
    assert np.isnan(surv.concordance_index_censored(np.zeros(4), t[:4], t[:4])[0])
    with pytest.raises(ValueError, match="same length"):
        surv.concordance_index_censored(e, t[:3], t)


def _pycox_nll_logistic_hazard(phi, idx, events):
    """pycox.models.loss.nll_logistic_hazard, re-derived in torch (reduction 'mean')."""
    import torch
    import torch.nn.functional as F

    events = events.view(-1, 1).to(phi.dtype)
    idx = idx.view(-1, 1)
    y_bce = torch.zeros_like(phi).scatter(1, idx, events)
    bce = F.binary_cross_entropy_with_logits(phi, y_bce, reduction="none")
    return bce.cumsum(1).gather(1, idx).view(-1).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logistic_hazard_nll_matches_pycox_definition(seed):
    torch = pytest.importorskip("torch")
    import jax

    rng = np.random.default_rng(seed)
    n, k = 64, 5
    phi = rng.normal(0, 2, (n, k)).astype(np.float32)
    idx = rng.integers(0, k, n)
    events = (rng.random(n) < 0.6).astype(np.float32)
    t_phi = torch.tensor(phi, dtype=torch.float64, requires_grad=True)
    ref = _pycox_nll_logistic_hazard(t_phi, torch.tensor(idx), torch.tensor(events))
    ref.backward()
    ours = float(surv.logistic_hazard_nll(phi, idx, events))
    assert abs(ours - ref.item()) < 1e-6
    grad = np.asarray(jax.grad(lambda p: surv.logistic_hazard_nll(p, idx, events))(phi))
    np.testing.assert_allclose(grad, t_phi.grad.numpy(), atol=1e-6)
    rows = np.asarray(surv.logistic_hazard_nll(phi, idx, events, reduction="none"))
    assert rows.shape == (n,) and abs(rows.sum() - float(surv.logistic_hazard_nll(phi, idx, events, "sum"))) < 1e-4


def _km_cohorts():
    rng = np.random.default_rng(4)
    t = np.round(rng.exponential(30, 300), 1)
    yield "random", t, rng.random(300) < 0.7
    yield "ties", np.repeat([3.0, 7.0, 7.5, 12.0, 20.0, 41.0], 9), np.tile([1, 0, 1], 18).astype(bool)
    one = np.zeros(40, bool)
    one[17] = True
    yield "all_censored_but_one", np.round(rng.uniform(1, 90, 40), 2), one
    yield "heavy_censoring", np.round(rng.gamma(2.0, 15.0, 200), 1), rng.random(200) < 0.12
    yield "integer_months_with_zero", rng.integers(0, 60, 120).astype(float), rng.random(120) < 0.5
    yield "last_is_an_event", np.array([1.0, 2, 3, 4, 5, 6, 7, 8]), np.array([1, 0, 1, 1, 0, 1, 0, 1], bool)


@pytest.mark.parametrize("cohort", list(_km_cohorts()), ids=lambda c: c[0])
def test_km_quantile_labels_equal_pycox(cohort):
    """The authors' labels: pycox's LabTransDiscreteTime(cuts=5, scheme='quantiles'), fitted
    and applied (cut points, the index of each patient's cut, the event it returns)."""
    import warnings

    from pycox.preprocessing.label_transforms import LabTransDiscreteTime

    _, times, events = cohort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # "cuts are not unique": fewer cuts, as ours
        ref = LabTransDiscreteTime(5, scheme="quantiles")
        ref_idx, ref_event = ref.fit_transform(times, events.astype(np.float32))
    cuts = surv.km_quantile_cuts(times, events, 5)
    np.testing.assert_array_equal(cuts, ref.cuts)
    assert len(cuts) == ref.out_features
    idx, event = surv.discrete_time_labels(times, events, cuts)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(event, ref_event)
    # Applied to other times (a held-out fold): past the last cut is censored there.
    later = np.concatenate([times[:5], [times.max() * 2]])
    got = surv.discrete_time_labels(later, np.ones(6, bool), cuts)
    want = ref.transform(later, np.ones(6, np.float32))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_survival_helpers_refuse_bad_input():
    with pytest.raises(ValueError, match="at least 2 cut points"):
        surv.km_quantile_cuts([1.0, 2.0], [1, 1], 1)
    with pytest.raises(ValueError, match="non-negative"):
        surv.km_quantile_cuts([1.0, -2.0], [1, 1], 5)
    np.testing.assert_array_equal(surv.event_from_censorship([0, 1, 1.0]), [1, 0, 0])
    with pytest.raises(ValueError, match="censorship"):
        surv.event_from_censorship([0, 2])
    np.testing.assert_allclose(surv.risk_from_logits(np.ones((3, 5))), [5, 5, 5])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binary_roc_auc_matches_scikit_learn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 300))
    y = (rng.random(n) < 0.3).astype(int)
    y[:2] = [0, 1]
    score = rng.integers(0, 6, n).astype(float)                         # many ties
    assert abs(cls.roc_auc(y, score) - metrics.roc_auc_score(y, score)) < 1e-6
    two = np.stack([-score, score], 1)
    assert abs(cls.roc_auc(y, two) - metrics.roc_auc_score(y, score)) < 1e-6


@pytest.mark.parametrize("seed,c", [(0, 3), (1, 4), (2, 6)])
def test_macro_ovr_roc_auc_matches_scikit_learn(seed, c):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 200
    y = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
    logits = np.round(rng.normal(size=(n, c)) + np.eye(c)[y], 1)
    prob = cls.softmax(logits)
    ref = metrics.roc_auc_score(y, prob, multi_class="ovr", average="macro")
    assert abs(cls.roc_auc(y, prob) - ref) < 1e-6
    with pytest.raises(ValueError, match="positive and negative"):
        cls.roc_auc(np.zeros(n, int), prob)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_accuracy_matches_scikit_learn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 100)
    pred = np.where(rng.random(100) < 0.6, y, rng.integers(0, 4, 100))   # class 3 only predicted
    assert abs(cls.balanced_accuracy(y, pred) - metrics.balanced_accuracy_score(y, pred)) < 1e-6
    labels = np.array(["a", "b", "b", "c"])
    assert cls.balanced_accuracy(labels, labels) == 1.0


@pytest.mark.parametrize("seed,n", [(0, 2), (1, 17), (2, 500)])
def test_regression_metrics_match_scipy_and_scikit_learn(seed, n):
    metrics = pytest.importorskip("sklearn.metrics")
    from scipy.stats import pearsonr

    rng = np.random.default_rng(seed)
    y = rng.normal(50, 20, n)
    pred = 0.6 * y + rng.normal(0, 15, n)
    assert reg.pearson_r(y, pred) == pytest.approx(pearsonr(y, pred)[0], abs=1e-12)
    assert reg.mean_absolute_error(y, pred) == pytest.approx(metrics.mean_absolute_error(y, pred), rel=1e-12)
    assert reg.r2_score(y, pred) == pytest.approx(metrics.r2_score(y, pred), rel=1e-12, abs=1e-12)
    assert np.isnan(reg.pearson_r(y, np.ones(n))) and np.isnan(reg.r2_score(np.ones(n), pred))
    np.testing.assert_allclose(np.asarray(reg.squared_error(pred, y)), (pred - y) ** 2, rtol=1e-4, atol=1e-3)  # float32
    with pytest.raises(ValueError, match="differ in length"):
        reg.pearson_r(y, pred[:-1])
