"""The training step lowers for TPU and CUDA (`jax.export`, no device needed) at the demo's and
the paper's shapes, sharded over a 4-device mesh: an op that exists only on CPU, a host
callback, or a backend check evaluated while tracing for the wrong platform fails here."""

from __future__ import annotations

import re

import jax
import pytest
from jax import export

from morpheus_jax.apps.scaling.ladder import read_group_sizes
from morpheus_jax.core.config import load_config
from morpheus_jax.core.spec import GroupLayout
from morpheus_jax.engine.run import plan_run

PLATFORMS = ("tpu", "cuda")


def bf16_products(mlir: str) -> int:
    return len(re.findall(r"stablehlo\.dot_general[^\n]*: \(tensor<[0-9x]*bf16>, tensor<[0-9x]*bf16>\) -> "
                          r"tensor<[0-9x]*f32>", mlir))


def sized_layouts(sizes: dict[str, list[int]], modalities, buckets: int) -> dict[str, GroupLayout]:
    out = {}
    for m in modalities:
        groups, off = [], 0
        for s in sizes[m]:
            groups.append(list(range(off, off + s)))
            off += s
        out[m] = GroupLayout.build([f"{m}_{i}" for i in range(len(groups))], groups, off, buckets)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("config, overrides", [
    ("demo", ["mesh.data=2", "mesh.fsdp=2", "train.global_batch_size=8"]),
    ("paper", ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2", "train.global_batch_size=8", "train.epochs=null",
               "train.steps=10"]),
])
def test_train_step_lowers_for_tpu_and_cuda(config, overrides, dtype):
    cfg = load_config(config, overrides + [f"model.compute_dtype={dtype}"])
    mods = cfg.model.modalities or ["rna", "dnam", "cnv"]     # the demo takes its dataset's: the paper's three
    sizes = read_group_sizes("paper_group_sizes") if config == "paper" else {m: [7, 12, 20, 9] for m in mods}
    layouts = sized_layouts(sizes, mods, cfg.model.group_buckets)
    run = plan_run(cfg, layouts, patch_dim=cfg.model.wsi_dim, patch_dtype="float16", num_train=100,
                   devices=jax.devices()[:4])
    assert run.mesh.size == 4
    exp = export.export(run.jitted_step(), platforms=PLATFORMS)(run.abstract_state(), run.abstract_batch())
    assert exp.platforms == PLATFORMS
    assert exp.nr_devices == 4
    text = exp.mlir_module()
    # No host round trips and nothing CPU-specific in the program.
    for banned in ("custom_call @xla_python_cpu_callback", "custom_call @xla_ffi_python_cpu_callback",
                   "xla_python_gpu_callback", "host_callback"):
        assert banned not in text, banned
    custom = set(re.findall(r"stablehlo\.custom_call @([\w.]+)", text))
    assert custom <= {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "mhlo.sharding"}, custom
    # The batch really is sharded over the mesh in the lowered program (not replicated).
    shardings = exp.in_shardings_jax(run.mesh)
    batch_shardings = shardings[len(jax.tree.leaves(run.abstract_state())):]
    assert batch_shardings and all(s.spec and s.spec[0] for s in batch_shardings), batch_shardings
    assert "sdy.sharding_constraint" in text          # the activations' logical-axis constraints
    if dtype == "bfloat16":
        # bfloat16 × bfloat16 → float32 products (`layers.einsum_f32`) stay bfloat16 on the
        # accelerators; only the CPU lowering widens them (decided per platform, not by the host).
        one = {p: export.export(run.jitted_step(), platforms=(p,))(run.abstract_state(), run.abstract_batch())
               for p in ("tpu", "cpu")}
        assert bf16_products(one["tpu"].mlir_module()) > 4 * bf16_products(one["cpu"].mlir_module())
