"""data.patch_source=device: the bank's sampling rule, the 8-device step (no implicit host
transfers, no collective over the bank, the host's bytes), pretraining and resume on it,
auto's choice and `morpheus bank plan`."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from conftest import tiny_overrides, tiny_run_config

from morpheus_jax.apps.pretrain import pretrain
from morpheus_jax.core import batch as bc
from morpheus_jax.core import sharding as shd
from morpheus_jax.core.config import CONFIG_DIR, load_config
from morpheus_jax.core.errors import ConfigError
from morpheus_jax.data import pipeline
from morpheus_jax.data.bank import plan_bank
from morpheus_jax.engine import bank as device_bank
from morpheus_jax.engine.run import build_run

DRAWS = 4000


def _device_draws(count: int, num_patches: int, width: int) -> np.ndarray:
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), DRAWS))
    draw = jax.jit(jax.vmap(lambda k: device_bank.sample_rows(jax.random.wrap_key_data(k), count, num_patches,
                                                              width)))
    return np.asarray(draw(keys))


def _stream_draws(count: int, num_patches: int, chunk_rows: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if count >= num_patches:
        return np.stack([pipeline.draw_rows(0, count, num_patches, chunk_rows, rng) for _ in range(DRAWS)])
    out = []
    for _ in range(DRAWS):          # the stream path's top-up (pipeline.sample_patches)
        order = np.concatenate([np.arange(count), rng.integers(count, size=num_patches - count)])
        out.append(order[rng.permutation(num_patches)])
    return np.stack(out)


def test_bags_follow_the_authors_rule_and_the_stream_paths_frequencies():
    # Without replacement: every draw N distinct rows of [0, c); each row's inclusion
    # frequency N/c within 5 binomial standard errors, and equal to the stream path's (whose
    # span draw is uniform when N and the bag are whole chunks: 64 of 256 rows, 32-row chunks).
    c, n = 256, 64
    dev, stream = _device_draws(c, n, width=300), _stream_draws(c, n, chunk_rows=32)
    assert all(len(set(d)) == n and d.max() < c for d in dev[:200])
    p = n / c
    se = np.sqrt(p * (1 - p) / DRAWS)
    f_dev = np.bincount(dev.ravel(), minlength=c) / DRAWS
    f_stream = np.bincount(stream.ravel(), minlength=c) / DRAWS
    assert np.abs(f_dev - p).max() < 5 * se
    assert np.abs(f_dev - f_stream).max() < 5 * np.sqrt(2) * se
    # Topped up: a patient of 30 patches gives each patch at least once, N in all, shuffled
    # (the original patches are not always first), multiplicities as on the stream path.
    c = 30
    dev, stream = _device_draws(c, n, width=300), _stream_draws(c, n, chunk_rows=32)
    counts = np.stack([np.bincount(d, minlength=c) for d in dev])
    assert counts.min() >= 1 and (counts.sum(1) == n).all() and dev.max() < c
    assert not (dev[:, :c] == np.arange(c)).all(1).any()
    extra = counts - 1                                           # the N - c draws with replacement
    se = np.sqrt((n - c) * (1 / c) * (1 - 1 / c) / DRAWS)
    assert np.abs(extra.mean(0) - (n - c) / c).max() < 5 * se
    stream_extra = np.stack([np.bincount(d, minlength=c) for d in stream]) - 1
    assert np.abs(extra.mean(0) - stream_extra.mean(0)).max() < 5 * np.sqrt(2) * se


def test_patients_are_dealt_evenly_to_the_banks():
    counts = np.random.default_rng(1).integers(16, 400, 101)
    plan = plan_bank(counts, 8, dim=32, num_patches=48)
    assert sorted(np.concatenate(plan.shards).tolist()) == list(range(101))
    loads = [c.sum() for c in plan.counts]
    assert plan.rows == max(loads) and max(loads) - min(loads) <= counts.max()
    for off, c in zip(plan.offsets, plan.counts):
        assert (off + c <= plan.rows).all() and (np.diff(off) == c[:-1]).all()
    assert plan.bytes_per_device("float16") == plan.rows * 32 * 2
    assert plan.bytes_per_device("int8") == plan.rows * 32 + plan.rows * 4
    with pytest.raises(ConfigError, match="patch_source=stream"):
        plan_bank(counts[:3], 8, dim=32, num_patches=48)


def test_eight_devices_no_implicit_transfer_no_collective_over_the_bank(tiny_dataset, tmp_path):
    run = build_run(tiny_run_config(tiny_dataset, tmp_path, "mesh.data=8", "train.global_batch_size=16"))
    bank = device_bank.build_bank(run)
    step = bank.compile_step()
    host = next(pipeline.train_iterator(bank.dataset(run.cfg.seed)))
    batch = shd.host_to_global(bc.select(host, bc.BANK_KEYS), run.mesh, run.rules)
    state = run.init_state()
    with jax.transfer_guard("disallow"):                         # implicit host→device transfers fail
        state, metrics = step(state, batch)
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert device_bank.input_bytes(bank.abstract_batch(), None)["input_patch_bytes"] == 0
    # Each shard gathers from its own bank: the gather alone compiles to no collective, and
    # no collective of the whole step moves a bank-sized operand.
    gather = device_bank.make_gather(run.mesh, run.rules, run.cfg.data.num_patches, bank.plan.max_count, False)
    ab = bank.abstract_batch()
    hlo = jax.jit(gather).lower(bank.bank, bank.scale, ab["patch_offset"], ab["patch_count"],
                                ab["patch_key"]).compile().as_text()
    assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter", hlo)
    full = bank.jitted_step().lower(run.abstract_state(), ab, bank.bank, bank.scale).compile().as_text()
    rows = bank.plan.rows
    for line in full.splitlines():
        if re.search(r"= \S+ (all-gather|all-to-all|collective-permute|all-reduce)", line):
            assert f"[{rows}," not in line and f"[{8 * rows}," not in line, line


def test_input_bytes_at_paper_shapes():
    """The host's bytes per step on the device path are ≤ 3 % of the stream path's at the
    paper's shapes (batch 32, 1,024 patches of 1,536 float16; the paper's omics)."""
    cfg = load_config("paper")
    sizes = json.loads((CONFIG_DIR / "paper_group_sizes.json").read_text())
    features = {m: sizes[m]["unique_features"] for m in cfg.model.modalities}

    def abstract(shapes):
        return jax.tree.map(lambda t: jax.ShapeDtypeStruct(*t), shapes, is_leaf=lambda t: isinstance(t, tuple))

    stream = device_bank.input_bytes(abstract(bc.shapes(32, 1024, 1536, np.float16, features)), "wsi")
    device = device_bank.input_bytes(abstract(bc.bank_shapes(32, features)), None)
    assert stream["input_patch_bytes"] == 32 * 1024 * 1536 * 2
    assert device["input_patch_bytes"] == 0
    assert device["input_bytes"] <= 0.03 * stream["input_bytes"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_on_the_bank_resumes_exactly(tiny_dataset, tmp_path):
    """A run on the bank stopped at step 4 and rerun continues the straight run's losses
    (the bank is rebuilt from the dataset; the stream position comes from the checkpoint)."""
    common = ["data.patch_source=device", "train.decay_steps=8", "checkpoint.every=4"]
    pretrain(tiny_run_config(tiny_dataset, tmp_path / "straight", *common, "train.steps=8"), progress=False)
    rows = [r for r in _rows(tmp_path / "straight") if "loss" in r]
    assert len(rows) == 8 and all(r["input_patch_bytes"] == 0 and r["input_bytes"] > 0 for r in rows)
    run = tmp_path / "resumed"
    pretrain(tiny_run_config(tiny_dataset, run, *common, "train.steps=4"), progress=False)
    pretrain(tiny_run_config(tiny_dataset, run, *common, "train.steps=8"), progress=False)
    resumed = {r["step"]: r["loss"] for r in _rows(run) if "loss" in r}
    assert sorted(resumed) == list(range(1, 9))
    for r in rows[4:]:
        assert resumed[r["step"]] == r["loss"], r["step"]


def test_auto_says_which_source_and_why(tiny_dataset, tmp_path, capsys):
    run = build_run(tiny_run_config(tiny_dataset, tmp_path, "data.patch_source=auto"))
    assert device_bank.resolve_source(run, run.compile_step()) == "stream"
    assert "data.patch_source=auto: stream (the devices report no memory limit)" in capsys.readouterr().out
    ok, why = device_bank.fit(10, 20, 100)
    assert ok and "headroom" in why and not device_bank.fit(90, 20, 100)[0]
    assert device_bank.input_bytes(run.abstract_batch(), "wsi")["input_patch_bytes"] == 8 * 48 * 32 * 2
    with pytest.raises(ConfigError, match="data.patch_source"):
        load_config(None, ["data.patch_source=disk"])


def test_bank_plan_command(tiny_dataset, capsys):
    from morpheus_jax.cli.main import main

    overrides = [o for o in tiny_overrides(tiny_dataset, "unused") if not o.startswith(("data.dir", "run_dir", "mesh"))]
    assert main(["bank", "plan", "--dataset", str(tiny_dataset), "--devices", "4", "--json", "--memory-gb", "0.005",
                 *overrides]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["bank_bytes_per_device"] == plan["bank_rows_per_device"] * 32 * 2
    assert plan["headroom_bytes"] == 0.005e9 - plan["bank_bytes_per_device"] - plan["step_bytes"]
    assert plan["fits"] == (plan["headroom_bytes"] >= 0) and plan["state_bytes"] < plan["step_bytes"]
