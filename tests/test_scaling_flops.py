"""Analytic FLOPs and parameter counts against XLA's compiled train step and the model."""

import json
import math
import re

import jax
import jax.numpy as jnp
import pytest
from conftest import make_layouts, tiny_model_config

from morpheus_jax.core.config import CONFIG_DIR, TrainConfig, load_config
from morpheus_jax.engine import state as st
from morpheus_jax.engine.step import make_train_step
from morpheus_jax.model import flops as fl
from morpheus_jax.model.morpheus import init_model
from morpheus_jax.model.params import ParamCodec


def hlo_dot_flops(hlo: str) -> int:
    """2·|out|·|contracted| summed over the ``dot`` instructions of an optimised HLO module."""
    shapes = {}
    pattern = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]")
    for line in hlo.splitlines():
        m = pattern.match(line)
        if m:
            shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]
    total = 0
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\w+\[([\d,]*)\]\S*\s+dot\(%?([\w.\-]+)", line)
        if not m:
            continue
        out = [int(x) for x in m.group(1).split(",") if x]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        dims = [int(x) for x in contracting.group(1).split(",") if x] if contracting else []
        total += 2 * math.prod(out) * math.prod(shapes[m.group(2)][i] for i in dims)
    return total


def compiled_train_step(mcfg, layouts, batch, num_patches, ratio=0.75):
    """The real train step, built as the training loop builds it, compiled for abstract inputs."""
    model = init_model(mcfg, layouts, 0)
    codec = ParamCodec(model)
    tc = TrainConfig(steps=10, warmup_steps=2)
    schedule = st.make_schedule(tc, 10, 5)
    tx = st.make_optimizer(tc, schedule)
    state = st.init_state(codec.flatten(model), tx, 0)
    step = make_train_step(codec, tx, schedule, layouts, ratio)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    b = {"wsi": jax.ShapeDtypeStruct((batch, num_patches, mcfg.wsi_dim), jnp.float16),
         "wsi_mask": jax.ShapeDtypeStruct((batch, num_patches), jnp.bool_),
         "available": jax.ShapeDtypeStruct((batch, len(layouts)), jnp.bool_),
         "omics": {m: jax.ShapeDtypeStruct((batch, lay.num_features), jnp.float32) for m, lay in layouts.items()}}
    return jax.jit(step).lower(abstract, b).compile(), codec


# Small, with a realistic balance of matmuls and elementwise work: batches of 32-64 (AdamW's
# ~17 FLOPs per parameter are amortised over the batch) and short bags (the patch LayerNorm
# costs ~25 FLOPs per patch element against 12·P of matmuls). The ratio varies the lengths.
CONFIGS = [
    (dict(hidden_size=128, num_prototypes=16, wsi_dim=256, group_hidden=128, encoder_heads=4, decoder_heads=4,
          encoder_mlp_dim=256, decoder_mlp_dim=256, group_buckets=2), 64, 16, 0.75),
    (dict(hidden_size=128, num_prototypes=16, wsi_dim=384, group_hidden=128, encoder_heads=4, decoder_heads=4,
          encoder_mlp_dim=256, decoder_mlp_dim=256, encoder_layers=2, group_buckets=3), 128, 16, 0.5),
    (dict(hidden_size=128, num_prototypes=32, wsi_dim=256, group_hidden=96, encoder_heads=8, decoder_heads=4,
          encoder_mlp_dim=384, decoder_mlp_dim=256, decoder_layers=2, encoder_dropout=0.0, group_buckets=1),
     32, 32, 0.75),
]


@pytest.mark.parametrize("kw,batch,num_patches,ratio", CONFIGS)
def test_analytic_flops_match_xla(kw, batch, num_patches, ratio):
    mcfg = tiny_model_config(**kw)
    layouts = make_layouts(buckets=mcfg.group_buckets)
    compiled, codec = compiled_train_step(mcfg, layouts, batch, num_patches, ratio)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = fl.step_flops(mcfg, layouts, batch, num_patches, ratio)
    # Every matmul XLA runs is counted, with its padded shape: exact agreement.
    assert hlo_dot_flops(compiled.as_text()) == pytest.approx(ours["executed"], rel=1e-9)
    assert ours["useful"] <= ours["executed"]
    # XLA's total adds elementwise work (LayerNorm, softmax, activations, AdamW): a few %.
    assert ours["executed"] == pytest.approx(cost["flops"], rel=0.10)
    assert ours["executed"] < cost["flops"]
    assert fl.param_counts(mcfg, layouts)["stored"] == codec.stored_size()


def test_param_counts_match_the_model(layouts):
    mcfg = tiny_model_config()
    model = init_model(mcfg, layouts, 0)
    codec = ParamCodec(model)
    counts = fl.param_counts(mcfg, layouts)
    assert counts["stored"] == codec.stored_size()
    assert counts["stored"] == counts["total"]         # the canonical layout stores no bucket padding
    no_groups = sum(math.prod(s) for n, s in codec.shapes.items()
                    if not n.startswith("omics_tokenizers.") and ".reverse_tokenizer." not in n)
    assert counts["without_group_mlps"] == no_groups
    assert counts["total"] == counts["without_group_mlps"] + counts["group_mlps"]
    enc = fl.param_counts(mcfg, layouts, with_decoders=False)
    assert enc["stored"] == ParamCodec(init_model(mcfg, layouts, 0, with_decoders=False)).stored_size()


def test_paper_shapes():
    cfg = load_config("paper")
    sizes = {m: v["sizes"] for m, v in json.loads((CONFIG_DIR / "paper_group_sizes.json").read_text()).items()}
    counts = fl.param_counts(cfg.model, sizes)
    assert counts["total"] / 1e6 == pytest.approx(33.98, abs=0.01)       # the authors' count
    f = fl.step_flops(cfg.model, sizes, 32, 1024, 0.75)
    assert f["encoder_tokens"] == 1 + 16 + 37
    assert 40e9 < f["useful"] < f["executed"] < 46e9                      # ~45 GFLOP per step at batch 32
    comp = f["components"]
    assert sum(c["total"] for c in comp.values()) == pytest.approx(f["useful"])
    assert comp["decoders"]["total"] > comp["wsi_tokenizer"]["total"] > comp["encoder"]["total"]
    # Per sample, nearly independent of the batch (q·Wkᵀ is computed once per step).
    assert fl.step_flops(cfg.model, sizes, 128, 1024, 0.75)["per_sample"] == pytest.approx(f["per_sample"], rel=1e-3)


def test_peak_table_and_mfu():
    assert fl.peak_flops("TPU v5 lite") == 197e12
    assert fl.peak_flops("TPU v5p") == 459e12
    assert fl.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert fl.peak_flops("NVIDIA H100 PCIe", "float32") == 378e12
    assert fl.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert fl.peak_flops("cpu") is None
    f = {"per_sample": 1e9}
    t = fl.throughput(f, samples_per_s=1000.0, num_devices=4, device_kind="TPU v4", dtype="bfloat16")
    assert t["model_tflops_per_device"] == pytest.approx(0.25)
    assert t["mfu"] == pytest.approx(0.25e12 / 275e12)
    assert "mfu" not in fl.throughput(f, 1000.0, 1, "cpu")


def test_explicit_group_sizes_win_over_the_dataset_at_data_dir(tiny_dataset, capsys):
    """`scaling flops --group-sizes` answers for the sizes asked for even where a dataset
    exists at the config's data.dir (it used to print the dataset's FLOPs silently)."""
    from morpheus_jax.cli.main import main

    def params(*argv):
        assert main(["scaling", "flops", "--config", "paper", "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)["params"]["total"]

    paper = params("--group-sizes", "paper_group_sizes", "data.dir=/nonexistent")
    assert paper / 1e6 == pytest.approx(33.98, abs=0.01)
    assert params("--group-sizes", "paper_group_sizes", f"data.dir={tiny_dataset}") == paper
    assert params(f"data.dir={tiny_dataset}") < paper       # without the flag: the dataset's groups
