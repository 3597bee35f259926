"""`morpheus_jax.load` and the NumPy handle: path forms, metadata, shapes, checks, to_features."""

import numpy as np
import pytest
from conftest import named_setup, random_params, run_cli, save_checkpoint

from morpheus_jax import api
from morpheus_jax.core.errors import CheckpointNotFound


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg, groups, features, layouts = named_setup()
    params = random_params(cfg, layouts, seed=2)
    run = tmp_path_factory.mktemp("api") / "run"
    save_checkpoint(run, cfg, groups, features, params, step=3)
    save_checkpoint(run, cfg, groups, features, params, step=11)   # the latest
    return cfg, groups, features, layouts, params, run


def test_load_run_dir_checkpoints_dir_or_step_dir(setup):
    cfg, groups, features, layouts, params, run = setup
    for path, step in [(run, 11), (run / "checkpoints", 11), (run / "checkpoints" / "3", 3), (str(run), 11)]:
        model = api.load(path)
        assert model.step == step
    assert model.modalities == ("rna", "dnam", "cnv")
    assert model.group_names == {m: list(g) for m, g in groups.items()}
    assert model.feature_names == features
    assert model.group_sizes["cnv"] == [len(f) for f in groups["cnv"].values()]
    assert model.config.model == cfg.model and model.has_decoders
    assert "H=32" in repr(model)
    with pytest.raises(CheckpointNotFound, match="not a MORPHEUS checkpoint"):
        api.load(run.parent)
    with pytest.raises(FileNotFoundError, match="no such file"):
        api.load(run / "missing")


def test_shapes_and_input_checks(setup):
    cfg, groups, features, layouts, params, run = setup
    model = api.load(run)
    rng = np.random.default_rng(0)
    b, n = 2, 7
    wsi = rng.normal(size=(b, n, cfg.model.wsi_dim)).astype(np.float16)    # float16 bags are fine
    rna = rng.normal(size=(b, len(features["rna"])))
    z = model.encode(wsi, {"rna": rna})
    assert z.shape == (b, 1 + cfg.model.num_prototypes + len(groups["rna"]), cfg.model.hidden_size)
    assert z.dtype == np.float32 and np.isfinite(z).all()

    with pytest.raises(ValueError, match=r"wsi must be \[B, N, 24\]"):
        model.encode(wsi[..., :5])
    with pytest.raises(ValueError, match="unknown omics modalities"):
        model.encode(wsi, {"protein": rna})
    with pytest.raises(ValueError, match=r"canonical feature order"):
        model.encode(wsi, {"rna": rna[:, :-1]})
    with pytest.raises(ValueError, match="batch"):
        model.encode(wsi, {"rna": rna[:1]})
    with pytest.raises(ValueError, match="wsi_mask"):
        model.encode(wsi, wsi_mask=np.ones((b, n + 1), bool))
    with pytest.raises(ValueError, match="unknown target"):
        model.generate("protein", wsi)
    masks_ok = {"rna": np.zeros((b, len(groups["rna"])), int)}
    with pytest.raises(ValueError, match="masks for modalities not in omics"):
        model.reconstruct(wsi, {"rna": rna}, {**masks_ok, "cnv": np.zeros((b, 4), int)})
    with pytest.raises(ValueError, match=r"masks\['rna'\] must be"):
        model.reconstruct(wsi, {"rna": rna}, {"rna": np.zeros((b, 2), int)})
    with pytest.raises(ValueError, match="0 \\(visible\\) and 1 \\(masked\\)"):
        model.reconstruct(wsi, {"rna": rna}, {"rna": masks_ok["rna"] + 2})
    with pytest.raises(ValueError, match=r"expected \[B, "):
        model.to_features("rna", np.zeros((b, 3)))


def test_to_features_averages_overlapping_groups(setup):
    cfg, groups, features, layouts, params, run = setup
    model = api.load(run / "checkpoints" / "3")
    entries = [f for fs in groups["rna"].values() for f in fs]
    assert len(entries) > len(set(entries))   # rna groups overlap
    grouped = np.random.default_rng(1).normal(size=(2, len(entries))).astype(np.float32)
    got = model.to_features("rna", grouped)
    assert got.shape == (2, len(features["rna"]))
    for j, f in enumerate(features["rna"]):
        cols = [i for i, e in enumerate(entries) if e == f]
        np.testing.assert_allclose(got[:, j], grouped[:, cols].mean(axis=1), rtol=1e-6, atol=1e-6)


def test_encoder_only_import_loads_without_decoders(setup, tmp_path):
    cfg, groups, features, layouts, params, run = setup
    out = tmp_path / "enc.safetensors"
    assert run_cli(["export", "--checkpoint", str(run), "--out", str(out), "--encoder-only"]) == 0
    assert run_cli(["import-torch", str(out), "--out", str(tmp_path / "imported")]) == 0
    enc = api.load(tmp_path / "imported")
    assert not enc.has_decoders and enc.step == 11
    wsi = np.random.default_rng(3).normal(size=(1, 5, cfg.model.wsi_dim))
    assert enc.encode(wsi).shape == (1, 1 + cfg.model.num_prototypes, cfg.model.hidden_size)
    with pytest.raises(ValueError, match="encoder-only"):
        enc.generate("rna", wsi)
    # ... and exports again (encoder-only: there is nothing else to export).
    assert run_cli(["export", "--checkpoint", str(tmp_path / "imported"), "--out", str(tmp_path / "again.pt")]) == 0
