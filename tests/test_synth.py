"""Tests for the synthetic cohort writer: layout, splits, omics, determinism, signal."""

import ast
import json
import re
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from morpheus_jax.core.names import MODALITIES
from morpheus_jax.data.synth import write_synthetic_cohort

FIXTURES = Path(__file__).parent.parent / "morpheus_jax" / "configs"
SMALL = dict(n_patients=120, feature_dim=16, mean_patches_per_slide=64, progress=False,
             empty_slide_fraction=0.05)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    summary = write_synthetic_cohort(out, seed=3, **SMALL)
    return out, summary, pd.read_csv(out / "metadata.csv"), np.load(out / "truth.npz")


def _omics(out, m):
    return pd.read_csv(out / "omics" / f"{m}.csv", index_col=0)


def _mapping(out, m):
    return json.loads((out / "mappings" / f"{m}.json").read_text())


def _bag(path):
    with h5py.File(path) as f:
        x = f["features"][()]
    return x.reshape(-1, x.shape[-1])


def test_layout_and_slide_files(cohort):
    out, summary, meta, _ = cohort
    assert list(meta.columns) == ["submitter_id", "project_id", "split", "WSI",
                                  "survival_months", "censorship", "oncotree_code", "IDH"]
    assert len(meta) == 120 and meta.submitter_id.is_unique
    assert all(re.fullmatch(r"TCGA-[A-Z0-9]{2}-\d{4}", s) for s in meta.submitter_id)
    assert set(meta.project_id) == {"TCGA-SYNA", "TCGA-SYNB", "TCGA-SYNC", "TCGA-SYND"}

    shapes, dtypes, n_patches, listed = set(), set(), 0, set()
    for sid, project, wsi in zip(meta.submitter_id, meta.project_id, meta.WSI):
        files = ast.literal_eval(wsi)
        assert len(files) <= 3
        for rel in files:
            assert rel.startswith(f"{project}/{sid}-01Z-00-DX") and rel.endswith(".h5")
            listed.add(rel)
            with h5py.File(out / "features" / rel) as f:
                x, c = f["features"], f["coords"]
                assert x.ndim in (2, 3) and c.ndim == x.ndim
                if x.ndim == 3:
                    assert x.shape[0] == 1 and c.shape[0] == 1
                n = x.shape[-2]
                assert x.shape[-1] == 16 and c.shape[-2:] == (n, 2)
                assert 16 <= n <= 8 * 64
                coords = c[()].reshape(-1, 2)
                assert c.dtype == np.int32 and np.all(coords % 256 == 0)
                assert len(np.unique(coords, axis=0)) == n
                shapes.add(x.ndim)
                dtypes.add(x.dtype)
                n_patches += n
    assert shapes == {2, 3}
    assert dtypes == {np.dtype(np.float32), np.dtype(np.float16)}
    assert (meta.WSI == "[]").sum() >= 1
    on_disk = {str(p.relative_to(out / "features")) for p in (out / "features").rglob("*")
               if p.is_file()}
    assert on_disk == listed  # no stray or temporary files
    assert summary["n_slides"] == len(listed) and summary["n_patches"] == n_patches


def test_splits_stratified_by_project(cohort):
    _, summary, meta, _ = cohort
    table = pd.crosstab(meta.project_id, meta.split)
    assert set(table.columns) == {"pretrain", "val-pretrain", "fine-tune"}
    assert (table > 0).all().all()
    size = table.sum(axis=1)
    assert np.all(np.abs(table["fine-tune"] / size - 0.4) <= 0.5 / size + 1e-9)
    assert table["val-pretrain"].sum() >= 8
    assert summary["splits"] == meta.split.value_counts().to_dict()


def test_omics_tables_and_mappings(cohort):
    out, _, meta, _ = cohort
    missing = 0
    for m in MODALITIES:
        df, mapping = _omics(out, m), _mapping(out, m)
        header = (out / "omics" / f"{m}.csv").read_text().split("\n", 1)[0]
        assert header.startswith("submitter_id,")
        assert set(df.index) <= set(meta.submitter_id) and len(df) >= 0.85 * len(meta)
        missing += len(meta) - len(df)
        features = [f for group in mapping.values() for f in group]
        unique = set(features)
        assert unique <= set(df.columns)
        assert 0.05 <= (df.shape[1] - len(unique)) / len(unique) <= 0.15  # unmapped extras
        assert all(len(set(g)) == len(g) and len(g) >= 8 for g in mapping.values())
        if m == "rna":
            assert len(features) > 1.3 * len(unique)  # genes shared across pathways
            assert list(mapping)[0] == "HALLMARK_SYN_01"
        else:
            assert len(features) == len(unique)  # disjoint
            assert all(g.startswith("chr") for g in mapping)
    assert missing > 0

    rna = _omics(out, "rna").to_numpy()
    assert not np.isnan(rna).any()
    assert np.abs(rna.mean(0)).max() < 1e-3 and np.all(rna.std(0) > 0.1)

    dnam = _omics(out, "dnam").to_numpy()
    assert np.nanmin(dnam) >= 0 and np.nanmax(dnam) <= 1
    assert 0.005 < np.isnan(dnam).mean() < 0.05
    assert np.nanmean(dnam < 0.3) > 0.2 and np.nanmean(dnam > 0.7) > 0.2  # bimodal

    cnv = _omics(out, "cnv").to_numpy()
    assert 0.005 < np.isnan(cnv).mean() < 0.05
    v = cnv[~np.isnan(cnv)]
    assert np.all(v == np.round(v)) and v.min() >= 0 and v.max() <= 10
    assert 0.6 < np.mean(v == 2) < 0.9 and len(np.unique(v)) >= 3
    assert any(";" in g for g in _mapping(out, "cnv"))


def test_outcomes(cohort):
    _, _, meta, truth = cohort
    assert set(meta.censorship) == {0, 1} and 0.15 < meta.censorship.mean() < 0.45
    assert (meta.survival_months > 0).all()
    assert 15 < np.median(truth["event_months"]) < 60
    assert set(meta.IDH) == {0, 1} and 0.15 < meta.IDH.mean() < 0.45
    assert meta.oncotree_code.nunique() == 3
    assert meta.oncotree_code.value_counts(normalize=True).min() > 0.15
    # Event times follow the true risk (Spearman, uncensored patients).
    ev = meta.censorship.to_numpy() == 0
    rank = lambda x: np.argsort(np.argsort(x))
    rho = np.corrcoef(rank(truth["risk"][ev]), rank(meta.survival_months[ev]))[0, 1]
    assert rho < -0.25


def test_omics_follow_latent_factors(cohort):
    out, _, _, truth = cohort
    z = pd.DataFrame(truth["z"], index=truth["submitter_id"])
    for m, lo in (("rna", 0.7), ("dnam", 0.6), ("cnv", 0.5)):
        df = _omics(out, m)
        w = pd.DataFrame(truth[f"{m}_loadings"], index=truth[f"{m}_features"]).loc[df.columns]
        signal = z.loc[df.index].to_numpy() @ w.to_numpy().T
        r = [pd.Series(df.iloc[:, j].to_numpy()).corr(pd.Series(signal[:, j]))
             for j in range(df.shape[1])]
        assert np.nanmedian(r) > lo, m  # nan: a copy number constant over the cohort


def _held_out_median_r(x, y):
    """Least squares on 2/3 of the patients, median per-feature Pearson r on the rest."""
    x = np.c_[x, np.ones(len(x))]
    train = np.arange(len(x)) % 3 != 0
    coef = np.linalg.lstsq(x[train], y[train], rcond=None)[0]
    pred = x[~train] @ coef
    return np.median([np.corrcoef(pred[:, j], y[~train, j])[0, 1] for j in range(y.shape[1])])


def test_slides_predict_rna_through_phenotype_proportions_not_the_bag_mean(cohort):
    """Held-out: a bag's phenotype log-proportions (nearest of ±c_k) linearly predict rna;
    the bag mean, seen through the same K centres, does not."""
    out, _, meta, truth = cohort
    rna, centres = _omics(out, "rna"), truth["centres"].astype(np.float64)
    k = len(centres)
    signed = np.concatenate([centres, -centres])
    props, means, targets = [], [], []
    for sid, wsi in zip(meta.submitter_id, meta.WSI):
        files = ast.literal_eval(wsi)
        if files and sid in rna.index:
            bag = np.concatenate([_bag(out / "features" / f) for f in files]).astype(np.float64)
            nearest = np.argmin(((bag[:, None] - signed[None]) ** 2).sum(-1), axis=1) % k
            counts = np.bincount(nearest, minlength=k) + 0.5
            props.append(np.log(counts / counts.sum()))
            means.append(bag.mean(0) @ centres.T)
            targets.append(rna.loc[sid].to_numpy())
    y = np.stack(targets)
    assert _held_out_median_r(np.stack(props), y) > 0.45
    assert _held_out_median_r(np.stack(means), y) < 0.2


def test_deterministic_per_seed(tmp_path):
    args = dict(n_patients=24, feature_dim=8, mean_patches_per_slide=20, progress=False)
    a, b, c = (tmp_path / n for n in "abc")
    write_synthetic_cohort(a, seed=7, **args)
    write_synthetic_cohort(b, seed=7, **args)
    write_synthetic_cohort(c, seed=8, **args)
    texts = ["metadata.csv"] + [f"omics/{m}.csv" for m in MODALITIES] + \
        [f"mappings/{m}.json" for m in MODALITIES]
    for t in texts:
        assert (a / t).read_bytes() == (b / t).read_bytes(), t
    assert (a / "metadata.csv").read_bytes() != (c / "metadata.csv").read_bytes()
    assert (a / "omics/rna.csv").read_bytes() != (c / "omics/rna.csv").read_bytes()
    meta = pd.read_csv(a / "metadata.csv")
    first = next(ast.literal_eval(w)[0] for w in meta.WSI if w != "[]")
    np.testing.assert_array_equal(_bag(a / "features" / first), _bag(b / "features" / first))
    other = sorted((c / "features").rglob("*.h5"))[0]
    assert not np.array_equal(_bag(a / "features" / first)[:16], _bag(other)[:16])


def test_paper_group_sizes_exact(tmp_path):
    paper = json.loads((FIXTURES / "paper_group_sizes.json").read_text())
    write_synthetic_cohort(tmp_path, n_patients=8, n_projects=2, feature_dim=4,
                           mean_patches_per_slide=16, progress=False,
                           group_sizes={m: paper[m]["sizes"] for m in MODALITIES},
                           unique_features={m: paper[m]["unique_features"] for m in MODALITIES})
    for m in MODALITIES:
        mapping = _mapping(tmp_path, m)
        assert [len(g) for g in mapping.values()] == paper[m]["sizes"]
        unique = {f for g in mapping.values() for f in g}
        assert len(unique) == paper[m]["unique_features"]
        assert unique <= set(_omics(tmp_path, m).columns)


def test_existing_output_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_cohort(tmp_path, n_patients=8, feature_dim=4, progress=False)
    stale = tmp_path / "features" / "TCGA-OLD" / "x.h5"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    summary = write_synthetic_cohort(tmp_path, n_patients=8, feature_dim=4, progress=False,
                                     overwrite=True)
    assert not stale.exists() and (tmp_path / "notes.txt").read_text() == "keep me"
    assert summary["n_patients"] == len(pd.read_csv(tmp_path / "metadata.csv")) == 8


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="2 patients per project"):
        write_synthetic_cohort(tmp_path / "a", n_patients=5, n_projects=4, progress=False)
    with pytest.raises(ValueError, match="disjoint"):
        write_synthetic_cohort(tmp_path / "b", n_patients=8, feature_dim=4, progress=False,
                               group_sizes={"dnam": [10, 10]}, unique_features={"dnam": 15})


def test_memory_does_not_scale_with_patches(tmp_path):
    """Peak Python-side memory stays far below the feature bytes written."""
    tracemalloc.start()
    summary = write_synthetic_cohort(tmp_path, n_patients=120, feature_dim=512,
                                     mean_patches_per_slide=100, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    written = summary["n_patches"] * 512 * 4
    assert peak < 0.2 * written
