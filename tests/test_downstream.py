"""Downstream commands end to end on a tiny synthetic cohort after a short pretraining:
embed, generate, evaluate reconstruction, finetune survival / classify, and their errors."""

import argparse
import json

import numpy as np
import pandas as pd
import pytest
from conftest import FINETUNE_FAST, TINY_DIM

import morpheus_jax
from morpheus_jax.apps import downstream as ds
from morpheus_jax.apps.finetune.protocol import few_shot_draw, stratified_folds
from morpheus_jax.apps.finetune.trainer import Finetuner
from morpheus_jax.ckpt.checkpoint import read_checkpoint
from morpheus_jax.cli.main import build_parser
from morpheus_jax.cli.main import main as cli_main
from morpheus_jax.core.config import FinetuneConfig
from morpheus_jax.metrics import survival as surv

DIM = TINY_DIM


@pytest.fixture
def setup(pretrained_cohort):
    return pretrained_cohort


def run(*argv):
    return cli_main([str(a) for a in argv])


# -- CLI -------------------------------------------------------------------------------------------

def _parsers(parser, name=""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield f"{name} {sub_name}".strip(), sub
                yield from _parsers(sub, f"{name} {sub_name}".strip())


def test_every_nested_flag_has_help():
    names = []
    for name, sub in _parsers(build_parser()):
        if name.split()[0] not in {"embed", "generate", "evaluate", "finetune"}:
            continue
        names.append(name)
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 8, f"{name}: {action.dest} has no help"
            for opt in action.option_strings:
                assert opt in text
    assert names == ["embed", "generate", "evaluate", "evaluate reconstruction", "finetune", "finetune survival",
                     "finetune classify", "finetune regress"]


# -- input checks ----------------------------------------------------------------------------------

def test_parse_modalities_and_availability():
    inp = ds.parse_modalities("cnv, wsi,rna", ("rna", "dnam", "cnv"))
    assert inp == ds.Inputs(True, ("rna", "cnv")) and inp.label == "wsi+rna+cnv"
    assert ds.parse_modalities("rna", ("rna",)) == ds.Inputs(False, ("rna",))
    with pytest.raises(ds.DownstreamError, match="checkpoint has no dnam tokenizer"):
        ds.parse_modalities("wsi,dnam", ("rna", "cnv"))
    with pytest.raises(ds.DownstreamError, match="unknown modality 'protein'"):
        ds.parse_modalities("wsi,protein", ("rna",))
    with pytest.raises(ds.DownstreamError, match="empty"):
        ds.parse_modalities(" , ", ("rna",))
    recs = [{"available": {"rna": a, "cnv": c}, "patch_count": n}
            for a, c, n in [(True, True, 5), (False, True, 5), (True, False, 5), (True, True, 0)]]
    lines = []
    kept = ds.keep_available(recs, ds.Inputs(True, ("rna", "cnv")), lines.append)
    assert kept == recs[:1]
    assert lines == ["excluded 3 of 4 patients (1 lacking rna, 1 lacking cnv, 1 lacking wsi)"]
    assert ds.keep_available(recs, ds.Inputs(False, ("cnv",)), lines.append) == [recs[0], recs[1], recs[3]]
    with pytest.raises(ds.DownstreamError, match="no patient has all of wsi\\+rna"):
        ds.keep_available(recs[1:2], ds.Inputs(True, ("rna",)), lines.append)


def test_folds_and_draws_are_the_authors():
    """Folds: scikit-learn's StratifiedKFold(shuffle, seed); few-shot draw i: pandas'
    groupby(label).sample(n=k, random_state=seed + i) over the cohort in metadata order."""
    from sklearn.model_selection import StratifiedKFold

    from morpheus_jax.apps.finetune.survival import precomputed_folds

    y = np.array([0] * 13 + [1] * 7)
    folds = stratified_folds(y, 5, seed=1)
    for i, (_, test) in enumerate(StratifiedKFold(5, shuffle=True, random_state=1).split(np.zeros(20), y)):
        assert sorted(np.flatnonzero(folds == i)) == sorted(test)
    assert not (stratified_folds(y, 5, seed=2) == folds).all()
    labels = ["IDHmut", "wt", "wt", "IDHmut", "wt", "wt", "IDHmut", "wt", "IDHmut", "wt", "wt", "IDHmut"]
    frame = pd.DataFrame({"label": labels})
    for i in range(3):
        train, test = few_shot_draw(labels, 3, draw=i, seed=7)
        want = frame.groupby("label").sample(n=3, random_state=7 + i).index
        assert train.tolist() == sorted(want) and np.union1d(train, test).size == 12 and test.size == 6
    assert not np.array_equal(train, few_shot_draw(labels, 3, draw=0, seed=7)[0])
    with pytest.raises(ds.DownstreamError, match="at least 2"):
        stratified_folds(y, 1, 0)
    with pytest.raises(ds.DownstreamError, match="fewer than the 8 folds"):
        stratified_folds(y, 8, 0)
    fold, n = precomputed_folds([2, 0, 1, 10, 2, "1"], "folds")
    assert n == 4 and fold.tolist() == [2, 0, 1, 3, 2, 1]
    with pytest.raises(ds.DownstreamError, match="'folds'.*at least 2"):
        precomputed_folds([3, 3], "folds")


# -- embed / generate ------------------------------------------------------------------------------

def test_embed_every_modality_subset(setup, tmp_path):
    run_dir, data, _ = setup
    model = morpheus_jax.load(run_dir)
    every = ds.split_records(data, ds.open_dataset(data)[1], "fine-tune")
    assert not all(all(r["available"].values()) for r in every)     # fine-tune patients lacking omics are kept
    for mods in ["wsi", "wsi,rna", "rna,dnam", "wsi,rna,dnam,cnv"]:
        inputs = ds.parse_modalities(mods, model.modalities)
        recs = ds.keep_available(every, inputs, lambda line: None)
        out = tmp_path / f"{mods.replace(',', '_')}.npz"
        assert run("embed", "--checkpoint", run_dir, "--dataset", data, "--modalities", mods, "--split", "fine-tune",
                   "--out", out) == 0
        z = np.load(out)
        assert z["embedding"].shape == (len(recs), 32) and z["submitter_id"].tolist() == [r["submitter_id"] for r in recs]
        if mods not in ("wsi,rna", "rna,dnam"):
            continue
        # Row 0 of the encoded sequence of one patient, every patch.
        r = recs[3]
        from morpheus_jax.data.pipeline import read_rows
        wsi = read_rows(data, r["split"], r["patch_shard"], r["patch_offset"],
                        r["patch_offset"] + r["patch_count"])[None] if inputs.wsi else None
        want = model.encode(wsi, {m: np.asarray(r["omics"][m])[None] for m in inputs.omics})[0, 0]
        np.testing.assert_allclose(z["embedding"][3], want, atol=2e-5)
    assert run("embed", "--checkpoint", run_dir, "--dataset", data, "--out", tmp_path / "all.npz") == 0
    counts = ds.open_dataset(data)[1].counts
    assert len(np.load(tmp_path / "all.npz")["submitter_id"]) == sum(counts.values())
    pytest.importorskip("pyarrow")
    assert run("embed", "--checkpoint", run_dir, "--dataset", data, "--split", "fine-tune",
               "--out", tmp_path / "e.parquet") == 0
    frame = pd.read_parquet(tmp_path / "e.parquet")
    assert list(frame.columns[:4]) == ["submitter_id", "project_id", "split", "emb_00"] and frame.shape[1] == 35
    np.testing.assert_allclose(frame.iloc[:, 3:].to_numpy(), np.load(tmp_path / "wsi.npz")["embedding"], atol=1e-6)


def test_generate_csv(setup, tmp_path):
    run_dir, data, _ = setup
    model = morpheus_jax.load(run_dir)
    out = tmp_path / "dnam.csv"
    assert run("generate", "--checkpoint", run_dir, "--dataset", data, "--target", "dnam", "--from", "wsi,cnv",
               "--split", "fine-tune", "--out", out) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["submitter_id"] + model.feature_names["dnam"]
    recs = ds.keep_available(ds.split_records(data, ds.open_dataset(data)[1], "fine-tune"), ds.Inputs(True, ("cnv",)),
                             lambda line: None)
    assert frame["submitter_id"].tolist() == [r["submitter_id"] for r in recs]
    r = recs[0]
    from morpheus_jax.data.pipeline import read_rows
    wsi = read_rows(data, r["split"], r["patch_shard"], r["patch_offset"], r["patch_offset"] + r["patch_count"])[None]
    want = model.to_features("dnam", model.generate("dnam", wsi, {"cnv": np.asarray(r["omics"]["cnv"])[None]}))[0]
    np.testing.assert_allclose(frame.iloc[0, 1:].to_numpy(float), want, atol=1e-4)
    # Omics only, no slides.
    assert run("generate", "--checkpoint", run_dir, "--dataset", data, "--target", "rna", "--from", "cnv",
               "--split", "val-pretrain", "--out", tmp_path / "rna.csv") == 0


def test_errors_are_one_line(setup, tmp_path, capsys):
    run_dir, data, root = setup
    cases = [
        (["generate", "--target", "rna", "--from", "wsi,rna"], "also an input"),
        (["generate", "--target", "protein"], "has decoders for rna, dnam, cnv"),
        (["embed", "--modalities", "wsi,atac"], "unknown modality 'atac'"),
        (["embed", "--split", "holdout"], "no patients in split 'holdout'"),
        (["embed", "--out", tmp_path / "e.txt"], ".parquet or .npz"),
        (["evaluate", "reconstruction", "--target", "rna", "--group-column", "grade"], "no column 'grade'"),
        (["evaluate", "reconstruction", "--target", "rna", "--group-column", "oncotree_code"], "exactly two values"),
        (["finetune", "survival", "--time-column", "os_days"], "no column 'os_days'"),
        (["finetune", "classify", "--task", "IDH", "--k", "100"], "more than 100 patients per class"),
        (["finetune", "classify", "--task", "IDH", "--linear-probe", "--no-pretrain"], "two baselines"),
    ]
    for argv, message in cases:
        head = argv[:2] if argv[0] in ("evaluate", "finetune") else argv[:1]
        extra = argv[len(head):]
        suffix = {"embed": ".npz", "generate": ".csv"}.get(head[0], "")
        out = [] if "--out" in extra else ["--out", tmp_path / f"x{suffix}"]
        assert run(*head, "--checkpoint", run_dir, "--dataset", data, *extra, *out) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0 and err.startswith("morpheus "), (argv, err)
    # A dataset lacking a modality the command needs.
    lacking = root / "ds_no_cnv"
    if not lacking.exists():
        lacking.mkdir()
        for name in ("records", "patches"):
            (lacking / name).symlink_to(data / name)
        manifest = json.loads((data / "manifest.json").read_text())
        del manifest["modalities"]["cnv"]
        (lacking / "manifest.json").write_text(json.dumps(manifest))
    assert run("embed", "--checkpoint", run_dir, "--dataset", lacking, "--modalities", "wsi,cnv",
               "--out", tmp_path / "e.npz") == 2
    assert "the dataset has no cnv data" in capsys.readouterr().err
    assert run("evaluate", "reconstruction", "--checkpoint", run_dir, "--dataset", lacking, "--target", "cnv",
               "--out", tmp_path / "r") == 2
    assert "no cnv data" in capsys.readouterr().err
    assert run("embed", "--checkpoint", tmp_path, "--dataset", data, "--out", tmp_path / "e.npz") == 2
    assert "not a MORPHEUS checkpoint" in capsys.readouterr().err


# -- reconstruction evaluation ---------------------------------------------------------------------

def test_evaluate_reconstruction(setup, tmp_path):
    run_dir, data, _ = setup
    out = tmp_path / "rna"
    assert run("evaluate", "reconstruction", "--checkpoint", run_dir, "--dataset", data, "--target", "rna",
               "--group-column", "IDH", "--out", out) == 0
    table = pd.read_csv(out / "reconstruction.csv")
    assert table["inputs"].tolist() == ["wsi", "wsi+dnam", "wsi+cnv", "wsi+dnam+cnv"]
    # The authors' thresholds, linspace(0.01, 0.9, 20).
    assert [c for c in table.columns if c.startswith("above_")] == [
        f"above_{t:g}" for t in np.round(np.linspace(0.01, 0.9, 20), 6)]
    assert (table["above_0.01"] >= table["above_0.9"]).all() and table["features"][0] > 0
    assert (out / "reconstruction.png").stat().st_size > 5000
    per_feature = pd.read_csv(out / "per_feature_r.csv")
    assert len(per_feature) == table["features"][0] and list(per_feature.columns[2:]) == table["inputs"].tolist()
    assert (per_feature["std"] > 0.15).all()
    np.testing.assert_allclose(per_feature["wsi"].median(), table["median_r"][0], atol=1e-5)   # NaN skipped
    assert (table["constant_predictions"] == per_feature[table["inputs"]].isna().sum().to_numpy()).all()
    report = json.loads((out / "reconstruction.json").read_text())
    assert report["group_column"] == "IDH" and report["group_levels"] == ["0", "1"]
    # Correlations over every fine-tune patient, also with a group column.
    assert report["patients"] == len(ds.keep_available(ds.split_records(data, ds.open_dataset(data)[1], "fine-tune"),
                                                        ds.Inputs(True, ("rna", "dnam", "cnv")), print))
    for row in report["rows"]:
        assert row["diff_significant"] > 0 and 0.0 <= row["diff_sign_agreement"] <= 1.0
        assert 0 <= row["diff_significant_in_both"] and 0.0 <= row["diff_authors_accuracy"] <= 1.0
    # WSI-only generation beats chance for every omics (synthetic CNV varies less than the paper's
    # std filter, so every feature is kept here).
    model = morpheus_jax.load(run_dir)
    recs = ds.split_records(data, ds.open_dataset(data)[1], "fine-tune")
    medians = {"rna": table["median_r"][0]}
    for target in ("dnam", "cnv"):
        pred = ds.generate(model, data, recs, target, [ds.Inputs(True, ())])[ds.Inputs(True, ())]
        truth = np.stack([r["omics"][target] for r in recs])
        rows, _, _ = ds.reconstruction_table({ds.Inputs(True, ()): pred}, truth, min_std=0.0)
        medians[target] = rows[0]["median_r"]
    print("WSI-only median r", medians)
    assert all(v > 0 for v in medians.values()), medians


def test_differential_agreement_on_known_data():
    rng = np.random.default_rng(0)
    group = np.arange(200) % 2 == 0
    truth = rng.normal(size=(200, 4))
    truth[group, 0] += 1.0                              # features 0 and 1 differ, 2 and 3 do not
    truth[group, 1] -= 1.0
    pred = truth.copy()
    pred[:, 1] *= -1                                    # sign of feature 1 flipped
    out = ds.differential_agreement(pred, truth, group)
    assert out["significant"] == 2 and out["sign_agreement"] == 0.5
    assert out["significant_in_both"] == 2 and out["authors_accuracy"] == 0.5   # TP 1 (feature 0), FN 1 (feature 1)
    pred[:, 0] = rng.normal(size=200)                    # feature 0 no longer significant in the prediction
    out = ds.differential_agreement(pred, truth, group)
    assert out["significant_in_both"] == 1 and out["authors_accuracy"] == 0.0


def test_reconstruction_metrics_are_the_authors():
    """std filter with ddof = 1; a constant prediction has no r (NaN), dropped from median and counts."""
    from morpheus_jax.metrics.reconstruction import THRESHOLDS, kept_features, reconstruction_summary

    assert np.allclose(THRESHOLDS, np.linspace(0.01, 0.9, 20))
    truth = np.array([[0.0, 0.0, 1.0], [0.3, 0.0, 2.0], [0.0, 0.0, 3.0]])
    assert kept_features(truth, 0.15).tolist() == [True, False, True]    # std ddof=1 of col 0: 0.173; ddof=0: 0.141
    pred = np.array([[0.0, 1.0, 5.0], [1.0, 1.0, 5.0], [0.0, 1.0, 5.0]])   # column 2 constant
    out = reconstruction_summary(pred, truth, min_std=0.15)
    assert out["num_features"] == 2 and out["constant_predictions"] == 1 and out["median_r"] == pytest.approx(1.0)
    assert reconstruction_summary(pred, truth, min_std=0.15, constant=0.0)["median_r"] == pytest.approx(0.5)


# -- fine-tuning -------------------------------------------------------------------------------------

def test_finetune_model_names_and_init(setup):
    run_dir, data, _ = setup
    ckpt = read_checkpoint(run_dir)
    root, manifest = ds.open_dataset(data)
    tr = Finetuner(ckpt, ds.Inputs(True, ("rna",)), 5, lambda o, b: o.sum(-1), FinetuneConfig(), root, manifest)
    heads = [n for n in tr.codec.names if n.startswith("final_layer.")]
    assert heads == ["final_layer.bias", "final_layer.kernel"]
    assert tr.codec.shapes["final_layer.kernel"] == (32, 5) and tr.codec.shapes["final_layer.bias"] == (5,)
    encoder = [n for n in tr.codec.names if n not in heads]
    assert set(encoder) <= set(ckpt.params)
    assert not any(n.startswith(("omics_decoders.", "omics_tokenizers.dnam", "omics_tokenizers.cnv")) for n in encoder)
    pre, scratch = tr.init_params(0), tr.init_params(0, pretrained=False)
    for n in encoder:
        np.testing.assert_array_equal(pre[n], ckpt.params[n])
    assert not np.allclose(scratch["global_token"], ckpt.params["global_token"])
    for n in heads:                                     # same head either way
        np.testing.assert_array_equal(pre[n], scratch[n])
    assert not np.array_equal(tr.init_params(1)["final_layer.kernel"], pre["final_layer.kernel"])


def test_finetune_model_matches_torch_encoder(setup):
    """Our fine-tuning model = the authors' MorpheusProtoEncoder with final_layer.1 = kernelᵀ."""
    torch = pytest.importorskip("torch")
    from morpheus_jax.ckpt.torch_layout import group_sizes, to_torch
    from morpheus_jax.torch.model import MorpheusProtoEncoder

    run_dir, data, _ = setup
    ckpt = read_checkpoint(run_dir)
    root, manifest = ds.open_dataset(data)
    tr = Finetuner(ckpt, ds.Inputs(True, ("cnv",)), 3, lambda o, b: o.sum(-1), FinetuneConfig(), root, manifest)
    params = {k: np.asarray(v) for k, v in tr.init_params(0).items()}
    sd = to_torch(params, tr.layouts, tr.cfg, encoder_only=True)
    np.testing.assert_array_equal(sd["final_layer.1.weight"], params["final_layer.kernel"].T)
    from morpheus_jax.ckpt.torch_layout import from_torch
    back = from_torch(sd, tr.layouts, tr.cfg, decoders=False)
    assert set(back) == set(params) and all(np.array_equal(back[k], params[k]) for k in params)
    m = tr.cfg
    module = MorpheusProtoEncoder(group_sizes(tr.layouts), hidden_size=m.hidden_size, num_prototypes=m.num_prototypes,
                                  wsi_dim=m.wsi_dim, group_hidden=m.group_hidden, encoder_layers=m.encoder_layers,
                                  encoder_heads=m.encoder_heads, encoder_mlp_dim=m.encoder_mlp_dim, n_outputs=3)
    module.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)
    module.eval()
    recs = ds.split_records(root, manifest, "fine-tune")[:5]
    want = tr.predict(tr.init_params(0), recs)
    batch = next(ds.iter_batches(root, recs, tr.inputs, batch_size=5, min_bag=512))
    with torch.no_grad():
        got = module(torch.from_numpy(batch["wsi"].astype(np.float32)),
                     {"cnv": torch.from_numpy(batch["omics"]["cnv"])}, torch.from_numpy(batch["wsi_mask"]))
    np.testing.assert_allclose(got.numpy()[np.argsort(batch["rows"])], want, atol=2e-4)


def test_finetune_survival_pretrained_vs_scratch(setup, tmp_path):
    run_dir, data, _ = setup
    results = {}
    for name, extra in (("pre", []), ("scratch", ["--no-pretrain"])):
        out = tmp_path / name
        assert run("finetune", "survival", "--checkpoint", run_dir, "--dataset", data, "--modalities", "wsi",
                   "--folds", "3", *FINETUNE_FAST, *extra, "--out", out) == 0
        pred = pd.read_csv(out / "predictions.csv")
        assert list(pred.columns) == ["submitter_id", "fold", "risk", "time", "event", "bin"]
        assert sorted(pred["fold"].unique()) == [0, 1, 2] and set(pred["event"]) == {0, 1}
        res = json.loads((out / "results.json").read_text())
        assert len(res["c_index_per_fold"]) == 3 and len(res["time_cuts"]) == 3
        # Each held-out patient's label under its fold's cuts, fitted on the other folds (pycox's transform).
        for k, cuts in enumerate(res["time_cuts"]):
            train, test = pred[pred["fold"] != k], pred[pred["fold"] == k]
            assert cuts == surv.km_quantile_cuts(train["time"], train["event"], 5).tolist()
            idx, _ = surv.discrete_time_labels(test["time"], test["event"], cuts)
            assert test["bin"].tolist() == idx.tolist()
        assert res["c_index_mean"] == pytest.approx(np.mean(res["c_index_per_fold"]))
        assert res["c_index_std"] == pytest.approx(np.std(res["c_index_per_fold"]))
        assert res["settings"]["epochs"] == 6 and len(res["train_loss_per_epoch"][0]) == 6
        results[name] = (pred, res)
    pre, scratch = results["pre"], results["scratch"]
    assert pre[0]["fold"].tolist() == scratch[0]["fold"].tolist()           # same folds
    assert pre[0][["submitter_id", "time", "event", "bin"]].equals(scratch[0][["submitter_id", "time", "event", "bin"]])
    assert pre[1]["method"] == "finetune" and scratch[1]["method"] == "no_pretrain"
    # Each fold's c-index is scikit-survival's on the written predictions (rounded to 6 digits
    # in the CSV), and the two runs differ: the pretrained weights reached the head.
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    for pred, res in (pre, scratch):
        for k in range(3):
            fold = pred[pred["fold"] == k]
            want = sksurv_metrics.concordance_index_censored(fold["event"].astype(bool).to_numpy(),
                                                             fold["time"].to_numpy(), fold["risk"].to_numpy())[0]
            assert res["c_index_per_fold"][k] == pytest.approx(want, abs=2e-3)
    assert not np.allclose(pre[0]["risk"], scratch[0]["risk"])
    _check_fine_tuned_exports(tmp_path / "pre", data, pre[0], tmp_path)


def _check_fine_tuned_exports(out, data, pred, tmp_path):
    """Each fold left a checkpoint in the pretraining store (no optimizer state); `morpheus
    export` turns one into the authors' fine-tuning layout, which the torch encoder loads
    with strict=True (from_export) and whose outputs reproduce the fold's predictions."""
    torch = pytest.importorskip("torch")
    from morpheus_jax.torch import from_export

    for k in range(3):
        ckpt = read_checkpoint(out / f"fold_{k}")
        assert ckpt.params["final_layer.kernel"].shape == (32, 5) and not ckpt.decoders   # 5 cut points
        assert ckpt.spec.head.task == "survival" and ckpt.spec.head.n_outputs == 5
    path = tmp_path / "fold1.safetensors"
    assert run("export", "--checkpoint", out / "fold_1", "--out", path) == 0
    side = json.loads(path.with_name(path.name + ".json").read_text())
    assert side["has_head"] and side["n_outputs"] == 5 and side["module"] == "MorpheusProtoEncoder"
    from morpheus_jax.ckpt.torch_files import read_weights
    sd, _ = read_weights(path)
    assert sd["final_layer.1.weight"].shape == (5, 32) and sd["final_layer.1.bias"].shape == (5,)
    module = from_export(path).eval()                  # load_state_dict(strict=True) inside
    assert module.final_layer[1].out_features == 5
    root, manifest = ds.open_dataset(data)
    fold = pred[pred["fold"] == 1]
    by_id = {r["submitter_id"]: r for r in ds.split_records(root, manifest, "fine-tune")}
    recs = [by_id[s] for s in fold["submitter_id"]]
    got = np.zeros(len(recs))
    for b in ds.iter_batches(root, recs, ds.Inputs(True, ()), batch_size=8, min_bag=512):
        with torch.no_grad():
            out_t = module(torch.from_numpy(b["wsi"].astype(np.float32)), {}, torch.from_numpy(b["wsi_mask"]))
        valid = b["rows"] >= 0
        got[b["rows"][valid]] = out_t.numpy().sum(-1)[valid]
    np.testing.assert_allclose(got, fold["risk"].to_numpy(), rtol=1e-4, atol=1e-4)


def _check_binary_export(step_dir, data, pred, tmp_path):
    """A two-class head exports as the authors' one-logit layer (final_layer.1.weight [1, H]);
    the torch module loads it with strict=True and its sigmoid reproduces prob_1."""
    torch = pytest.importorskip("torch")
    from morpheus_jax.ckpt.torch_files import read_weights
    from morpheus_jax.torch import from_export

    path = tmp_path / "binary.safetensors"
    assert run("export", "--checkpoint", step_dir, "--out", path) == 0
    sd, _ = read_weights(path)
    assert sd["final_layer.1.weight"].shape == (1, 32) and sd["final_layer.1.bias"].shape == (1,)
    module = from_export(path).eval()
    root, manifest = ds.open_dataset(data)
    by_id = {r["submitter_id"]: r for r in ds.split_records(root, manifest, "fine-tune")}
    recs = [by_id[s] for s in pred["submitter_id"]]
    got = np.zeros(len(recs))
    for b in ds.iter_batches(root, recs, ds.Inputs(True, ("dnam",)), batch_size=8, min_bag=512):
        with torch.no_grad():
            logit = module(torch.from_numpy(b["wsi"].astype(np.float32)), {"dnam": torch.from_numpy(b["omics"]["dnam"])},
                           torch.from_numpy(b["wsi_mask"]))
        valid = b["rows"] >= 0
        got[b["rows"][valid]] = torch.sigmoid(logit[:, 0]).numpy()[valid]
    np.testing.assert_allclose(got, pred["prob_1"].to_numpy(), atol=1e-4)


def test_fit_is_deterministic(setup):
    run_dir, data, _ = setup
    ckpt = read_checkpoint(run_dir)
    root, manifest = ds.open_dataset(data)
    recs = ds.split_records(root, manifest, "fine-tune")[:12]
    s = FinetuneConfig(epochs=2, batch_size=8, learning_rate=1e-3, num_patches=16)
    tr = Finetuner(ckpt, ds.Inputs(True, ("rna",)), 2, lambda o, b: o[:, 0] * b["sign"], s, root, manifest)
    target = {"sign": np.where(np.arange(12) % 2, 1.0, -1.0).astype(np.float32)}
    (a, la), (b, lb) = tr.fit(recs, target, run=0), tr.fit(recs, target, run=0)
    assert la == lb and len(la) == 2
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])


def test_finetune_classify(setup, tmp_path):
    run_dir, data, _ = setup
    base = ["finetune", "classify", "--checkpoint", run_dir, "--dataset", data, *FINETUNE_FAST]
    assert run(*base, "--task", "IDH", "--k", "4", "--draws", "2", "--modalities", "wsi,dnam",
               "--out", tmp_path / "few") == 0
    res = json.loads((tmp_path / "few" / "results.json").read_text())
    assert res["mode"] == "few-shot" and res["classes"] == ["0", "1"] and len(res["roc_auc_per_draw"]) == 2
    assert all(0 <= v <= 1 for v in res["roc_auc_per_draw"] + res["balanced_accuracy_per_draw"])
    pred = pd.read_csv(tmp_path / "few" / "predictions.csv")
    assert list(pred.columns) == ["submitter_id", "draw", "support", "label", "predicted", "prob_0", "prob_1"]
    n = res["patients"]
    assert (pred.groupby("draw").size() == n).all() and (pred.groupby("draw")["support"].sum() == 8).all()
    assert (pred[pred["support"] == 1].groupby(["draw", "label"]).size() == 4).all()
    for i in range(2):                   # each draw's fine-tuned model: two classes, one logit (BCE)
        ckpt = read_checkpoint(tmp_path / "few" / f"draw_{i}")
        assert ckpt.params["final_layer.kernel"].shape[1] == 1 and ckpt.spec.head.classes == ("0", "1")
        assert ckpt.spec.head.loss == "bce" and ckpt.spec.head.n_outputs == 1
    np.testing.assert_allclose(pred[["prob_0", "prob_1"]].sum(axis=1), 1.0, atol=1e-5)
    _check_binary_export(tmp_path / "few" / "draw_0", data, pred[pred["draw"] == 0], tmp_path)

    assert run(*base, "--task", "IDH", "--k", "4", "--draws", "2", "--modalities", "wsi,dnam", "--linear-probe",
               "--out", tmp_path / "probe") == 0
    probe = pd.read_csv(tmp_path / "probe" / "predictions.csv")
    assert probe["submitter_id"].tolist() == pred["submitter_id"].tolist()   # same draws
    assert json.loads((tmp_path / "probe" / "results.json").read_text())["method"] == "linear_probe"

    assert run(*base, "--task", "oncotree_code", "--full", "--folds", "2", "--no-pretrain", "--modalities", "rna",
               "--out", tmp_path / "full") == 0
    res = json.loads((tmp_path / "full" / "results.json").read_text())
    assert res["mode"] == "full" and res["classes"] == ["SYNX", "SYNY", "SYNZ"] and len(res["roc_auc_per_fold"]) == 2
    assert res["method"] == "no_pretrain" and "roc_auc_mean" in res and "balanced_accuracy_std" in res
