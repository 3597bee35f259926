"""Both input paths of pretraining side by side: ``data.patch_source=stream`` (bags read on the
host each step) against ``device`` (a patch bank in device memory, bags drawn in the step),
and what each would give on an H200 and a TPU v5e chip.

Here: the demo model on a synthetic cohort of 1,536-dim patches, each path's whole loop
(next host batch → host_to_global → the compiled step), timed in interleaved rounds so a
slow spell of a shared machine hits both; ``input_bytes`` per step of both (what the metrics
rows report). The projection takes the paper's shapes (FLOPs per sample from
`morpheus_jax.model.flops`, host bytes per sample of both paths from the batch contract) and
the link, HBM and peak figures printed with it, and gives the samples/s each bound allows:
compute at ``--mfu``, the host link (stream: every patch byte; device: the omics and keys),
and HBM (device: the gathered bags read once more).

    python benchmarks/device_bank.py [--patients 400] [--steps 12] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import cpu_model  # noqa: E402  (the benchmarks' one CPU-model reader)

# name: (peak dense bf16 FLOP/s, HBM bytes/s, host link bytes/s, where the figures come from)
ACCELERATORS = {
    "H200": (790e12, 4.3e12, 55e9, "measured 8192^3 bf16 product and HBM copy (issue 22); PCIe 5.0 x16"),
    "TPU v5e": (197e12, 819e9, 32e9, "published chip peak and HBM; host link assumed PCIe 4.0 x16"),
}


def _cohort(work: Path, patients: int) -> Path:
    from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare
    from morpheus_jax.data.synth import write_synthetic_cohort

    ds = work / f"ds{patients}"
    if not (ds / "manifest.json").exists():
        write_synthetic_cohort(work / f"raw{patients}", n_patients=patients, seed=0, progress=False, overwrite=True)
        prepare(RawCohort.from_dir(work / f"raw{patients}"), ds, PrepareOptions(progress=False, overwrite=True))
    return ds


def _path(cfg, source: str):
    """(one(state) → state, metrics), state, input bytes) of a path, as `pretrain` builds it."""
    from morpheus_jax.core import batch as bc
    from morpheus_jax.core import sharding as shd
    from morpheus_jax.data import pipeline
    from morpheus_jax.engine import bank as device_bank
    from morpheus_jax.engine.run import build_run

    run = build_run(cfg)
    if source == "device":
        bank = device_bank.build_bank(run)
        step, ds, keys = bank.compile_step(), bank.dataset(cfg.seed), bc.BANK_KEYS
        nbytes = device_bank.input_bytes(bank.abstract_batch(), None)
    else:
        step, keys = run.compile_step(), bc.KEYS
        ds = pipeline.train_dataset(run.root, "pretrain", global_batch=cfg.train.global_batch_size,
                                    num_patches=cfg.data.num_patches, seed=cfg.seed, modalities=tuple(run.layouts),
                                    manifest=run.manifest)
        nbytes = device_bank.input_bytes(run.abstract_batch(), "wsi")
    it = pipeline.train_iterator(ds, 0, cfg.data.prefetch_buffer)

    def one(state):
        return step(state, shd.host_to_global(bc.select(next(it), keys), run.mesh, run.rules))

    return one, run.init_state(), nbytes


def measure(cfg_for, steps: int, rounds: int) -> dict:
    import jax

    paths = {s: _path(cfg_for(s), s) for s in ("stream", "device")}
    states = {s: p[1] for s, p in paths.items()}
    for s, (one, _, _) in paths.items():  # warm-up: compile caches, first batches
        for _ in range(2):
            states[s], m = one(states[s])
        jax.block_until_ready(m)
    seconds = {s: [] for s in paths}
    for _ in range(rounds):
        for s, (one, _, _) in paths.items():
            t = time.perf_counter()
            for _ in range(steps):
                states[s], m = one(states[s])
            jax.block_until_ready(m)
            seconds[s].append(time.perf_counter() - t)
    return {s: {"samples_per_s": steps * cfg_for(s).train.global_batch_size / min(seconds[s]),
                "round_seconds": seconds[s], **paths[s][2]} for s in paths}


def project(mfu: float) -> dict:
    """Samples/s each bound allows at the paper's shapes, per accelerator and path."""
    import jax
    import numpy as np

    from morpheus_jax.core import batch as bc
    from morpheus_jax.core.config import CONFIG_DIR, load_config
    from morpheus_jax.engine.bank import input_bytes
    from morpheus_jax.model import flops as fl

    cfg = load_config("paper")
    sizes = json.loads((CONFIG_DIR / "paper_group_sizes.json").read_text())
    features = {m: sizes[m]["unique_features"] for m in cfg.model.modalities}
    flops = fl.step_flops(cfg.model, {m: sizes[m]["sizes"] for m in features}, 32, 1024, cfg.masking.ratio)["per_sample"]

    def abstract(shapes):
        return jax.tree.map(lambda t: jax.ShapeDtypeStruct(*t), shapes, is_leaf=lambda t: isinstance(t, tuple))

    host = {"stream": input_bytes(abstract(bc.shapes(32, 1024, 1536, np.float16, features)), "wsi")["input_bytes"] / 32,
            "device": input_bytes(abstract(bc.bank_shapes(32, features)), None)["input_bytes"] / 32}
    bag = 1024 * 1536 * 2
    out = {"inputs": {"flops_per_sample": flops, "host_bytes_per_sample": host, "bag_bytes": bag, "mfu": mfu,
                      "accelerators": {k: {"peak_flops": v[0], "hbm_bytes_per_s": v[1], "link_bytes_per_s": v[2],
                                           "source": v[3]} for k, v in ACCELERATORS.items()}}}
    for name, (peak, hbm, link, _) in ACCELERATORS.items():
        compute = mfu * peak / flops
        for path in ("stream", "device"):
            bounds = {"compute": compute, "host_link": link / host[path]}
            if path == "device":
                bounds["hbm"] = hbm / bag
            best = min(bounds.values())
            out[f"{name} {path}"] = {"bounds_samples_per_s": bounds, "samples_per_s": best,
                                     "bound_by": min(bounds, key=bounds.get), "mfu": best * flops / peak}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="benchmarks/.work/device_bank", help="cohort folder (kept between runs)")
    ap.add_argument("--patients", type=int, default=400, help="synthetic cohort size")
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--steps", type=int, default=12, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the best of each path is kept)")
    ap.add_argument("--mfu", type=float, default=0.3, help="model FLOPs utilisation assumed by the projection")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jax

    from morpheus_jax.core.config import load_config

    ds = _cohort(Path(args.work), args.patients)

    def cfg_for(source):
        return load_config("demo", [f"data.dir={ds}", "data.raw_dir=null", "mesh.data=1", f"data.patch_source={source}",
                                    f"train.global_batch_size={args.batch}", "run_dir=/tmp/morpheus-bank-bench"])

    result = {"cpu_model": cpu_model(), "devices": jax.device_count(), "platform": jax.devices()[0].platform,
              "measured": measure(cfg_for, args.steps, args.rounds), "projection": project(args.mfu)}
    m = result["measured"]
    result["device_vs_stream"] = m["device"]["samples_per_s"] / m["stream"]["samples_per_s"]
    result["input_bytes_ratio"] = m["device"]["input_bytes"] / m["stream"]["input_bytes"]
    if args.json:
        print(json.dumps(result))
    else:
        _print(result, args)
    return result


def _print(r: dict, args) -> None:
    m = r["measured"]
    print(f"{r['cpu_model']} ({r['devices']} {r['platform']} device): demo model, batch {args.batch}, "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    for s in ("stream", "device"):
        print(f"  {s:<6} {m[s]['samples_per_s']:8.1f} samples/s   input_bytes {m[s]['input_bytes']:>10,} per step "
              f"(patches {m[s]['input_patch_bytes']:,})")
    print(f"  device / stream: {r['device_vs_stream']:.2f}x samples/s, {r['input_bytes_ratio']:.4f}x host bytes")
    p = r["projection"]
    i = p["inputs"]
    print(f"projection at the paper's shapes: {i['flops_per_sample'] / 1e9:.2f} GFLOP/sample, host bytes/sample "
          f"stream {i['host_bytes_per_sample']['stream'] / 1e6:.2f} MB, device "
          f"{i['host_bytes_per_sample']['device'] / 1e3:.1f} kB, bag {i['bag_bytes'] / 1e6:.2f} MB, MFU {i['mfu']:.0%}")
    for name, a in i["accelerators"].items():
        print(f"  {name}: peak {a['peak_flops'] / 1e12:.0f} TFLOP/s, HBM {a['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"host link {a['link_bytes_per_s'] / 1e9:.0f} GB/s ({a['source']})")
        for s in ("stream", "device"):
            q = p[f"{name} {s}"]
            print(f"    {s:<6} {q['samples_per_s']:>10,.0f} samples/s, bound by {q['bound_by']:<9} MFU {q['mfu']:.1%}")


if __name__ == "__main__":
    main()
