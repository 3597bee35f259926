"""The whole input pipeline feeding the training step, as `morpheus pretrain` runs them.

Uses the TCGA-sized cohort of `benchmarks/loader.py` (written there on first use) and the
paper's model at batch 32 x 1024 patches: the Grain stream (reader threads, or worker
processes with ``--workers``) → host_to_global → the AOT-compiled step, dispatched
asynchronously as the loop does. Reports step time, samples/s and the share of wall time
the loop spends waiting for its next batch.

    python benchmarks/pipeline.py [--steps 20] [--workers 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="benchmarks/.work/loader", help="cohort folder shared with loader.py")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--workers", type=int, default=0, help="data.worker_count (0: reader threads)")
    ap.add_argument("--prefetch", type=int, default=4, help="data.prefetch_buffer")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model.compute_dtype")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    from absl import flags
    flags.FLAGS.mark_as_parsed()

    import jax
    from loader import _cohort

    from morpheus_jax.core import batch
    from morpheus_jax.core import sharding as shd
    from morpheus_jax.core.config import load_config
    from morpheus_jax.data import pipeline
    from morpheus_jax.engine.run import build_run

    _, ds_dir, _ = _cohort(Path(args.work), 48, 10000)
    cfg = load_config("paper", [f"data.dir={ds_dir}", "run_dir=/tmp/morpheus-pipeline-bench", "mesh.data=1",
                                f"train.global_batch_size={args.batch}", f"data.worker_count={args.workers}",
                                f"data.prefetch_buffer={args.prefetch}", f"model.compute_dtype={args.dtype}",
                                "train.epochs=null", "train.steps=1000"])
    run = build_run(cfg)
    step = run.compile_step()
    state = run.init_state()
    ds = pipeline.train_dataset(run.root, "pretrain", global_batch=args.batch, num_patches=cfg.data.num_patches,
                                seed=cfg.seed, modalities=tuple(run.layouts), manifest=run.manifest)
    it = pipeline.train_iterator(ds, cfg.data.worker_count, cfg.data.prefetch_buffer)

    def one(state):
        t = time.perf_counter()
        host = next(it)
        waited = time.perf_counter() - t
        state, m = step(state, shd.host_to_global(batch.select(host), run.mesh, run.rules))
        return state, m, waited

    for _ in range(3):  # warm-up: first batches, caches
        state, m, _ = one(state)
    jax.block_until_ready(m)
    waits, pending = [], []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m, w = one(state)
        waits.append(w)
        pending.append(m)
        if len(pending) > 2:
            jax.block_until_ready(pending.pop(0)["loss"])  # the loop's bound on run-ahead
    jax.block_until_ready(m)
    wall = time.perf_counter() - t0
    it.close_reader()
    result = {"steps": args.steps, "batch": args.batch, "workers": args.workers, "dtype": args.dtype,
              "step_s": wall / args.steps, "samples_per_s": args.steps * args.batch / wall,
              "input_wait_share": sum(waits) / wall, "median_wait_s": statistics.median(waits)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"paper model, batch {args.batch} x {cfg.data.num_patches} patches, {args.dtype}, "
              f"{'reader threads' if not args.workers else f'{args.workers} worker processes'}")
        print(f"{result['step_s']:.3f} s/step, {result['samples_per_s']:.1f} samples/s; waiting for input "
              f"{100 * result['input_wait_share']:.1f}% of the time (median wait {1e3 * result['median_wait_s']:.1f} ms)")
    return result


if __name__ == "__main__":
    main()
