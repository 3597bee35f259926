"""`morpheus finetune regress` end to end (metrics against SciPy / scikit-learn, the head's
export into the authors' module), its label errors, and the finetune.<key>=value overrides."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, r2_score
from conftest import FINETUNE_FAST as FAST
from conftest import run_cli

from morpheus_jax.apps import downstream as ds
from morpheus_jax.apps.finetune.cohort import Cohort
from morpheus_jax.apps.finetune.regress import RegressTask
from morpheus_jax.ckpt.checkpoint import read_checkpoint
from morpheus_jax.core.config import FinetuneConfig, load_finetune_config
from morpheus_jax.core.errors import ConfigError, DownstreamError


def run(*argv):
    return run_cli(argv)


@pytest.fixture
def setup(pretrained_cohort):
    return pretrained_cohort


def test_finetune_regress(setup, tmp_path):
    run_dir, data, _ = setup
    out = tmp_path / "reg"
    assert run("finetune", "regress", "--checkpoint", run_dir, "--dataset", data, "--task", "survival_months",
               "--modalities", "wsi,rna", "--folds", "3", *FAST, "finetune.epochs=3", "--out", out) == 0
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["submitter_id", "fold", "target", "prediction"]
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "survival_months" and res["folds"] == 3 and sorted(pred["fold"].unique()) == [0, 1, 2]
    assert res["settings"]["epochs"] == 3 and [len(h) for h in res["train_loss_per_epoch"]] == [3, 3, 3]
    assert res["settings"]["learning_rate"] == 2e-3                    # the flag, not overridden
    for k in range(3):
        fold = pred[pred["fold"] == k]
        assert res["pearson_r_per_fold"][k] == pytest.approx(pearsonr(fold["target"], fold["prediction"])[0],
                                                             abs=1e-8)
        assert res["mae_per_fold"][k] == pytest.approx(mean_absolute_error(fold["target"], fold["prediction"]),
                                                       rel=1e-8)
        assert res["r2_per_fold"][k] == pytest.approx(r2_score(fold["target"], fold["prediction"]), abs=1e-8)
    for m in ("pearson_r", "mae", "r2"):
        assert res[f"{m}_mean"] == pytest.approx(np.mean(res[f"{m}_per_fold"]))
        assert res[f"{m}_std"] == pytest.approx(np.std(res[f"{m}_per_fold"]))
    # Truth: survival_months of the cohort, fold by fold (KFold partitions it).
    root, manifest = ds.open_dataset(data)
    by_id = {r["submitter_id"]: r for r in ds.split_records(root, manifest, "fine-tune")}
    np.testing.assert_allclose(pred["target"], [by_id[s]["meta"]["survival_months"] for s in pred["submitter_id"]])
    _check_regression_export(out / "fold_1", pred[pred["fold"] == 1], by_id, root, tmp_path)


def _check_regression_export(step_dir, fold, by_id, root, tmp_path):
    """One output (final_layer.1.weight [1, H]); the torch module loads it with strict=True and
    output · target_std + target_mean (the head spec, also in the sidecar) reproduces the predictions."""
    torch = pytest.importorskip("torch")
    from morpheus_jax.ckpt.torch_files import read_weights
    from morpheus_jax.torch import from_export

    head = read_checkpoint(step_dir).spec.head
    assert head.n_outputs == 1 and head.loss == "mse" and head.task == "survival_months" and head.target_std > 0
    path = tmp_path / "regress.safetensors"
    assert run("export", "--checkpoint", step_dir, "--out", path) == 0
    side = json.loads(path.with_name(path.name + ".json").read_text())
    assert side["n_outputs"] == 1 and side["head"]["target_mean"] == head.target_mean
    sd, _ = read_weights(path)
    assert sd["final_layer.1.weight"].shape == (1, 32) and sd["final_layer.1.bias"].shape == (1,)
    module = from_export(path).eval()                  # load_state_dict(strict=True) inside
    recs = [by_id[s] for s in fold["submitter_id"]]
    got = np.zeros(len(recs))
    for b in ds.iter_batches(root, recs, ds.Inputs(True, ("rna",)), batch_size=8, min_bag=512):
        with torch.no_grad():
            y = module(torch.from_numpy(b["wsi"].astype(np.float32)), {"rna": torch.from_numpy(b["omics"]["rna"])},
                       torch.from_numpy(b["wsi_mask"]))
        valid = b["rows"] >= 0
        got[b["rows"][valid]] = y[:, 0].numpy()[valid] * head.target_std + head.target_mean
    np.testing.assert_allclose(got, fold["prediction"].to_numpy(), rtol=1e-4, atol=1e-3)


def test_regress_label_errors_are_one_line(setup, tmp_path, capsys):
    run_dir, data, _ = setup
    base = ["finetune", "regress", "--checkpoint", run_dir, "--dataset", data, "--out", tmp_path / "x"]
    for extra, message in ((["--task", "oncotree_code"], "column 'oncotree_code' must be numeric"),
                           (["--task", "grade"], "no column 'grade'"),
                           (["--task", "IDH", "finetune.epoch=3"], "unknown config key 'finetune.epoch'"),
                           (["--task", "IDH", "train.steps=3"], "overrides are finetune.<key>=value"),
                           (["--task", "IDH", "finetune.dropout=1.5"], "finetune.dropout (--dropout) must be in")):
        assert run(*base, *extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0 and err.startswith("morpheus "), (extra, err)


def _cohort(values) -> Cohort:
    return Cohort(None, ds.Inputs(True, ()), None, None, "fine-tune", [{"submitter_id": str(i)} for i in
                                                                         range(len(values))], {"age": list(values)})


def test_regress_labels():
    task = RegressTask("age", folds=2)
    with pytest.raises(DownstreamError, match="must be numeric"):
        task.prepare(_cohort([1.0, "old", 3.0, 4.0]), FinetuneConfig())
    with pytest.raises(DownstreamError, match="finite"):
        task.prepare(_cohort([1.0, float("inf"), 3.0, 4.0]), FinetuneConfig())
    with pytest.raises(DownstreamError, match="one value"):
        task.prepare(_cohort([2.0] * 6), FinetuneConfig())
    plan = task.prepare(_cohort(["1", 2, 3.5, 4, 8, 9]), FinetuneConfig(seed=0))
    assert sorted(np.concatenate([test for _, test in plan.parts]).tolist()) == list(range(6))
    fit = task.fit(plan.parts[0][0])
    train = task.y[plan.parts[0][0]]
    assert fit.head.target_mean == pytest.approx(train.mean()) and fit.head.target_std == pytest.approx(train.std())
    np.testing.assert_allclose(task.decode(fit.targets["target"][:, None], fit), task.y, rtol=1e-6)


def test_finetune_config_overrides_and_schema():
    cfg = load_finetune_config({"epochs": 5, "learning_rate": 1e-3}, ["finetune.epochs=2", "finetune.schedule=constant",
                                                                      "finetune.pretrained=false"])
    assert (cfg.epochs, cfg.learning_rate, cfg.schedule, cfg.pretrained) == (2, 1e-3, "constant", False)
    tc = cfg.train_config()
    assert (tc.learning_rate, tc.schedule, tc.weight_decay, tc.warmup_epochs) == (1e-3, "constant", 1e-2, 5)
    for overrides, message in ((["finetune.epochs=two"], "expected an integer"),
                               (["finetune.batch_size=6", "finetune.grad_accum_steps=4"], "must be a multiple"),
                               (["finetune.epochs=0"], "finetune.epochs (--epochs) must be at least 1"),
                               (["finetune=3"], "needs a key")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_finetune_config({}, overrides)
