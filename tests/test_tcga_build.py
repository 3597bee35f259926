"""`morpheus tcga build` on `synth --format tcga-public` output: every rule against an
independent transcription (tests/tcga_transcription.py), provenance, options, bad inputs,
then prepare and two training steps on the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tcga_transcription as tr
from conftest import TINY_DIM, tiny_overrides

from morpheus_jax.cli.main import main


@pytest.fixture(scope="session")
def download(tmp_path_factory):
    from morpheus_jax.data.tcga.synth import write_public_download

    root = tmp_path_factory.mktemp("tcga_public")
    info = write_public_download(root / "download", n_patients=80, seed=3, feature_dim=TINY_DIM,
                                 mean_patches_per_slide=40, progress=False)
    info["truth"] = json.loads((root / "download" / "truth.json").read_text())
    return info


def _build(out: Path, args: list[str], *extra: str) -> int:
    return main(["tcga", "build", str(out), *args, "--no-progress", *extra])


@pytest.fixture(scope="session")
def built(download, tmp_path_factory):
    out = tmp_path_factory.mktemp("tcga_built") / "raw"
    assert _build(out, download["build_args"]) == 0
    return out


def _omics(out: Path, m: str) -> pd.DataFrame:
    return pd.read_csv(out / "omics" / f"{m}.csv", index_col=0)


def _mapping(out: Path, m: str) -> dict:
    return json.loads((out / "mappings" / f"{m}.json").read_text())


def test_build_equals_an_independent_transcription_of_the_rules(download, built):
    args = download["build_args"]
    arg = {flag: args[args.index(flag) + 1] for flag in ("--features", "--cnv", "--dnam", "--clinical",
                                                         "--gene-sets", "--probe-manifest", "--gene-types")}
    sheets = args[args.index("--sample-sheet") + 1:args.index("--sample-sheet") + 3]
    rna_files = [Path(a) for a in args[args.index("--rna") + 1:args.index("--cnv")]]
    patients, split, slides = tr.cohort(Path(arg["--features"]), Path(arg["--clinical"]))
    meta = pd.read_csv(built / "metadata.csv", dtype=str, keep_default_na=False)
    assert meta["submitter_id"].tolist() == patients
    assert dict(zip(meta["submitter_id"], meta["split"])) == split
    assert {s: eval(w) for s, w in zip(meta["submitter_id"], meta["WSI"])} == slides
    assert all((built / "features" / n).is_symlink() for names in slides.values() for n in names)

    chosen, values, groups = tr.rna(rna_files, Path(arg["--gene-sets"]), patients)
    rna = _omics(built, "rna")
    assert rna.index.tolist() == [q for q in patients if q in chosen]
    assert _mapping(built, "rna") == groups
    prov = json.loads((built / "provenance.json").read_text())
    for q, sample in chosen.items():
        assert prov["patients"][q]["rna"]["sample"] == sample
        np.testing.assert_array_equal(rna.loc[q].to_numpy(), values[q].reindex(rna.columns).to_numpy())

    pretrain = [q for q in patients if split[q] == "pretrain"]
    cnv_sheet = next(s for s in sheets if "cnv" in s)
    dnam_sheet = next(s for s in sheets if "dnam" in s)
    files, wide, cnv_groups = tr.cnv(Path(arg["--cnv"]), Path(cnv_sheet), patients, pretrain,
                                     Path(arg["--gene-types"]), 6750)
    _check_gdc(built, "cnv", prov, files, wide, cnv_groups)
    files, wide, dnam_groups = tr.dnam(Path(arg["--dnam"]), Path(dnam_sheet), Path(arg["--probe-manifest"]),
                                       patients, pretrain, 7150)
    _check_gdc(built, "dnam", prov, files, wide, dnam_groups)


def _check_gdc(built, m, prov, files, wide, groups):
    assert _mapping(built, m) == groups
    table = _omics(built, m)
    assert table.index.tolist() == list(files)
    for q, row in files.items():
        assert prov["patients"][q][m]["file_id"] == row["File ID"]
    first = {}
    for c in wide.columns:
        first.setdefault(c.rsplit("#", 1)[0], c)
    expect = wide[[first[f] for f in table.columns]].to_numpy(np.float64)
    np.testing.assert_array_equal(table.to_numpy(np.float64), expect)


@pytest.fixture(scope="session")
def edged(download, tmp_path_factory):
    """A copy of the download with ties and repeats the generator does not make: two slides
    of one patient with equal patch counts (the later path has the earlier name), a slide
    without patches, and a second primary-first ASCAT2 file listed after the first."""
    import h5py

    root = tmp_path_factory.mktemp("tcga_edged") / "download"
    shutil.copytree(download["out_dir"], root, symlinks=True)
    args = [a.replace(str(download["out_dir"]), str(root)) for a in download["build_args"]]
    meta = pd.read_csv(_first_build_meta(root, args), dtype=str)
    one = [s for s, w in zip(meta["submitter_id"], meta["WSI"]) if len(eval(w)) == 1]
    tie, empty = one[0], one[1]
    slide = next((root / "features").rglob(f"{tie}*.h5"))
    (root / "features" / "zz").mkdir()
    shutil.copy(slide, root / "features" / "zz" / f"{tie}-01Z-00-DX0.h5")
    with h5py.File(root / "features" / "zz" / f"{empty}-01Z-00-DX9.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((1, 0, TINY_DIM), np.float32))
    sheet_path = Path(next(a for a in args if a.endswith("cnv.tsv")))
    sheet = pd.read_csv(sheet_path, sep="\t", dtype=str)
    row = sheet[sheet["Case ID"].str.startswith(one[2]) & sheet["Sample ID"].str.startswith(one[2] + "-01")].iloc[0]
    src_file = root / "gdc" / "cnv" / row["File ID"] / row["File Name"]
    table = pd.read_csv(src_file, sep="\t")
    table["copy_number"] = table["copy_number"] + 1
    later = row.copy()
    later["File ID"], later["File Name"] = "00000000-later-file", "TCGA-LATER.gene_level_copy_number.v36.tsv"
    (root / "gdc" / "cnv" / later["File ID"]).mkdir()
    table.to_csv(root / "gdc" / "cnv" / later["File ID"] / later["File Name"], sep="\t", index=False)
    pd.concat([sheet, later.to_frame().T]).to_csv(sheet_path, sep="\t", index=False)
    return root, args, {"tie": tie, "empty": empty, "two_primary": one[2], "first_file": row["File ID"]}


def _first_build_meta(root: Path, args: list[str]) -> Path:
    out = root.parent / "first"
    assert _build(out, args) == 0
    return out / "metadata.csv"


def test_ties_and_repeats_follow_the_rules(edged, tmp_path):
    root, args, case = edged
    out = tmp_path / "raw"
    assert _build(out, args) == 0
    arg = {flag: args[args.index(flag) + 1] for flag in ("--features", "--clinical", "--cnv", "--gene-types")}
    patients, split, slides = tr.cohort(Path(arg["--features"]), Path(arg["--clinical"]))
    meta = pd.read_csv(out / "metadata.csv", dtype=str, keep_default_na=False)
    wsi = {s: eval(w) for s, w in zip(meta["submitter_id"], meta["WSI"])}
    assert wsi == slides
    assert wsi[case["tie"]][0] == f"{case['tie']}-01Z-00-DX0.h5"          # equal counts: name order
    assert not any("DX9" in n for n in wsi[case["empty"]])                 # no patches: not a slide
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["patients"][case["two_primary"]]["cnv"]["file_id"] == case["first_file"]
    assert prov["dropped"]["slides"]["no patches"] == 1
    pretrain = [q for q in patients if split[q] == "pretrain"]
    files, wide, groups = tr.cnv(Path(arg["--cnv"]), Path(next(a for a in args if a.endswith("cnv.tsv"))),
                                 patients, pretrain, Path(arg["--gene-types"]), 6750)
    _check_gdc(out, "cnv", prov, files, wide, groups)


def test_top_k_with_ties_and_chromosome_blocks_equal_the_transcription():
    """CNV-like integers where whole segments share values (exact std ties at the cut), some
    missing values, repeated names and chrX genes: the kept set and the groups."""
    from morpheus_jax.data.tcga import rules

    rng = np.random.default_rng(0)
    n_pat, n_seg, seg = 40, 60, 5
    base = rng.integers(1, 5, (n_pat, n_seg)).astype(float)
    values = np.repeat(base, seg, axis=1)                                   # 300 columns, ties in fives
    values[rng.random(values.shape) < 0.002] = np.nan
    names = [f"G{j:03d}" for j in range(values.shape[1])]
    names[7] = names[3]                                                     # a repeated name
    clusters = rules.CNV_CLUSTERS
    chroms = [c for cl, _ in clusters for c in cl.split(";")]
    chrom = [chroms[(j // seg) % len(chroms)] for j in range(len(names))]
    chrom[10:15] = ["chrX"] * 5
    pos = rng.permutation(len(names)).astype(float) * 1000
    for k in (120, 123, 200):
        cols, _ = rules.select_features(values, np.arange(n_pat), names, chrom, np.ones(len(names), bool), k,
                                        "eligible")
        keys = [f"{n}#{sum(m == n for m in names[:j])}" for j, n in enumerate(names)]
        wide = pd.DataFrame(values, index=[f"P{i}" for i in range(n_pat)], columns=keys)
        expect = tr.select_and_group(wide, pd.Series(chrom, index=keys), pd.Series(pos, index=keys),
                                     list(wide.index), lambda c: True, k, dict(clusters))
        kept = [names[j] for j in cols]
        assert sorted(kept) == sorted(f for g in expect.values() for f in g)
        try:
            groups = rules.chromosome_groups(kept, [chrom[j] for j in cols], pos[cols], clusters, "--cnv-features", k)
        except Exception as e:  # a block left empty: the transcription has one too
            assert any(not g for g in expect.values()), e
        else:
            assert groups == expect


def _same_output(a: Path, b: Path) -> None:
    for name in ("metadata.csv", *(f"omics/{m}.csv" for m in ("rna", "dnam", "cnv")),
                 *(f"mappings/{m}.json" for m in ("rna", "dnam", "cnv"))):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert sorted(p.name for p in (a / "features").iterdir()) == sorted(p.name for p in (b / "features").iterdir())


def test_workers_gene_set_table_and_rebuild_give_the_same_output(download, built, tmp_path):
    args = list(download["build_args"])
    args[args.index("--gene-sets") + 1] = str(download["gene_set_table"])
    out = tmp_path / "raw"
    shutil.copytree(built, out, symlinks=True)                    # an earlier build is replaced
    assert _build(out, args, "--workers", "2") == 0
    _same_output(built, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_given_mappings_keep_their_groups_and_report_what_the_data_lacks(download, built, tmp_path):
    maps = {}
    for m in ("rna", "cnv", "dnam"):
        groups = _mapping(built, m)
        first = next(iter(groups))
        groups[first] = groups[first] + [f"NOT_IN_DATA_{m}"]
        maps[m] = tmp_path / f"{m}.json"
        maps[m].write_text(json.dumps(groups))
    args = list(download["build_args"])
    i = args.index("--gene-sets")
    del args[i:i + 2]
    out = tmp_path / "raw"
    assert _build(out, args, "--mapping", *(f"{m}={p}" for m, p in maps.items())) == 0
    _same_output(built, out)
    prov = json.loads((out / "provenance.json").read_text())
    for m in maps:
        assert prov["features"][m]["mapping features the data lacks"] == [f"NOT_IN_DATA_{m}"]


def test_cnv_pipeline_option_takes_that_pipelines_files(download, tmp_path):
    out = tmp_path / "raw"
    assert _build(out, download["build_args"], "--cnv-pipeline", "ascat3") == 0
    prov = json.loads((out / "provenance.json").read_text())
    chosen = {p: v["cnv"].get("file", "") for p, v in prov["patients"].items()}
    assert chosen and all(".ascat3." in f for f in chosen.values() if f)
    with_ascat3 = [p for p in download["truth"]["cnv_other_pipelines"] if chosen.get(p)]
    assert with_ascat3 and len(with_ascat3) == sum(bool(f) for f in chosen.values())


def test_edge_cases_of_the_download(download, built):
    t = download["truth"]
    meta = pd.read_csv(built / "metadata.csv", dtype=str, keep_default_na=False)
    ids = set(meta["submitter_id"])
    assert not ids & set(t["not_in_clinical"]) and not ids & set(t["clinical_only"])
    rna, cnv, dnam = (_omics(built, m) for m in ("rna", "cnv", "dnam"))
    assert not set(rna.index) & set(t["rna_only_normal"])
    assert not set(cnv.columns) & set(t["cnv_lncrna_genes"] + t["cnv_chrx_genes"] + t["cnv_chry_genes"])
    assert not set(dnam.columns) & set(t["epic_only_probes"] + t["probes_not_in_manifest"] + t["dnam_chrx_probes"])
    assert not set(rna.columns) & set(t["rna_absent_genes"] + t["rna_extra_genes"])
    idh = meta.set_index("submitter_id")["IDH"]
    assert all(idh[p] != "" for p in t["clinical_idh_second_row"] if p in idh)   # first non-missing row wins
    prov = json.loads((built / "provenance.json").read_text())
    assert {"parameters", "inputs", "patients", "dropped", "features"} <= set(prov)
    assert prov["parameters"]["seed"] == 42 and prov["parameters"]["cnv_features"] == 6750
    assert all({"bytes", "mtime"} <= set(r) for r in prov["inputs"]["dnam_files"])


def test_prepare_and_two_training_steps_on_the_build(built, tmp_path):
    from morpheus_jax.apps.pretrain import pretrain
    from morpheus_jax.core.config import load_config

    assert main(["prepare", "--raw", str(built), "--out", str(tmp_path / "ds"), "--wsi-dim", str(TINY_DIM),
                 "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert {m: len(manifest["modalities"][m]["groups"]) for m in ("rna", "dnam", "cnv")} == {
        "rna": len(_mapping(built, "rna")), "dnam": 50, "cnv": 50}
    cfg = load_config(None, tiny_overrides(tmp_path / "ds", tmp_path / "run", "train.steps=2"))
    pretrain(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and np.isfinite(losses).all()
