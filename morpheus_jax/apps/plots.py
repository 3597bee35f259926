"""Plots written into run folders (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path

from morpheus_jax.core.atomic import save_figure
from morpheus_jax.core.log import read_jsonl


def pyplot():
    """matplotlib.pyplot on the Agg backend (figures written to files, no display)."""
    import matplotlib  # lazy: start-up time
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: start-up time
    return plt


def loss_plot(metrics_path: str | Path, out: str | Path) -> None:
    """Training loss (total and per modality) and validation loss against step."""
    rows = read_jsonl(metrics_path)
    if not any("loss" in r or "val_loss" in r for r in rows):
        return                                   # nothing logged yet: no empty figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    train = [r for r in rows if "loss" in r]
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], label="train loss", color="black", lw=1.5)
        for key in sorted(k for k in train[-1] if k.startswith("loss_")):
            ax.plot(steps, [r.get(key) for r in train], label=f"train {key[5:]}", lw=0.9, alpha=0.8)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss",
                color="tab:red", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("masked L1 (sum over modalities)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
