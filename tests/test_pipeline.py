"""Grain pipeline: process sharding, checkpointable iterator state, evaluation bags."""

import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import synth_dataset

from morpheus_jax.data import pipeline

DIM = 16
MODS = ("rna", "dnam", "cnv")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    return root / "ds", synth_dataset(root, patients=70, seed=4, dim=DIM, records_per_shard=10)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from morpheus_jax.core import sharding as shd
    from morpheus_jax.core.config import MeshConfig
    from morpheus_jax.data import pipeline
    root, n_batches, out = sys.argv[3], int(sys.argv[4]), sys.argv[5]
    ds = pipeline.train_dataset(root, "pretrain", global_batch=8, num_patches=24, seed=3, modalities=("rna",),
                                process_index=jax.process_index(), process_count=jax.process_count())
    it = pipeline.train_iterator(ds)
    seen = []
    for step in range(n_batches):
        b = next(it)
        seen += [[int(e), int(r)] for e, r in zip(b["epoch"], b["record"])]
        if step == 0:
            mesh = shd.make_mesh(MeshConfig(data=4, fsdp=2))
            rules = MeshConfig().rules
            g = shd.host_to_global({"wsi": b["wsi"], "rna": b["omics"]["rna"]}, mesh, rules)
            shards = sorted((s.index[0].start or 0, np.asarray(s.data)) for s in g["wsi"].addressable_shards)
            local = np.concatenate([d for _, d in shards])
            info = {"shape": list(g["wsi"].shape), "spec": [list(a) if isinstance(a, tuple) else a for a in g["wsi"].sharding.spec],
                    "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
                    "rows": sorted({s for s, _ in shards}),
                    "local_matches": bool(np.array_equal(np.unique(local, axis=0), np.unique(b["wsi"], axis=0)))}
    json.dump({"seen": seen, "info": info}, open(out, "w"))
""")


def test_two_processes_read_disjoint_records_covering_each_epoch(dataset, tmp_path):
    root, manifest = dataset
    n = manifest.counts["pretrain"]
    n_batches = (3 * n) // 8 + 1
    addr = f"127.0.0.1:{_free_port()}"
    env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, addr, str(i), str(root), str(n_batches),
                               str(tmp_path / f"p{i}.json")], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    results = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]
    for epoch in range(2):  # epochs 0 and 1 are complete
        per = [[r for e, r in res["seen"] if e == epoch] for res in results]
        assert not set(per[0]) & set(per[1])
        assert sorted(per[0] + per[1]) == list(range(n))
    # One process reproduces the same global stream, row for row.
    single = pipeline.train_dataset(root, "pretrain", global_batch=8, num_patches=24, seed=3, modalities=("rna",))
    for step in range(3):
        b = single[step]
        expect = list(zip(b["epoch"].tolist(), b["record"].tolist()))
        got = [tuple(x) for x in results[0]["seen"][4 * step: 4 * step + 4] + results[1]["seen"][4 * step: 4 * step + 4]]
        assert got == expect
    for i, res in enumerate(results):
        info = res["info"]
        assert info["shape"] == [8, 24, DIM] and info["devices"] == 8 and info["local_devices"] == 4
        assert info["spec"] == [["data", "fsdp"], None, None]
        assert info["rows"] == [4 * i + k for k in range(4)]  # this process's devices hold its 4 rows
        assert info["local_matches"]


@pytest.mark.parametrize("workers_after", [0, 2])
def test_iterator_state_restores_identical_batches(dataset, workers_after):
    root, manifest = dataset
    ds = pipeline.train_dataset(root, "pretrain", global_batch=4, num_patches=24, seed=9, modalities=MODS,
                                manifest=manifest)
    it = pipeline.train_iterator(ds, worker_count=0)
    for _ in range(7):  # mid-epoch
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    again = pipeline.train_iterator(ds, worker_count=workers_after)
    again.set_state(json.loads(json.dumps(state)))
    got = [next(again) for _ in range(5)]
    for a, b in zip(expected, got):
        for key in ("wsi", "record", "epoch", "available"):
            np.testing.assert_array_equal(a[key], b[key])
        for m in MODS:
            np.testing.assert_array_equal(a["omics"][m], b["omics"][m])


def test_samples_independent_of_worker_count(dataset):
    root, manifest = dataset
    ds = pipeline.train_dataset(root, "pretrain", global_batch=4, num_patches=24, seed=9, modalities=MODS,
                                manifest=manifest)
    a = [next(it) for it in [pipeline.train_iterator(ds, 0)] for _ in range(4)]
    it2 = pipeline.train_iterator(ds, 2)
    b = [next(it2) for _ in range(4)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["wsi"], y["wsi"])
        np.testing.assert_array_equal(x["record"], y["record"])


def test_bytes_read_per_sample_bounded(dataset):
    root, manifest = dataset
    chunk = manifest.patches.chunk_rows
    ds = pipeline.train_dataset(root, "pretrain", global_batch=4, num_patches=24, seed=1, modalities=MODS,
                                manifest=manifest)
    b = ds[0]
    itemsize = 2
    for row in range(4):
        # Whole chunk segments: at most ceil(24 / chunk) + 2 chunks (partial first and last segments).
        assert 24 * DIM * itemsize <= b["bytes_read"][row] <= (-(-24 // chunk) + 2) * chunk * DIM * itemsize


def test_bags_are_fresh_random_subsets_at_the_cost_of_a_window():
    """draw_rows: each draw a new subset of the patient's rows (not one of n windows), every row
    reachable, pairs from different chunks together at the uniform rate, and about the chunks
    a window reads."""
    n, k, c, off = 2000, 256, 32, 45
    rng = np.random.default_rng(0)
    draws = [pipeline.draw_rows(off, n, k, c, rng) for _ in range(3000)]
    seen = np.zeros(n, int)
    for rows in draws:
        assert rows.size == k and np.unique(rows).size == k and rows.min() >= off and rows.max() < off + n
        assert np.unique(rows // c).size <= k // c + 2
        seen[rows - off] += 1
    assert len({r.tobytes() for r in draws}) == len(draws)
    assert seen.min() > 0 and abs(seen.mean() / len(draws) - k / n) < 1e-9
    # Every row about equally often (k / n per draw), first and last partial segments included.
    assert np.abs(seen / len(draws) - k / n).max() < 0.35 * k / n
    member = np.zeros((len(draws), n), bool)
    for i, rows in enumerate(draws):
        member[i, rows - off] = True
    far = np.mean(member[:, 100] & member[:, 1500])          # different chunks
    assert abs(far / (k * (k - 1) / (n * (n - 1))) - 1) < 0.35


def test_eval_batches_hold_every_patch(dataset):
    root, manifest = dataset
    recs = pipeline.read_split(root, "val-pretrain", manifest)
    seen = set()
    for batch in pipeline.eval_batches(root, recs, MODS, batch_size=3, min_bag=16):
        length = batch["wsi"].shape[1]
        assert length >= 16 and (length // 16) & (length // 16 - 1) == 0  # 16 · 2^j
        for j, i in enumerate(batch["rows"]):
            if i < 0:
                assert not batch["row_valid"][j] and not batch["wsi_mask"][j].any()
                continue
            r = recs[i]
            assert batch["wsi_mask"][j].sum() == r["patch_count"]
            assert not batch["wsi"][j, r["patch_count"]:].any()
            seen.add(i)
    assert seen == set(range(len(recs)))


def test_train_fraction_subsets_are_nested_and_exclusive(dataset):
    root, manifest = dataset
    n = manifest.counts["pretrain"]
    small, large = pipeline.subset_indices(n, 0.3), pipeline.subset_indices(n, 0.6)
    assert len(small) == -(-3 * n // 10) and set(small) <= set(large)
    ds = pipeline.train_dataset(root, "pretrain", global_batch=4, num_patches=8, seed=2, modalities=MODS,
                                manifest=manifest, fraction=0.3)
    seen = [int(r) for k in range(3 * len(small) // 4 + 1) for r in ds[k]["record"]]
    assert set(seen) == set(small.tolist())


def test_direct_chunk_reads_equal_tensorstore_and_name_a_damaged_chunk(dataset, tmp_path, monkeypatch):
    """`records.RawChunks` (what training bags read) gives TensorStore's rows, byte for byte,
    over spans inside one chunk and across chunks; an absent chunk reads as zeros (zarr's fill
    value) as in TensorStore; a truncated or unreadable chunk file is a DatasetError naming it; an array in another layout is read through TensorStore."""
    import os
    import shutil

    from morpheus_jax.core.errors import DatasetError
    from morpheus_jax.data import records as rec

    root, manifest = dataset
    path = rec.patch_path(root, "pretrain", 0)
    raw = rec.RawChunks.open(path)
    assert raw is not None and raw.chunk_rows == manifest.patches.chunk_rows
    c = raw.chunk_rows
    store = pipeline._store(path)
    for a, b in [(0, 1), (3, c), (c - 2, c + 5), (1, 2 * c + 4), (store.shape[0] - 7, store.shape[0])]:
        out = np.empty((b - a, DIM), store.dtype.numpy_dtype)
        touched = raw.read_into(a, b, out)
        np.testing.assert_array_equal(out, store[a:b].read().result())
        assert touched == (-(-b // c) - a // c) * c * raw.row_bytes
    # Batches: the direct path and TensorStore (layout not recognised) give the same arrays.
    ds = pipeline.train_dataset(root, "pretrain", global_batch=4, num_patches=24, seed=3, modalities=MODS,
                                manifest=manifest)
    direct = ds[1]
    monkeypatch.setattr(pipeline, "_raw", lambda p: None)
    np.testing.assert_array_equal(direct["wsi"], ds[1]["wsi"])
    np.testing.assert_array_equal(direct["bytes_read"], ds[1]["bytes_read"])
    monkeypatch.undo()
    # Damage: a copy of the array with one chunk truncated, another removed.
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    damaged = rec.RawChunks.open(copy)
    with open(damaged.chunk_file(1), "r+b") as f:
        f.truncate(raw.row_bytes * 3)
    out = np.empty((c, DIM), store.dtype.numpy_dtype)
    with pytest.raises(DatasetError, match=r"c/1/0: .* truncated"):
        damaged.read_into(c, 2 * c, out)
    (copy / "c" / "2" / "0").unlink()                 # zarr: an absent chunk is all fill value, as TensorStore reads it
    rows = store.shape[0] - 2 * c
    damaged.read_into(2 * c, store.shape[0], out[:rows])
    assert not out[:rows].any()
    import tensorstore as ts
    np.testing.assert_array_equal(out[:rows], ts.open(rec.zarr_spec(copy)).result()[2 * c:].read().result())
    (copy / "c" / "0" / "0").chmod(0)
    if os.access(copy / "c" / "0" / "0", os.R_OK):      # root reads anything
        (copy / "c" / "0" / "0").unlink()
        (copy / "c" / "0" / "0").mkdir()
    with pytest.raises(DatasetError, match=r"c/0/0: cannot read a patch chunk"):
        damaged.read_into(0, 2, out[:2])
    meta = json.loads((copy / "zarr.json").read_text())
    meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "big"}}]
    (copy / "zarr.json").write_text(json.dumps(meta))
    assert rec.RawChunks.open(copy) is None
