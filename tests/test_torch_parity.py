"""The PyTorch model (morpheus_jax.torch) loaded from an export computes what the JAX model
computes: encode, generate and reconstruct with explicit masks, padded bags, 2 encoder and 2
decoder layers, 2 / 4 heads, random non-trivial weights."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import named_setup, random_params, run_cli, save_checkpoint  # noqa: E402

from morpheus_jax import api  # noqa: E402
from morpheus_jax.torch import MorpheusProto, MorpheusProtoEncoder, from_export  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)
B, N = 3, 21


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg, groups, features, layouts = named_setup(encoder_layers=2, decoder_layers=2, encoder_heads=2,
                                                 decoder_heads=4)
    params = random_params(cfg, layouts, seed=5)
    tmp = tmp_path_factory.mktemp("parity")
    save_checkpoint(tmp / "run", cfg, groups, features, params, optimizer=False)
    assert run_cli(["export", "--checkpoint", str(tmp / "run"), "--out", str(tmp / "m.safetensors")]) == 0
    assert run_cli(["export", "--checkpoint", str(tmp / "run"), "--out", str(tmp / "enc.pt"), "--encoder-only",
                    "--modalities", "rna"]) == 0
    jm = api.load(tmp / "run")
    tm = from_export(tmp / "m.safetensors").eval()
    assert isinstance(tm, MorpheusProto)

    rng = np.random.default_rng(7)
    wsi = rng.normal(size=(B, N, cfg.model.wsi_dim)).astype(np.float32)
    mask = np.ones((B, N), bool)
    mask[0, 13:] = False
    mask[2, 4:] = False
    wsi[~mask] = 1e3 * rng.normal(size=(int((~mask).sum()), cfg.model.wsi_dim))   # garbage under the mask
    omics = {m: rng.normal(size=(B, lay.num_features)).astype(np.float32) for m, lay in layouts.items()}
    return dict(cfg=cfg, layouts=layouts, jm=jm, tm=tm, wsi=wsi, mask=mask, omics=omics, tmp=tmp, rng=rng)


SUBSETS = {"wsi": (), "wsi+rna": ("rna",), "wsi+all": ("rna", "dnam", "cnv")}


def _omics(pair, subset):
    return {m: pair["omics"][m] for m in subset}


@pytest.mark.parametrize("name", SUBSETS)
def test_encode(pair, name):
    omics = _omics(pair, SUBSETS[name])
    want = pair["jm"].encode(pair["wsi"], omics, pair["mask"])
    t = sum(pair["layouts"][m].num_groups for m in omics)
    assert want.shape == (B, 1 + pair["cfg"].model.num_prototypes + t, pair["cfg"].model.hidden_size)
    with torch.no_grad():
        got = pair["tm"].encode(torch.from_numpy(pair["wsi"]), omics, torch.from_numpy(pair["mask"]))
    np.testing.assert_allclose(got.numpy(), want, **TOL)


@pytest.mark.parametrize("name,target", [("wsi", "rna"), ("wsi+rna", "cnv"), ("wsi+all", "dnam")])
def test_generate(pair, name, target):
    omics = _omics(pair, SUBSETS[name])
    want = pair["jm"].generate(target, pair["wsi"], omics, pair["mask"])
    assert want.shape == (B, pair["layouts"][target].total_size)
    with torch.no_grad():
        got = pair["tm"].generate(target, pair["wsi"], omics, pair["mask"])
        np.testing.assert_allclose(got.numpy(), want, **TOL)
        np.testing.assert_allclose(pair["tm"].to_features(target, got).numpy(),
                                   pair["jm"].to_features(target, want), **TOL)


@pytest.mark.parametrize("name", SUBSETS)
def test_reconstruct_with_explicit_masks(pair, name):
    subset = SUBSETS[name]
    omics = _omics(pair, subset)
    rng = np.random.default_rng(len(subset))
    masks = {m: rng.integers(0, 2, size=(B, pair["layouts"][m].num_groups)) for m in subset}
    if "rna" in masks:
        masks["rna"][0] = 1      # a sample with every rna token masked
        masks["rna"][1] = 0      # and one with none
    want = pair["jm"].reconstruct(pair["wsi"], omics, masks, pair["mask"])
    assert set(want) == {"rna", "dnam", "cnv"}
    with torch.no_grad():
        got = pair["tm"].reconstruct(pair["wsi"], omics, masks, pair["mask"])
    for m in want:
        assert want[m].shape == (B, pair["layouts"][m].total_size)
        np.testing.assert_allclose(got[m].numpy(), want[m], **TOL, err_msg=m)


def test_encoder_only_export_loads_into_fine_tuning_model(pair):
    enc = from_export(pair["tmp"] / "enc.pt").eval()
    assert isinstance(enc, MorpheusProtoEncoder) and enc.final_layer is None and enc.modalities == ("rna",)
    omics = _omics(pair, ("rna",))
    want = pair["jm"].encode(pair["wsi"], omics, pair["mask"])[:, 0]
    with torch.no_grad():
        np.testing.assert_allclose(enc(pair["wsi"], omics, pair["mask"]).numpy(), want, **TOL)
    # A head for a new task: encoder keys strict, fresh final_layer; from the full export too.
    clf = from_export(pair["tmp"] / "m.safetensors", n_outputs=3, modalities=["rna"]).eval()
    assert tuple(clf.final_layer[1].weight.shape) == (3, pair["cfg"].model.hidden_size)
    with torch.no_grad():
        np.testing.assert_allclose(clf(pair["wsi"], omics, pair["mask"], return_embedding=True).numpy(), want, **TOL)
        assert clf(pair["wsi"], omics, pair["mask"]).shape == (B, 3)


def test_masked_tokens_are_hidden_from_the_torch_encoder(pair):
    """Masking every dnam and cnv group equals not giving them (their rows come back zero)."""
    tm, wsi, mask = pair["tm"], pair["wsi"], pair["mask"]
    lay = pair["layouts"]
    masks = {"rna": np.zeros((B, lay["rna"].num_groups), int), "dnam": np.ones((B, lay["dnam"].num_groups), int),
             "cnv": np.ones((B, lay["cnv"].num_groups), int)}
    with torch.no_grad():
        full = tm.encode(wsi, pair["omics"], mask, token_mask=masks)
        rna_only = tm.encode(wsi, _omics(pair, ("rna",)), mask)
    k = rna_only.shape[1]
    np.testing.assert_allclose(full[:, :k].numpy(), rna_only.numpy(), atol=1e-5)
    assert torch.all(full[:, k:] == 0)


def test_training_mode_dropout_and_gradients(pair):
    cfg, layouts = pair["cfg"], pair["layouts"]
    torch.manual_seed(0)
    model = MorpheusProto({m: dict(zip(lay.group_names, lay.sizes)) for m, lay in layouts.items()},
                          **{k: getattr(cfg.model, k) for k in ("hidden_size", "num_prototypes", "wsi_dim",
                                                                  "group_hidden", "encoder_heads", "decoder_heads")},
                          encoder_dropout=0.3)
    model.train()
    wsi = torch.randn(2, 9, cfg.model.wsi_dim)
    omics = {m: torch.randn(2, lay.total_size) for m, lay in layouts.items()}   # sizes only: group entries
    masks = {m: torch.randint(0, 2, (2, lay.num_groups)) for m, lay in layouts.items()}
    a, b = model(wsi, omics, masks), model(wsi, omics, masks)
    assert any(not torch.equal(a[m], b[m]) for m in a)            # dropout is on
    loss = sum((a[m] - omics[m]).abs().mean() for m in a)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="unknown omics modalities"):
        model.encode(wsi, {"protein": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"expected \[B, "):
        model.encode(wsi, {"rna": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="'.'"):
        MorpheusProto({"rna": {"a.b": 3}})


def test_torch_subpackage_does_not_import_jax():
    code = "import sys, morpheus_jax.torch; assert 'jax' not in sys.modules and 'flax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
