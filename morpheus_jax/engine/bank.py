"""The device path of ``data.patch_source=device``: the patch bank as one global array sharded
over the batch mesh axes (each device holds its shard's patients, `data.bank`), and the train
step that draws every sample's bag from its own shard in-graph.

The draw is the authors' rule: ``num_patches`` rows without replacement when the patient has
that many (a uniform random subset, in random order), else every row once topped up with
replacement and shuffled. The gather runs under `jax.shard_map`, so each device reads its own
bank and no collective touches it; the host hands over only omics, availability and per row an
offset, a count and a key (``input_bytes``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from morpheus_jax.core import batch as batch_contract
from morpheus_jax.core import log
from morpheus_jax.core.errors import ConfigError
from morpheus_jax.core import sharding as shd
from morpheus_jax.data import bank as host_bank
from morpheus_jax.engine.run import Run, build_run, log_memory, plan_run


def sample_rows(key: jax.Array, count: jax.Array, num_patches: int, width: int) -> jax.Array:
    """``[num_patches]`` rows of ``[0, count)`` (``count`` ≤ ``width``, traced) by the authors' rule."""
    k_subset, k_extra, k_shuffle = jax.random.split(key, 3)
    u = jnp.where(jnp.arange(width) < count, jax.random.uniform(k_subset, (width,)), 2.0)
    _, subset = jax.lax.top_k(-u, num_patches)           # the smallest draws: a random subset in random order
    extra = jax.random.randint(k_extra, (num_patches,), 0, jnp.maximum(count, 1))
    rows = jnp.where(jnp.arange(num_patches) < count, subset, extra)
    return jnp.where(count < num_patches, rows[jax.random.permutation(k_shuffle, num_patches)], rows)


def gather_local(bank, scale, offset, count, keys, *, num_patches: int, width: int) -> jax.Array:
    """One shard's bags ``[b, num_patches, D]`` from its bank (int8 banks: dequantised)."""
    rows = jax.vmap(lambda k, c: sample_rows(jax.random.wrap_key_data(k), c, num_patches, width))(keys, count)
    idx = offset[:, None] + rows
    x = bank[idx]
    if scale is not None:
        x = (x.astype(jnp.float32) * (scale[idx] / 127.0)[..., None]).astype(jnp.float16)
    return x


def _lead(mesh, rules):
    axes = tuple(a for a in rules.get("batch", []) if a in mesh.shape)
    return axes if len(axes) > 1 else (axes[0] if axes else None)


def make_gather(mesh, rules, num_patches: int, width: int, int8: bool):
    """``(bank, scale, offset, count, keys) → wsi [B, N, D]``: every shard gathers locally."""
    lead = _lead(mesh, rules)
    rows, table = PartitionSpec(lead), PartitionSpec(lead, None)

    def local(bank, scale, offset, count, keys):
        return gather_local(bank, scale if int8 else None, offset, count, keys, num_patches=num_patches, width=width)

    return jax.shard_map(local, mesh=mesh, in_specs=(table, rows, rows, rows, table),
                         out_specs=PartitionSpec(lead, None, None))


@dataclasses.dataclass
class DeviceBank:
    """The banks of this process's devices and the step that samples from them."""

    run: Run
    plan: host_bank.BankPlan
    records: list
    dtype: str
    bank: jax.Array
    scale: jax.Array
    local_shards: list[int]

    @property
    def rows_per_shard(self) -> int:
        return self.run.cfg.train.global_batch_size // shd.batch_divisor(self.run.mesh, self.run.rules)

    def dataset(self, seed: int):
        return host_bank.bank_dataset(self.run.root, self.run.manifest, self.records, self.plan,
                                      local_shards=self.local_shards, rows_per_shard=self.rows_per_shard, seed=seed,
                                      modalities=tuple(self.run.layouts))

    def abstract_batch(self) -> dict:
        b = self.run.cfg.train.global_batch_size
        shapes = batch_contract.bank_shapes(b, {m: lay.num_features for m, lay in self.run.layouts.items()})
        return batch_contract.abstract(shapes, batch_contract.bank_shardings(self.run.mesh, self.run.rules,
                                                                             self.run.layouts))

    def jitted_step(self):
        run = self.run
        step = run.train_step()
        gather = make_gather(run.mesh, run.rules, run.cfg.data.num_patches, self.plan.max_count, self.dtype == "int8")

        def traced(state, batch, bank, scale):
            wsi = gather(bank, scale, batch["patch_offset"], batch["patch_count"], batch["patch_key"])
            full = {"wsi": wsi, "wsi_mask": jnp.ones(wsi.shape[:2], bool), "available": batch["available"],
                    "omics": batch["omics"]}
            with shd.activation_sharding(run.mesh, run.rules):
                return step(state, full)

        bsh = batch_contract.bank_shardings(run.mesh, run.rules, run.layouts)
        return jax.jit(traced, in_shardings=(run.state_shardings, bsh, self.bank.sharding, self.scale.sharding),
                       out_shardings=(run.state_shardings, None), donate_argnums=0)

    def compile_step(self):
        """The step compiled ahead of time; returns ``(state, device batch) → (state, metrics)``."""
        abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)  # noqa: E731
        compiled = self.jitted_step().lower(self.run.abstract_state(), self.abstract_batch(), abstract(self.bank),
                                            abstract(self.scale)).compile()
        log_memory(compiled)
        bank, scale = self.bank, self.scale
        return lambda state, batch: compiled(state, batch, bank, scale)


def local_shards(mesh, rules, global_batch: int) -> list[int]:
    """The batch shards whose rows this process feeds, in row order."""
    sharding = shd.batch_sharding(mesh, rules, 1)
    per = global_batch // shd.batch_divisor(mesh, rules)
    starts = sorted({s[0].start or 0 for s in sharding.addressable_devices_indices_map((global_batch,)).values()})
    return [s // per for s in starts]


def build_bank(run: Run, dtype: str = "float16") -> DeviceBank:
    """Plan the banks and load this process's shards into its devices (each shard read once)."""
    cfg, root = run.cfg, Path(run.root)
    shards = shd.batch_divisor(run.mesh, run.rules)
    records, plan = plan_for(run)
    cache: dict[int, object] = {}

    def shard_data(index, part: int):
        d = (index[0].start or 0) // plan.rows
        if d not in cache:
            cache[d] = host_bank.load_shard(root, records, plan, d, dtype)
        data = cache[d]
        return data if dtype == "float16" else data[part]

    table = shd.batch_sharding(run.mesh, run.rules, 2)
    rows = shd.batch_sharding(run.mesh, run.rules, 1)
    bank = jax.make_array_from_callback((shards * plan.rows, plan.dim), table, lambda i: shard_data(i, 0))
    scale = (jax.make_array_from_callback((shards * plan.rows,), rows, lambda i: shard_data(i, 1)) if dtype == "int8"
             else jax.device_put(np.zeros((shards,), np.float32), rows))
    log.info(f"patch bank: {len(records)} patients in {shards} banks of {plan.rows} rows ({dtype}, "
             f"{plan.bytes_per_device(dtype) / 2**30:.3f} GiB per device)")
    return DeviceBank(run, plan, records, dtype, bank, scale, local_shards(run.mesh, run.rules,
                                                                          cfg.train.global_batch_size))


def step_bytes(compiled) -> int | None:
    """Per device: the step's arguments (state and batch) and temporaries at their peak."""
    mem = compiled.memory_analysis()
    return None if mem is None else int(mem.argument_size_in_bytes + mem.temp_size_in_bytes)


def device_memory() -> int | None:
    """One device's memory limit in bytes (None where the backend reports none, e.g. CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def plan_for(run: Run, shards: int | None = None) -> tuple[list, host_bank.BankPlan]:
    """A run's training records and its bank plan (patients dealt to ``shards``, default its
    batch shards)."""
    records = host_bank.training_records(Path(run.root), run.manifest, run.cfg.data.train_fraction)
    plan = host_bank.plan_bank(np.asarray([r["patch_count"] for r in records]),
                               shards or shd.batch_divisor(run.mesh, run.rules), run.patch_dim,
                               run.cfg.data.num_patches)
    return records, plan


def fit(bank_bytes: int, step: int | None, memory: int | None) -> tuple[bool, str]:
    """Whether a bank of ``bank_bytes`` fits beside a step of ``step`` bytes in ``memory``."""
    if memory is None or step is None:
        return False, "the devices report no memory limit" if memory is None else "no memory analysis of the step"
    headroom = memory - bank_bytes - step
    gib = 1 / 2**30
    return headroom >= 0, (f"bank {bank_bytes * gib:.2f} GiB + step {step * gib:.2f} GiB of {memory * gib:.2f} GiB "
                           f"per device: headroom {headroom * gib:.2f} GiB")


def resolve_source(run: Run, stream_compiled) -> str:
    """``data.patch_source`` as run: ``auto`` becomes device when the bank fits beside the
    (stream) step in device memory, else stream; one line says which and why."""
    source = run.cfg.data.patch_source
    if source != "auto":
        return source
    _, plan = plan_for(run)
    ok, why = fit(plan.bytes_per_device(run.cfg.data.bank_dtype), step_bytes(stream_compiled), device_memory())
    source = "device" if ok else "stream"
    log.info(f"data.patch_source=auto: {source} ({why})")
    return source


def input_bytes(abstract_batch: dict, patch_key: str | None) -> dict[str, int]:
    """``input_bytes`` (every leaf the host hands over per step) and ``input_patch_bytes``."""
    leaves = jax.tree.leaves(abstract_batch)
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    patch = abstract_batch[patch_key] if patch_key else None
    return {"input_bytes": total,
            "input_patch_bytes": int(np.prod(patch.shape)) * np.dtype(patch.dtype).itemsize if patch is not None else 0}




def plan_report(cfg, devices: int, memory_gb: float, dtype: str) -> dict:
    """`morpheus bank plan`: bank bytes per device for ``devices`` data-parallel devices of
    ``memory_gb`` GB, the train state's and the step's bytes per device (the step compiled
    here for one device's rows, its memory analysis), the headroom and whether it fits."""
    gbs = cfg.train.global_batch_size
    if devices < 1 or gbs % devices:
        raise ConfigError(f"--devices {devices}: train.global_batch_size={gbs} must split evenly over the devices")
    full = build_run(dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1)))
    records, plan = plan_for(full, devices)
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=gbs // devices))
    run = plan_run(one, full.layouts, patch_dim=full.patch_dim, patch_dtype=full.patch_dtype,
                   num_train=full.num_train, root=full.root, manifest=full.manifest, devices=jax.devices()[:1])
    compiled = run.jitted_step().lower(run.abstract_state(), run.abstract_batch()).compile()
    state = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(run.abstract_state()))
    bank_bytes, step = plan.bytes_per_device(dtype), step_bytes(compiled)
    memory = int(memory_gb * 1e9)
    ok, why = fit(bank_bytes, step, memory)
    return {"dataset": str(cfg.data.dir), "devices": devices, "memory_bytes": memory, "dtype": dtype,
            "patients": len(records), "max_bag": int(max(c.max() for c in plan.counts)),
            "bank_rows_per_device": plan.rows, "bank_bytes_per_device": bank_bytes, "state_bytes": state,
            "step_bytes": step, "headroom_bytes": None if step is None else memory - bank_bytes - step,
            "fits": ok, "reason": why, "step_compiled_on": jax.devices()[0].platform}
