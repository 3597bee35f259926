"""End-to-end: raw files → prepare → Grain → jitted step → Orbax, on a tiny cohort."""

import json

import numpy as np
import pytest
from conftest import TINY_DIM, tiny_run_config

from morpheus_jax.apps.pretrain import pretrain
from morpheus_jax.core.log import read_jsonl
from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare
from morpheus_jax.data.synth import write_synthetic_cohort

DIM = TINY_DIM


def tiny(dataset, run_dir, *extra):
    return tiny_run_config(dataset, run_dir, *extra)


def test_tiny_run_learns_and_is_deterministic(tiny_dataset, tmp_path):
    dataset = tiny_dataset
    report = pretrain(tiny(dataset, tmp_path / "a"), progress=False)
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    for r in rows:
        for key in ("loss", "loss_rna", "loss_dnam", "loss_cnv", "lr", "samples_per_s"):
            assert key in r
        assert r["loss"] == pytest.approx(r["loss_rna"] + r["loss_dnam"] + r["loss_cnv"], rel=1e-5)
    again = pretrain(tiny(dataset, tmp_path / "b"), progress=False)
    losses_b = [r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert losses_b == losses
    assert again["val_loss"] == report["val_loss"]
    other = pretrain(tiny(dataset, tmp_path / "c", "seed=5"), progress=False)
    losses_c = [r["loss"] for r in read_jsonl(tmp_path / "c" / "metrics.jsonl") if "loss" in r]
    assert losses_c != losses
    del other
    # Run folder contents.
    run = tmp_path / "a"
    assert (run / "config.yaml").exists() and (run / "plots" / "loss.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "30").is_dir()
    final = json.loads((run / "final.json").read_text())
    assert set(final["reconstruction"]) >= {"median_r", "baseline_median_r", "mae", "baseline_mae"}


def test_allow_missing_modalities(tmp_path):
    write_synthetic_cohort(tmp_path / "raw", n_patients=60, seed=2, feature_dim=DIM, mean_patches_per_slide=30,
                           omics_missing_fraction=0.2, progress=False)
    strict = prepare(RawCohort.from_dir(tmp_path / "raw"), tmp_path / "strict", PrepareOptions(wsi_dim=DIM, progress=False))
    loose = prepare(RawCohort.from_dir(tmp_path / "raw"), tmp_path / "ds",
                    PrepareOptions(wsi_dim=DIM, allow_missing_modalities=True, progress=False))
    assert sum(loose.counts.values()) > sum(strict.counts.values())
    from morpheus_jax.core.errors import ConfigError
    with pytest.raises(ConfigError, match="allow_missing_modalities"):
        pretrain(tiny(tmp_path / "ds", tmp_path / "r0", "train.steps=2"), progress=False)
    pretrain(tiny(tmp_path / "ds", tmp_path / "r1", "train.steps=6", "data.allow_missing_modalities=true"), progress=False)
    rows = read_jsonl(tmp_path / "r1" / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    # Missing modalities are in the batches, marked unavailable.
    from morpheus_jax.data import pipeline
    ds = pipeline.train_dataset(tmp_path / "ds", "pretrain", global_batch=loose.counts["pretrain"] // 2 * 2,
                                num_patches=8, seed=0, modalities=("rna", "dnam", "cnv"))
    assert not ds[0]["available"].all()


def test_remat_gives_the_same_losses_and_bf16_moments_and_compute_train(tiny_dataset, tmp_path):
    base = ["train.steps=5", "model.encoder_dropout=0.1"]
    pretrain(tiny(tiny_dataset, tmp_path / "plain", *base), progress=False)
    pretrain(tiny(tiny_dataset, tmp_path / "remat", *base, "model.remat=true"), progress=False)
    plain = [r["loss"] for r in read_jsonl(tmp_path / "plain" / "metrics.jsonl") if "loss" in r]
    remat = [r["loss"] for r in read_jsonl(tmp_path / "remat" / "metrics.jsonl") if "loss" in r]
    np.testing.assert_allclose(remat, plain, rtol=1e-5)
    pretrain(tiny(tiny_dataset, tmp_path / "mu", *base, "train.mu_dtype=bfloat16"), progress=False)
    mu = [r["loss"] for r in read_jsonl(tmp_path / "mu" / "metrics.jsonl") if "loss" in r]
    assert mu[0] == plain[0] and np.all(np.isfinite(mu)) and mu != plain
    import orbax.checkpoint as ocp

    from morpheus_jax.ckpt.store import checkpoint_dir
    meta = ocp.StandardCheckpointer().metadata(checkpoint_dir(tmp_path / "mu") / "5" / "state")
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    assert str(tree["opt_state"][0]["mu"]["global_token"].dtype) == "bfloat16"
    # bfloat16 products (float32 parameters, accumulation and loss) run on every backend,
    # CPU included, and track the float32 losses to bfloat16 precision.
    pretrain(tiny(tiny_dataset, tmp_path / "bf16", *base, "model.compute_dtype=bfloat16"), progress=False)
    bf16 = [r["loss"] for r in read_jsonl(tmp_path / "bf16" / "metrics.jsonl") if "loss" in r]
    assert bf16 != plain
    np.testing.assert_allclose(bf16, plain, rtol=3e-2)
