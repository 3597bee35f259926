import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from morpheus_jax.model.masking import explicit_keep, num_kept, random_keep, token_positions

PAPER_COUNTS = (50, 50, 50)


def test_num_kept_paper():
    assert num_kept(150, 0.75) == 37
    assert num_kept(15, 0.75) == 3


@pytest.mark.parametrize("counts,ratio", [(PAPER_COUNTS, 0.75), ((6, 5, 4), 0.75), ((3, 40, 2), 0.5), ((10,), 0.6)])
def test_exact_kept_count_and_consistent_plan(counts, ratio):
    k = num_kept(sum(counts), ratio)
    fn = jax.jit(lambda key: random_keep(key, counts, ratio, 64))
    for seed in range(25):
        plan = jax.device_get(fn(jax.random.key(seed)))
        assert plan.keep_idx.shape == (64, k)
        np.testing.assert_array_equal((plan.token_mask == 0).sum(1), k)
        assert plan.keep_valid.all()
        for row in range(64):
            kept = np.flatnonzero(plan.token_mask[row] == 0)
            np.testing.assert_array_equal(np.sort(plan.keep_idx[row]), kept)


def _reference_counts(rng, k, caps, n):
    """Independent NumPy version of the §3 split: Dirichlet(1,..,1) shares, rounded, settled at random."""
    out = np.zeros((n, len(caps)), int)
    for i in range(n):
        c = np.minimum(np.round(rng.dirichlet(np.ones(len(caps))) * k).astype(int), caps)
        while c.sum() != k:
            d = np.sign(k - c.sum())
            elig = np.flatnonzero(c < caps) if d > 0 else np.flatnonzero(c > 0)
            c[rng.choice(elig)] += d
        out[i] = c
    return out


def test_dirichlet_split_statistics():
    k = num_kept(150, 0.75)
    plan = jax.device_get(jax.jit(lambda key: random_keep(key, PAPER_COUNTS, 0.75, 20000))(jax.random.key(3)))
    kept = (plan.token_mask == 0).reshape(20000, 3, 50).sum(-1)
    np.testing.assert_array_equal(kept.sum(1), k)
    share = kept / k
    # Marginal of a Dirichlet(1,1,1) share is Beta(1, 2): mean 1/3, variance 1/18.
    np.testing.assert_allclose(share.mean(0), 1 / 3, atol=0.01)
    np.testing.assert_allclose(share.var(0), 1 / 18, rtol=0.08)
    for m in range(3):
        assert stats.kstest(share[:, m], stats.beta(1, 2).cdf).statistic < 0.04
    # Same count distribution as an independent implementation (chi-square on pooled bins).
    ref = _reference_counts(np.random.default_rng(0), k, np.array(PAPER_COUNTS), 20000)
    bins = np.arange(0, k + 2, 3)
    h1, _ = np.histogram(kept[:, 0], bins)
    h2, _ = np.histogram(ref[:, 0], bins)
    assert stats.chi2_contingency(np.stack([h1, h2]) + 1).pvalue > 1e-3


def test_kept_tokens_uniform_within_modality():
    plan = jax.device_get(random_keep(jax.random.key(0), PAPER_COUNTS, 0.75, 20000))
    freq = (plan.token_mask == 0).mean(0).reshape(3, 50)
    np.testing.assert_allclose(freq, np.broadcast_to(freq.mean(1, keepdims=True), freq.shape), atol=0.02)


def test_unavailable_modality_never_kept():
    avail = np.ones((200, 3), bool)
    avail[:100, 1] = False
    avail[150:, [0, 2]] = False
    plan = jax.device_get(random_keep(jax.random.key(1), (6, 5, 4), 0.5, 200, jnp.asarray(avail)))
    kept = plan.token_mask == 0
    assert not kept[:100, 6:11].any()
    assert not kept[150:, :6].any() and not kept[150:, 11:].any()
    k = num_kept(15, 0.5)
    np.testing.assert_array_equal(kept[:150].sum(1), k)
    # Only 5 tokens available: all kept, the rest of the plan is padding.
    np.testing.assert_array_equal(kept[150:].sum(1), 5)
    np.testing.assert_array_equal(plan.keep_valid[150:].sum(1), 5)


def test_explicit_keep_and_positions():
    mask = np.array([[1, 0, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    plan = jax.device_get(explicit_keep(mask))
    np.testing.assert_array_equal(plan.token_mask, mask)
    for row in range(3):
        kept = plan.keep_idx[row][plan.keep_valid[row]]
        np.testing.assert_array_equal(kept, np.flatnonzero(mask[row] == 0))
    pos = np.asarray(token_positions(plan))
    np.testing.assert_array_equal(pos[0], [-1, 0, -1, 1, 2])
    np.testing.assert_array_equal(pos[1], [-1] * 5)
    np.testing.assert_array_equal(pos[2], np.arange(5))
