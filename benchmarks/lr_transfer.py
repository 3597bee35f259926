"""Learning-rate transfer across widths: standard parametrisation against µP, side by side.

Reads a finished sweep of `configs/scaling/lr_transfer.yaml` (widths × a learning-rate grid ×
``model.parametrization``) and prints, per parametrisation, the final validation loss of each
width at each rate, the best grid point per width, and how far it moves across widths (in
grid steps). µP transfers when the best point stays within one grid step.

    morpheus sweep lr_transfer
    python benchmarks/lr_transfer.py [--runs runs/scaling/lr_transfer] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from train_step import cpu_model


def table(runs: Path) -> dict:
    from morpheus_jax.apps.scaling.sweep import collect_run

    cells: dict[str, dict[int, dict[float, float]]] = {}
    for final in sorted(runs.rglob("final.json")):
        row = collect_run(final.parent)
        if row is None:
            continue
        cfg = yaml.safe_load((final.parent / "config.yaml").read_text())
        p, h, lr = cfg["model"]["parametrization"], cfg["model"]["hidden_size"], cfg["train"]["learning_rate"]
        cells.setdefault(p, {}).setdefault(h, {})[float(lr)] = float(row["loss"])
    out = {}
    for p, widths in cells.items():
        rates = sorted({lr for w in widths.values() for lr in w})
        best = {h: min(w, key=w.get) for h, w in widths.items()}
        index = {h: rates.index(lr) for h, lr in best.items()}
        out[p] = {"rates": rates, "loss": {str(h): [widths[h].get(lr) for lr in rates] for h in sorted(widths)},
                  "best_rate": {str(h): best[h] for h in sorted(widths)},
                  "best_moves_grid_steps": max(index.values()) - min(index.values())}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/scaling/lr_transfer", help="the sweep's runs folder")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    result = {"cpu_model": cpu_model(), "parametrizations": table(Path(args.runs))}
    if args.json:
        print(json.dumps(result))
        return result
    for p, t in result["parametrizations"].items():
        print(f"\n{p}: final validation loss (best per width in *stars*); the best rate moves "
              f"{t['best_moves_grid_steps']} grid step(s) across widths")
        print("| hidden | " + " | ".join(f"lr {r:g}" for r in t["rates"]) + " |")
        print("|---" * (len(t["rates"]) + 1) + "|")
        for h, losses in t["loss"].items():
            best = t["best_rate"][h]
            cells = [("—" if v is None else (f"**{v:.4f}**" if r == best else f"{v:.4f}"))
                     for r, v in zip(t["rates"], losses)]
            print(f"| {h} | " + " | ".join(cells) + " |")
    return result


if __name__ == "__main__":
    main()
