"""Training-step throughput at the paper's shapes: our JAX step beside a PyTorch eager step.

Paper shapes: H = 256, 1 encoder layer, 1 decoder layer per modality, 8 heads, 16
prototypes, 1024 patches x 1536, the paper's group sizes (morpheus_jax/configs/paper_group_sizes.json), float32,
encoder dropout 0.15, AdamW. Measured in one run:

  jax     the step `morpheus pretrain` runs (masking, forward, loss, gradients, AdamW in one
          compiled program): median step time after compile, samples/s, compile time,
          memory, analytic FLOPs (useful / executed, `morpheus_jax.model.flops`) and
          XLA's `cost_analysis` count, achieved FLOP/s
  matmul  this machine's float32 matmul rate (a large `jnp.dot`), and the ratio of the
          step's achieved FLOP/s to it
  torch   `morpheus_jax.torch.MorpheusProto` (one MLP per group, literal WSI attention, as
          the authors' code) with `torch.optim.AdamW`, eager, same batch

    python benchmarks/train_step.py [--batch 32] [--steps 8] [--torch-steps 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np

PAPER_GROUP_SIZES = Path(__file__).resolve().parent.parent / "morpheus_jax" / "configs" / "paper_group_sizes.json"


def paper_groups() -> dict[str, dict[str, list[str]]]:
    """Mappings with the paper's group names and sizes. RNA groups overlap (7,010 entries
    over 4,168 genes, as the Hallmark sets); DNAm and CNV groups are disjoint."""
    sizes = json.loads(PAPER_GROUP_SIZES.read_text())
    out = {}
    for m, info in sizes.items():
        n_unique = info["unique_features"]
        groups, start = {}, 0
        for name, size in zip(info["groups"], info["sizes"]):
            groups[name] = [f"{m}{(start + j) % n_unique:05d}" for j in range(size)]
            start += size if m != "rna" else int(size * n_unique / sum(info["sizes"]))
        out[m] = groups
    return out


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def jax_step(args, groups) -> dict:
    import jax
    import jax.numpy as jnp

    from morpheus_jax.core.config import ModelConfig, TrainConfig
    from morpheus_jax.core.spec import GroupLayout
    from morpheus_jax.data.raw import canonical_features
    from morpheus_jax.engine import state as st
    from morpheus_jax.engine.step import make_train_step
    from morpheus_jax.model.flops import step_flops
    from morpheus_jax.model.morpheus import init_model
    from morpheus_jax.model.params import ParamCodec

    mcfg = ModelConfig(compute_dtype=args.dtype, group_buckets=args.buckets)
    layouts = {m: GroupLayout.from_mapping(g, canonical_features(g), mcfg.group_buckets) for m, g in groups.items()}
    model = init_model(mcfg, layouts, 0)
    codec = ParamCodec(model)
    tcfg = TrainConfig(learning_rate=5e-4, weight_decay=1e-3, warmup_steps=10)
    schedule = st.make_schedule(tcfg, 1000, 100)
    tx = st.make_optimizer(tcfg, schedule)
    state = st.init_state(codec.flatten(model), tx, 0)
    del model
    rng = np.random.default_rng(0)
    b, n = args.batch, args.patches
    batch = {"wsi": jnp.asarray(rng.normal(size=(b, n, mcfg.wsi_dim)).astype(np.float32)),
             "wsi_mask": jnp.ones((b, n), bool), "available": jnp.ones((b, len(layouts)), bool),
             "omics": {m: jnp.asarray(rng.normal(size=(b, lay.num_features)).astype(np.float32))
                       for m, lay in layouts.items()}}
    step = jax.jit(make_train_step(codec, tx, schedule, layouts, 0.75), donate_argnums=0)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    flops = step_flops(mcfg, layouts, b, n, 0.75)
    info = {
        "jax_compile_s": compile_s,
        "jax_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "jax_argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "flops_per_step": flops["useful"], "flops_per_step_executed": flops["executed"],
        "xla_flops_per_step": float(cost.get("flops", float("nan"))),
    }
    holder = {"state": state}

    def one() -> float:
        holder["state"], m = compiled(holder["state"], batch)
        return float(m["loss"])

    def parts() -> dict:
        from step_parts import part_times
        kept = int(sum(lay.num_groups for lay in layouts.values()) * 0.25)
        fresh_model = init_model(mcfg, layouts, 0)      # the step donated the first one's arrays
        fresh = st.init_state(codec.flatten(fresh_model), tx, 0)
        return part_times(fresh_model, batch, fresh, tx, kept)

    return info, one, parts


def torch_step(args, groups) -> dict:
    import torch

    from morpheus_jax.torch import MorpheusProto

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    sizes = {m: {g: len(f) for g, f in grp.items()} for m, grp in groups.items()}
    model = MorpheusProto(sizes).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-3)
    rng = np.random.default_rng(0)
    b, n = args.batch, args.patches
    wsi = torch.from_numpy(rng.normal(size=(b, n, 1536)).astype(np.float32))
    omics = {m: torch.from_numpy(rng.normal(size=(b, sum(s.values()))).astype(np.float32)) for m, s in sizes.items()}
    counts = [len(s) for s in sizes.values()]
    k = int(sum(counts) * 0.25)

    def masks_for_step():
        # §3: Dirichlet split of k kept tokens, uniform within each modality.
        out = {m: np.ones((b, g), np.int64) for m, g in zip(sizes, counts)}
        for i in range(b):
            share = rng.dirichlet(np.ones(len(counts)))
            kept = np.minimum(np.round(share * k).astype(int), counts)
            while kept.sum() != k:
                d = np.sign(k - kept.sum())
                elig = np.flatnonzero(kept < counts) if d > 0 else np.flatnonzero(kept > 0)
                kept[rng.choice(elig)] += d
            for (m, g), c in zip(zip(sizes, counts), kept):
                out[m][i, rng.choice(g, c, replace=False)] = 0
        return {m: torch.from_numpy(v) for m, v in out.items()}

    def loss_fn(pred, masks):
        total = 0.0
        for m, spec in sizes.items():
            start, errs = 0, []
            for size in spec.values():  # per group, like the authors' loss
                errs.append((pred[m][:, start: start + size] - omics[m][:, start: start + size]).abs().mean(1))
                start += size
            errs = torch.stack(errs, 1)
            w = masks[m].float()
            total = total + (errs * w).sum() / w.sum().clamp(min=1)
        return total

    def one():
        masks = masks_for_step()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(wsi, omics, masks), masks)
        loss.backward()
        opt.step()
        return float(loss)

    return one


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="samples per step")
    ap.add_argument("--patches", type=int, default=1024, help="patches per sample")
    ap.add_argument("--steps", type=int, default=10, help="timed JAX steps (median)")
    ap.add_argument("--torch-steps", type=int, default=5, help="timed PyTorch steps (median), interleaved "
                    "with the JAX steps so both see the same machine")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="JAX compute dtype")
    ap.add_argument("--buckets", type=int, default=4, help="model.group_buckets")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--no-parts", action="store_true", help="skip the per-part timings")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    import jax
    groups = paper_groups()
    result = {"device": jax.devices()[0].device_kind, "cpu_model": cpu_model(), "batch": args.batch,
              "patches": args.patches, "dtype": args.dtype, "buckets": args.buckets}
    result["matmul_peak_flops_per_s"] = matmul_rate()
    info, jax_one, parts = jax_step(args, groups)
    result.update(info)
    torch_one = None if args.no_torch else torch_step(args, groups)
    jax_one(), jax_one()                                  # warm-up
    if torch_one:
        torch_one()
    # Rounds of JAX steps and one PyTorch step: a slower spell of the machine hits both.
    rounds = max(1, args.torch_steps if torch_one else 1)
    per_round = max(1, -(-args.steps // rounds))
    jax_times, torch_times, loss = [], [], None
    for _ in range(rounds):
        for _ in range(per_round):
            t = time.perf_counter()
            loss = jax_one()
            jax_times.append(time.perf_counter() - t)
        if torch_one:
            torch_times.append(timed(torch_one))
    med = statistics.median(jax_times)
    result.update({"jax_step_s": med, "jax_samples_per_s": args.batch / med, "jax_loss": loss,
                   "achieved_flops_per_s": info["flops_per_step"] / med})
    result["matmul_ratio"] = result["achieved_flops_per_s"] / result["matmul_peak_flops_per_s"]
    if torch_one:
        tmed = statistics.median(torch_times)
        result.update({"torch_step_s": tmed, "torch_samples_per_s": args.batch / tmed,
                       "torch_threads": args.threads, "ratio": tmed / med})
    if not args.no_parts:
        result["parts_s"] = parts()
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.json:
        print(json.dumps(result))
        return result
    g = 1e9
    print(f"device: {result['device']} ({result['cpu_model']}), batch {args.batch} x {args.patches} patches, {args.dtype}")
    print(f"matmul rate (float32 {2048}^3 jnp.dot): {result['matmul_peak_flops_per_s'] / g:.1f} GFLOP/s")
    print(f"jax:   {result['jax_step_s']:.3f} s/step  {result['jax_samples_per_s']:.1f} samples/s  "
          f"compile {result['jax_compile_s']:.1f} s")
    print(f"       FLOPs/step {result['flops_per_step'] / g:.1f} G useful, {result['flops_per_step_executed'] / g:.1f} G "
          f"executed, XLA cost_analysis {result['xla_flops_per_step'] / g:.1f} G")
    print(f"       achieved {result['achieved_flops_per_s'] / g:.1f} GFLOP/s = "
          f"{100 * result['matmul_ratio']:.0f}% of the matmul rate")
    if result.get("jax_temp_bytes") is not None:
        print(f"       memory: temporaries {result['jax_temp_bytes'] / 2**30:.2f} GiB, arguments "
              f"{result['jax_argument_bytes'] / 2**30:.2f} GiB; process peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    if "torch_step_s" in result:
        print(f"torch: {result['torch_step_s']:.3f} s/step  {result['torch_samples_per_s']:.1f} samples/s "
              f"({args.threads} threads, eager, per-group modules)")
        print(f"ratio jax / torch: {result['ratio']:.2f}x")
    for name, sec in result.get("parts_s", {}).items():
        print(f"part {name:14s} {1000 * sec:7.1f} ms (forward + backward, compiled alone)")
    return result


if __name__ == "__main__":
    main()
