import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import synth_dataset

from morpheus_jax.core.errors import PrepareError
from morpheus_jax.core.names import SPLITS
from morpheus_jax.data import pipeline, records
from morpheus_jax.data.prepare import PrepareOptions, RawCohort, canonical_features, prepare

DIM = 16


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return root, synth_dataset(root, patients=60, seed=3, dim=DIM, records_per_shard=16)


def _expected_omics(raw, m, features):
    df = pd.read_csv(raw / "omics" / f"{m}.csv", index_col=0)
    df.index = df.index.astype(str)
    df = df[features].astype(np.float64)
    if m == "cnv":
        return np.log10(df.fillna(2.0) / 2.0 + 1.0)
    return df.fillna(0.0)


def test_prepared_values_equal_raw_after_transforms(cohort):
    root, manifest = cohort
    raw = root / "raw"
    meta = pd.read_csv(raw / "metadata.csv")
    for m in ("rna", "dnam", "cnv"):
        groups = json.load(open(raw / "mappings" / f"{m}.json"))
        assert manifest.modalities[m].features == canonical_features(groups)
        assert list(manifest.modalities[m].groups) == list(groups)
    expected = {m: _expected_omics(raw, m, manifest.modalities[m].features) for m in ("rna", "dnam", "cnv")}
    n_seen = 0
    for split in SPLITS:
        recs = pipeline.read_split(root / "ds", split, manifest)
        assert len(recs) == manifest.counts[split]
        assert [r["index"] for r in recs] == list(range(len(recs)))
        for r in recs:
            row = meta[meta.submitter_id == r["submitter_id"]].iloc[0]
            assert row["split"] == split
            for m in ("rna", "dnam", "cnv"):
                if r["submitter_id"] not in expected[m].index:        # a fine-tune patient lacking m: kept, flagged
                    assert split == "fine-tune" and not r["available"][m] and not np.any(r["omics"][m])
                    continue
                assert r["available"][m]
                np.testing.assert_allclose(r["omics"][m], expected[m].loc[r["submitter_id"]].to_numpy(), rtol=1e-6, atol=1e-7)
            slides = ast.literal_eval(row["WSI"])
            assert r["slides"] == slides
            bag = []
            for s in slides:
                with h5py.File(raw / "features" / s) as f:
                    x = f["features"][()]
                bag.append(x.reshape(-1, DIM))
            bag = np.concatenate(bag).astype(np.float16)
            stored = pipeline.read_rows(root / "ds", split, r["patch_shard"], r["patch_offset"],
                                        r["patch_offset"] + r["patch_count"])
            assert stored.shape == bag.shape and stored.dtype == np.float16
            # Same rows as a multiset (stored pre-shuffled).
            np.testing.assert_array_equal(np.unique(stored, axis=0), np.unique(bag, axis=0))
            assert r["meta"]["survival_months"] == pytest.approx(float(row["survival_months"]))
            n_seen += 1
    assert n_seen == sum(manifest.counts.values())


def test_skipped_patients_counted_and_strict(cohort, tmp_path):
    root, manifest = cohort
    meta = pd.read_csv(root / "raw" / "metadata.csv")
    no_slide = int((meta["WSI"] == "[]").sum())
    ids = set(meta.submitter_id)
    for m in ("rna", "dnam", "cnv"):
        ids &= set(pd.read_csv(root / "raw" / "omics" / f"{m}.csv", index_col=0).index.astype(str))
    has_slide = meta["WSI"] != "[]"
    complete = meta[meta.submitter_id.isin(ids) & has_slide]
    # Fine-tune patients need a slide, not omics (the authors' cohorts): kept, lacking ones flagged.
    partial = meta[~meta.submitter_id.isin(ids) & has_slide & (meta["split"] == "fine-tune")]
    assert len(partial) > 0
    assert sum(manifest.counts.values()) == len(complete) + len(partial)
    assert manifest.counts["fine-tune"] == int(((meta["split"] == "fine-tune") & has_slide).sum())
    assert manifest.skipped["no_slide"] == no_slide
    assert manifest.skipped["missing_modality"] == len(meta) - len(complete) - len(partial) - no_slide
    assert manifest.skipped["missing_modality"] > 0
    kept = {r["submitter_id"]: r for r in pipeline.read_split(root / "ds", "fine-tune")}
    for sid in partial["submitter_id"]:
        assert not all(kept[sid]["available"].values())
    with pytest.raises(PrepareError, match="lacks omics|has no slide"):
        prepare(RawCohort.from_dir(root / "raw"), tmp_path / "ds", PrepareOptions(wsi_dim=DIM, strict=True, progress=False))
    assert not (tmp_path / "ds" / records.MANIFEST).exists()


def test_inspect_detects_corruption(cohort, tmp_path):
    root, _ = cohort
    ds = tmp_path / "ds"
    shutil.copytree(root / "ds", ds)
    ok = subprocess.run([sys.executable, "-m", "morpheus_jax.cli", "inspect", str(ds)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "verified" in ok.stdout
    shard = sorted((ds / "records").glob("*.array_record"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "morpheus_jax.cli", "inspect", str(ds)], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert "checksum mismatch" in bad.stderr and shard.name in bad.stderr


def _copy_raw(root, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(root / "raw", raw)
    return raw


def _first_slide(root, raw):
    """A slide of a patient the dataset keeps."""
    rec = pipeline.read_split(root / "ds", "pretrain")[0]
    return raw / "features" / rec["slides"][0]


@pytest.mark.parametrize("case", ["missing_h5", "nan", "dim", "duplicate", "absent_feature", "non_numeric", "truncated"])
def test_bad_input_one_line_error_and_no_dataset(cohort, tmp_path, case):
    root, _ = cohort
    raw = _copy_raw(root, tmp_path)
    slide = _first_slide(root, raw)
    if case == "missing_h5":
        slide.unlink()
        expect = [slide.name, "does not exist"]
    elif case in ("nan", "dim"):
        with h5py.File(slide, "r+") as f:
            x = f["features"][()]
            del f["features"]
            if case == "nan":
                x[..., 3, 1] = np.nan
            else:
                x = x[..., :-1]
            f["features"] = x
        expect = [slide.name, "features", "NaN" if case == "nan" else "dim"]
    elif case == "truncated":
        data = slide.read_bytes()
        slide.write_bytes(data[: len(data) // 3])
        expect = [slide.name]
    elif case == "duplicate":
        meta = pd.read_csv(raw / "metadata.csv")
        meta.loc[len(meta) - 1, "submitter_id"] = meta.loc[0, "submitter_id"]
        meta.to_csv(raw / "metadata.csv", index=False)
        expect = ["metadata.csv", "duplicate submitter_id"]
    elif case == "absent_feature":
        df = pd.read_csv(raw / "omics" / "dnam.csv", index_col=0)
        groups = json.load(open(raw / "mappings" / "dnam.json"))
        gone = next(iter(groups.values()))[0]
        df.drop(columns=[gone]).to_csv(raw / "omics" / "dnam.csv")
        expect = ["dnam.csv", gone]
    else:
        df = pd.read_csv(raw / "omics" / "rna.csv", index_col=0)
        groups = json.load(open(raw / "mappings" / "rna.json"))
        col = next(iter(groups.values()))[0]
        df[col] = df[col].astype(object)
        df.iloc[2, df.columns.get_loc(col)] = "high"
        df.to_csv(raw / "omics" / "rna.csv")
        expect = ["rna.csv", col, "non-numeric"]
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-m", "morpheus_jax.cli", "prepare", "--raw", str(raw), "--out", str(out),
                           "--wsi-dim", str(DIM)], capture_output=True, text=True)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("morpheus prepare: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    last = errors[0]
    for word in expect:
        assert word in last, last
    insp = subprocess.run([sys.executable, "-m", "morpheus_jax.cli", "inspect", str(out)], capture_output=True, text=True)
    assert insp.returncode != 0


def test_training_samples_deterministic_and_topped_up(cohort):
    root, manifest = cohort
    ds = pipeline.train_dataset(root / "ds", "pretrain", global_batch=4, num_patches=64, seed=5,
                                modalities=("rna", "dnam", "cnv"), manifest=manifest)
    a, b = ds[0], ds[0]
    np.testing.assert_array_equal(a["wsi"], b["wsi"])
    assert a["wsi"].shape == (4, 64, DIM) and a["wsi_mask"].all()
    recs = {r["index"]: r for r in pipeline.read_split(root / "ds", "pretrain", manifest)}
    for row in range(4):
        r = recs[int(a["record"][row])]
        bag = pipeline.read_rows(root / "ds", "pretrain", r["patch_shard"], r["patch_offset"],
                                 r["patch_offset"] + r["patch_count"])
        rows = {x.tobytes() for x in bag}
        assert all(x.tobytes() in rows for x in a["wsi"][row])
        distinct = len({x.tobytes() for x in a["wsi"][row]})
        assert distinct == min(64, len(rows))  # without replacement up to the bag size
        np.testing.assert_array_equal(a["omics"]["rna"][row], r["omics"]["rna"])
    # Epoch 2 reshuffles the order of patients.
    n = manifest.counts["pretrain"]
    first = [int(ds[i]["record"][j]) for i in range(n // 4) for j in range(4)]
    second = [int(ds[n // 4 + i]["record"][j]) for i in range(n // 4) for j in range(4)]
    assert first != second


def _checksums(manifest):
    return [(s["records"]["sha256"], s["patches"]["sha256"]) for s in manifest.shards]


def test_workers_and_resume_give_identical_datasets(cohort, tmp_path):
    root, _ = cohort
    raw = RawCohort.from_dir(root / "raw")
    one = prepare(raw, tmp_path / "one", PrepareOptions(wsi_dim=DIM, records_per_shard=6, progress=False))
    two = prepare(raw, tmp_path / "two", PrepareOptions(wsi_dim=DIM, records_per_shard=6, workers=2, progress=False))
    assert len(one.shards) >= 6
    assert _checksums(one) == _checksums(two)
    # Interrupt a run after a few shards (SIGKILL), then rerun: finished shards are kept.
    code = (f"from morpheus_jax.data.prepare import *\n"
            f"prepare(RawCohort.from_dir({str(root / 'raw')!r}), {str(tmp_path / 'three')!r}, "
            f"PrepareOptions(wsi_dim={DIM}, records_per_shard=6, progress=False))\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    markers = tmp_path / "three" / ".prepare" / "shards"
    import time
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(markers.glob("*.json"))) < 3:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "three" / records.MANIFEST).exists()
    assert subprocess.run([sys.executable, "-m", "morpheus_jax.cli", "inspect", str(tmp_path / "three")],
                          capture_output=True).returncode != 0
    done_before = len(list(markers.glob("*.json")))
    assert done_before >= 3
    # Corrupt one finished shard: it must be rewritten, not trusted.
    victim = sorted((tmp_path / "three" / "records").glob("*.array_record"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    three = prepare(raw, tmp_path / "three", PrepareOptions(wsi_dim=DIM, records_per_shard=6, progress=False))
    assert three.resumed_shards == done_before - 1
    assert _checksums(three) == _checksums(one)
    assert not (tmp_path / "three" / ".prepare").exists()
    assert records.verify_dataset(tmp_path / "three") == []


_SYNTH_SCRIPT = """
import sys, json
from morpheus_jax.data.synth import write_synthetic_cohort
sizes = json.load(open(sys.argv[3]))
write_synthetic_cohort(sys.argv[1], n_patients=int(sys.argv[2]), seed=0, feature_dim=8, mean_patches_per_slide=20,
                       progress=False, group_sizes={m: sizes[m]["sizes"] for m in sizes},
                       unique_features={m: sizes[m]["unique_features"] for m in sizes})
"""

_PREPARE_SCRIPT = """
import sys, json
from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) after imports
base = status("VmRSS:")
prepare(RawCohort.from_dir(sys.argv[1]), sys.argv[2], PrepareOptions(wsi_dim=8, progress=False))
print(json.dumps({"growth_kib": status("VmHWM:") - base}))
"""


@pytest.mark.slow
def test_prepare_peak_memory_does_not_grow_with_cohort(tmp_path):
    """Paper-sized omics (~18k features per patient): loading the CSVs whole would raise the
    peak by their float64 values between these cohorts (measured from the CSVs' columns);
    streaming keeps the growth under 40 % of that."""
    fixture = Path(__file__).parent.parent / "morpheus_jax" / "configs" / "paper_group_sizes.json"
    peaks = {}
    for n in (40, 400):
        raw, out = tmp_path / f"raw{n}", tmp_path / f"ds{n}"
        subprocess.run([sys.executable, "-c", _SYNTH_SCRIPT, str(raw), str(n), str(fixture)], check=True)
        res = subprocess.run([sys.executable, "-c", _PREPARE_SCRIPT, str(raw), str(out)],
                             capture_output=True, text=True, check=True)
        peaks[n] = json.loads(res.stdout.strip().splitlines()[-1])["growth_kib"] / 1024
    omics = [tmp_path / "raw400" / "omics" / f"{m}.csv" for m in ("rna", "dnam", "cnv")]
    columns = sum(len(f.open().readline().split(",")) - 1 for f in omics)
    whole_mb = (400 - 40) * columns * 8 / 2**20     # what reading the CSVs whole adds (float64 values alone)
    assert whole_mb > 40, whole_mb
    assert peaks[400] - peaks[40] < 0.4 * whole_mb, (peaks, whole_mb)


# -- the output folder: nothing the user owns is ever deleted ------------------------------------------

def _opts(**kw):
    return PrepareOptions(**{"wsi_dim": DIM, "records_per_shard": 16, "progress": False, **kw})


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def test_out_may_not_be_or_hold_or_lie_inside_an_input(cohort, tmp_path):
    root, _ = cohort
    raw = _copy_raw(root, tmp_path)
    before = _listing(raw)
    for out, why in ((raw, "holds the input"), (raw / "features" / "ds", "inside the input folder"),
                     (tmp_path, "holds the input")):
        with pytest.raises(PrepareError, match=why):
            prepare(RawCohort.from_dir(raw), out, _opts(overwrite=True))
    assert _listing(raw) == before


def test_out_with_foreign_files_is_refused_and_kept(cohort, tmp_path):
    root, _ = cohort
    raw = RawCohort.from_dir(root / "raw")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(PrepareError, match="notes.txt"):
        prepare(raw, mine, _opts())
    # Beside a prepared dataset, --overwrite refuses too: the folder is not only ours.
    ds = tmp_path / "ds"
    prepare(raw, ds, _opts())
    (ds / "notes.txt").write_text("the user's")
    with pytest.raises(PrepareError, match="notes.txt"):
        prepare(raw, ds, _opts(overwrite=True))
    assert (mine / "notes.txt").read_text() == (ds / "notes.txt").read_text() == "the user's"
    assert records.load_manifest(ds).count("pretrain") > 0
    with pytest.raises(PrepareError, match="is a file"):
        prepare(raw, mine / "notes.txt", _opts())


def test_overwrite_swaps_in_a_complete_dataset_and_keeps_the_old_one_on_failure(cohort, tmp_path):
    root, _ = cohort
    raw = _copy_raw(root, tmp_path)
    ds = tmp_path / "ds"
    first = prepare(RawCohort.from_dir(raw), ds, _opts())
    # New inputs that fail validation: the previous dataset is untouched and still loads.
    df = pd.read_csv(raw / "omics" / "rna.csv", index_col=0)
    col = next(iter(json.load(open(raw / "mappings" / "rna.json")).values()))[0]
    df[col] = df[col].astype(object)
    df.iloc[0, df.columns.get_loc(col)] = "high"
    df.to_csv(raw / "omics" / "rna.csv")
    with pytest.raises(PrepareError, match="rna.csv"):
        prepare(RawCohort.from_dir(raw), ds, _opts(overwrite=True))
    assert records.load_manifest(ds).shards == first.shards and not records.verify_dataset(ds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "raw"]      # no staging left behind
    # Good inputs with another shard size: replaced whole, nothing left beside it.
    shutil.copy(root / "raw" / "omics" / "rna.csv", raw / "omics" / "rna.csv")
    second = prepare(RawCohort.from_dir(raw), ds, _opts(overwrite=True, records_per_shard=8))
    assert len(second.shards) > len(first.shards)
    assert records.load_manifest(ds).shards == second.shards and not records.verify_dataset(ds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "raw"]


def test_ids_are_strings_and_a_differently_written_id_is_named(cohort, tmp_path):
    """Leading zeros and 'NA' survive as ids; an id that differs only by whitespace, case or
    leading zeros between the metadata and an omics CSV is an error naming both, not a skip."""
    root, _ = cohort
    raw = _copy_raw(root, tmp_path)
    meta = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
    old = pipeline.read_split(root / "ds", "pretrain")[0]["submitter_id"]     # a patient prepare keeps
    for m in ("rna", "dnam", "cnv"):
        text = (raw / "omics" / f"{m}.csv").read_text().replace(f"\n{old},", "\n0007,")
        (raw / "omics" / f"{m}.csv").write_text(text)
    meta.loc[meta["submitter_id"] == old, "submitter_id"] = "0007"
    meta.to_csv(raw / "metadata.csv", index=False)
    manifest = prepare(RawCohort.from_dir(raw), tmp_path / "ds", _opts())
    ids = {r["submitter_id"] for s in SPLITS for r in pipeline.read_split(tmp_path / "ds", s, manifest)}
    assert "0007" in ids
    text = (raw / "omics" / "rna.csv").read_text().replace("\n0007,", "\n7,")
    (raw / "omics" / "rna.csv").write_text(text)
    with pytest.raises(PrepareError, match=r"'0007' appears in the rna CSV as '7'"):
        prepare(RawCohort.from_dir(raw), tmp_path / "ds2", _opts())
    assert not (tmp_path / "ds2").exists()


def test_a_split_left_empty_fails_with_the_reasons(cohort, tmp_path):
    root, _ = cohort
    raw = _copy_raw(root, tmp_path)
    lines = (raw / "omics" / "cnv.csv").read_text().splitlines()
    (raw / "omics" / "cnv.csv").write_text(lines[0] + "\n")
    with pytest.raises(PrepareError, match="header but no rows"):
        prepare(RawCohort.from_dir(raw), tmp_path / "ds", _opts())
    # One cnv row left: every other patient lacks cnv, so whole splits end up empty.
    (raw / "omics" / "cnv.csv").write_text(lines[0] + "\n" + lines[1] + "\n")
    with pytest.raises(PrepareError, match=r"no patient of split .* is left \(skipped: \d+ missing modality"):
        prepare(RawCohort.from_dir(raw), tmp_path / "ds", _opts())
    assert not (tmp_path / "ds").exists()
