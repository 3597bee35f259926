"""End-to-end: raw files → prepare → Grain → jitted step → Orbax, on a tiny cohort."""

import dataclasses
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


def test_gradient_accumulation_equals_the_whole_batch():
    """train.grad_accum_steps: one update from k micro-batches equals the whole batch's update
    (masking and dropout drawn per sample, as in the whole batch) within 1e-5 relative; the
    fine-tuning step too."""
    import jax
    import jax.numpy as jnp
    from conftest import make_layouts, tiny_model_config

    from morpheus_jax.engine import state as st
    from morpheus_jax.engine.step import make_head_step, make_train_step
    from morpheus_jax.model.heads import MorpheusFinetune
    from morpheus_jax.model.morpheus import init_model
    from morpheus_jax.model.params import ParamCodec

    layouts = make_layouts()
    cfg = tiny_model_config(encoder_dropout=0.2, decoder_dropout=0.1)
    codec = ParamCodec(init_model(cfg, layouts, 0))
    import optax

    schedule = optax.constant_schedule(1e4)
    tx = optax.sgd(1e4)      # the update is -1e4 × the gradient (large: float32 parameters keep its digits)

    def same_update(new, ref, start):
        """The whole update within 1e-5 relative, and every tensor whose update is not ~0 (a key
        bias's gradient is 0 in exact arithmetic) within 1e-5 of its own size."""
        d = {n: [np.asarray(x[n], np.float64) - np.asarray(start[n], np.float64) for x in (new, ref)] for n in ref}
        err = {n: np.linalg.norm(a - b) for n, (a, b) in d.items()}
        size = {n: np.linalg.norm(b) for n, (a, b) in d.items()}
        total = np.sqrt(sum(v ** 2 for v in size.values()))
        assert np.sqrt(sum(v ** 2 for v in err.values())) <= 1e-5 * total
        for n in d:
            if size[n] > 1e-3 * total:
                assert err[n] <= 1e-5 * size[n], n
    rng = np.random.default_rng(0)
    b, n = 8, 12
    available = np.ones((b, 3), bool)
    available[1, 2] = available[6, 0] = False
    batch = {"wsi": rng.normal(size=(b, n, cfg.wsi_dim)).astype(np.float32), "wsi_mask": rng.random((b, n)) < 0.9,
             "omics": {m: rng.normal(size=(b, lay.num_features)).astype(np.float32) for m, lay in layouts.items()},
             "available": available}
    state = st.init_state(codec.flatten(init_model(cfg, layouts, 0)), tx, 3)

    def run(step):
        new, metrics = jax.jit(step)(jax.tree.map(jnp.copy, state), batch)
        return new, metrics

    whole, m1 = run(make_train_step(codec, tx, schedule, layouts, 0.75))
    for k in (4,):
        acc, mk = run(make_train_step(codec, tx, schedule, layouts, 0.75, accum_steps=k))
        assert float(mk["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
        assert float(mk["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
        same_update(acc["params"], whole["params"], state["params"])

    head = MorpheusFinetune(dataclasses.replace(cfg, modalities=["rna"]), {"rna": layouts["rna"]}, 3,
                            rng=np.random.default_rng(1), head_dropout=0.3)
    hcodec = ParamCodec(head)
    hstate = st.init_state(hcodec.flatten(head), tx, 3)
    hbatch = {"wsi": batch["wsi"], "wsi_mask": batch["wsi_mask"], "omics": {"rna": batch["omics"]["rna"]},
              "label": np.arange(b) % 3, "weight": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)}

    def task_loss(out, bt):
        return -jnp.take_along_axis(jax.nn.log_softmax(out), bt["label"][:, None], axis=1)[:, 0]

    ref, _ = jax.jit(make_head_step(hcodec, tx, schedule, task_loss))(jax.tree.map(jnp.copy, hstate), hbatch)
    got, _ = jax.jit(make_head_step(hcodec, tx, schedule, task_loss, 4))(jax.tree.map(jnp.copy, hstate), hbatch)
    assert any(np.any(np.asarray(ref["params"][n]) != np.asarray(hstate["params"][n])) for n in ref["params"])
    same_update(got["params"], ref["params"], hstate["params"])
