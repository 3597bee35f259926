"""A modality is data: a fourth omics modality added to a synthetic cohort through files only
(its CSV and mapping beside the others) goes through prepare, pretraining, generation,
reconstruction evaluation, export to the PyTorch module and import back. The package names
the paper's three modalities only; this one (``"prot"``, values tied to the RNA signal so
there is something to learn) is known to nothing in ``morpheus_jax/``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

import pytest
from conftest import TINY_DIM, TINY_OVERRIDES

from morpheus_jax.cli.main import main
from morpheus_jax.core.log import read_jsonl

NEW = "prot"


def _add_modality(raw: Path, rng: np.random.Generator) -> dict:
    """omics/prot.csv (12 proteins in 3 groups, a few missing cells) and mappings/prot.json."""
    rna = pd.read_csv(raw / "omics" / "rna.csv", index_col=0)
    mix = rng.normal(size=(rna.shape[1], 12)) / np.sqrt(rna.shape[1])
    values = rna.to_numpy() @ mix + 0.1 * rng.normal(size=(len(rna), 12))
    table = pd.DataFrame(values, index=rna.index, columns=[f"PROT{i:02d}" for i in range(12)]).round(4)
    table.iloc[3, 2] = np.nan
    table.to_csv(raw / "omics" / f"{NEW}.csv")
    groups = {"P_A": [f"PROT{i:02d}" for i in range(0, 5)], "P_B": [f"PROT{i:02d}" for i in range(5, 9)],
              "P_C": [f"PROT{i:02d}" for i in range(9, 12)] + ["PROT00"]}
    (raw / "mappings" / f"{NEW}.json").write_text(json.dumps(groups))
    return groups


def test_no_package_file_names_the_new_modality():
    root = Path(__file__).resolve().parents[1] / "morpheus_jax"
    assert not [p for p in root.rglob("*.py") if f'"{NEW}"' in p.read_text() or f"'{NEW}'" in p.read_text()]


@pytest.mark.slow
def test_a_fourth_modality_through_files_only(tmp_path_factory, capsys):
    torch = pytest.importorskip("torch")
    from conftest import synth_dataset

    root = tmp_path_factory.mktemp("fourth")
    synth_dataset(root, patients=48, seed=21, dim=TINY_DIM, patches_per_slide=30)
    raw = root / "raw"
    groups = _add_modality(raw, np.random.default_rng(0))
    ds = root / "ds4"
    assert main(["prepare", "--raw", str(raw), "--out", str(ds), "--wsi-dim", str(TINY_DIM), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"modality '{NEW}' has no built-in spec" in out
    manifest = json.loads((ds / "manifest.json").read_text())
    assert list(manifest["modalities"]) == ["rna", "dnam", "cnv", NEW]
    assert manifest["modalities"][NEW]["spec"] == {"fill": 0.0, "transform": "identity", "min": None, "max": None,
                                                   "value": "value"}
    assert manifest["modalities"]["cnv"]["spec"]["transform"] == "log10(cn/2+1)"
    assert list(manifest["modalities"][NEW]["groups"]) == list(groups)

    run = root / "run"
    assert main(["pretrain", "--no-progress", f"data.dir={ds}", "data.raw_dir=null", f"run_dir={run}",
                 *TINY_OVERRIDES, "train.steps=4", "checkpoint.every=4"]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(np.isfinite(r[f"loss_{NEW}"]) for r in rows if "loss" in r)
    assert rows[-1]["loss"] == pytest.approx(sum(rows[-1][f"loss_{m}"] for m in ("rna", "dnam", "cnv", NEW)), rel=1e-5)

    gen = root / "gen.csv"
    assert main(["generate", "--checkpoint", str(run), "--dataset", str(ds), "--target", NEW, "--out", str(gen)]) == 0
    table = pd.read_csv(gen)
    assert list(table.columns) == ["submitter_id", *manifest["modalities"][NEW]["features"]]
    assert np.isfinite(table.iloc[:, 1:].to_numpy()).all()
    capsys.readouterr()
    rec = root / "rec"
    assert main(["evaluate", "reconstruction", "--checkpoint", str(run), "--dataset", str(ds), "--target", NEW,
                 "--out", str(rec)]) == 0
    assert any(rec.iterdir())

    weights = root / "m.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(weights)]) == 0
    sidecar = json.loads(weights.with_name("m.safetensors.json").read_text())
    assert sidecar["modalities"] == ["rna", "dnam", "cnv", NEW]
    from morpheus_jax.torch import from_export

    model = from_export(weights)                               # load_state_dict(strict=True) inside
    assert set(model.modalities) == {"rna", "dnam", "cnv", NEW}
    back = root / "back"
    assert main(["import-torch", str(weights), "--out", str(back)]) == 0
    from morpheus_jax.ckpt.checkpoint import read_checkpoint

    a, b = read_checkpoint(run), read_checkpoint(back)
    assert set(a.params) == set(b.params)
    for name in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[name]), np.asarray(b.params[name]), err_msg=name)
    del torch


def test_a_modality_spec_file_sets_fill_transform_and_range(tmp_path, capsys):
    from conftest import synth_dataset

    synth_dataset(tmp_path, patients=24, seed=3, dim=TINY_DIM, patches_per_slide=10)
    raw = tmp_path / "raw"
    _add_modality(raw, np.random.default_rng(1))
    table = pd.read_csv(raw / "omics" / f"{NEW}.csv", index_col=0)
    table = table - table.min().min()            # non-negative, for log2(x+1) and a range
    table.iloc[3, 2] = np.nan
    table.to_csv(raw / "omics" / f"{NEW}.csv")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"{NEW}:\n  fill: 0.5\n  transform: log2(x+1)\n  min: 0\n  value: protein level\n")
    args = ["prepare", "--raw", str(raw), "--out", str(tmp_path / "ds1"), "--wsi-dim", str(TINY_DIM), "--no-progress",
            "--modality-spec", str(spec)]
    assert main(args) == 0
    assert "no built-in spec" not in capsys.readouterr().out
    manifest = json.loads((tmp_path / "ds1" / "manifest.json").read_text())
    info = manifest["modalities"][NEW]
    assert info["spec"]["transform"] == "log2(x+1)" and info["spec"]["fill"] == 0.5 and info["missing_filled"] == 1
    # The stored values: the spec applied (checked on the records against the CSV).
    from morpheus_jax.data import records as rec
    from morpheus_jax.data.pipeline import read_split

    man = rec.load_manifest(tmp_path / "ds1")
    stored = {r["submitter_id"]: r["omics"][NEW] for r in read_split(tmp_path / "ds1", "pretrain", man)}
    sid = next(iter(stored))
    want = np.log2(np.nan_to_num(table.loc[sid, info["features"]].to_numpy(float), nan=0.5) + 1.0)
    np.testing.assert_allclose(np.asarray(stored[sid], np.float64), want, rtol=1e-6)
    # A value outside the stated range is one line naming the file, the column and the patient.
    table.iloc[0, 0] = -1.0
    table.to_csv(raw / "omics" / f"{NEW}.csv")
    assert main([*args[:4], str(tmp_path / "ds2"), *args[5:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{NEW}.csv" in err[0] and "negative protein level -1" in err[0] and table.index[0] in err[0]
    spec.write_text(f"{NEW}:\n  transform: sqrt\n")
    assert main([*args[:4], str(tmp_path / "ds3"), *args[5:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(spec) in err[0] and "transform 'sqrt'" in err[0]
