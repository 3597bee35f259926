"""Scaling plots (PNG, matplotlib's Agg backend): loss against compute per model size with
the fitted law, and the compute-optimal parameters and samples against the budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from morpheus_jax.apps.plots import pyplot
from morpheus_jax.apps.scaling.fit import ComputeRelation, Law, optimal_allocation
from morpheus_jax.core.atomic import save_figure


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _finish(plt, fig, ax, out) -> Path:
    """Grid, legend, layout; the figure written (beside, then renamed) and closed."""
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_figure(fig, out)
    finally:
        plt.close(fig)


def run_compute(rows: list[dict], relation: ComputeRelation, params_column: str = "params") -> np.ndarray:
    """Training FLOPs of each row: its ``flops`` column, else ``k N^γ D``."""
    if all(r.get("flops") for r in rows):
        return np.array([r["flops"] for r in rows], float)
    return relation.compute([r[params_column] for r in rows], [r["samples"] for r in rows])


def loss_vs_compute(rows: list[dict], law: Law, relation: ComputeRelation, out: str | Path,
                    params_column: str = "params", forecast: dict | None = None) -> Path:
    """Final validation loss of each run against its training FLOPs, one colour per model
    size, with the fitted ``L(N, D = C / FLOPs per sample)`` of each size (its runs' FLOPs per
    sample, else ``k N^γ``) and the compute-optimal frontier under ``C = k N^γ D``.

    ``forecast`` (``fit.forecast``'s dict, optionally scored and with the run's ``flops``):
    the forecast at its compute with its interval, the law of its size, and its actual loss."""
    plt = pyplot()
    compute = run_compute(rows, relation, params_column)
    loss = np.array([r["loss"] for r in rows], float)
    sizes = sorted({r[params_column] for r in rows})
    cmap = plt.get_cmap("viridis")
    span, shown = compute, loss                        # x and y values the axes must hold
    if forecast is not None:
        fc_compute = float(forecast.get("flops") or relation.compute([forecast["params"]], [forecast["samples"]])[0])
        span = np.append(compute, fc_compute)
        shown = np.append(loss, [forecast["loss"], forecast.get("actual", forecast["loss"]),
                                 *forecast.get("interval", [])])
    grid = np.logspace(np.log10(span.min()) - 0.4, np.log10(span.max()) + 0.6, 200)
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for i, n in enumerate(sizes):
        color = cmap(i / max(len(sizes) - 1, 1) * 0.9)
        sel = [j for j, r in enumerate(rows) if r[params_column] == n]
        hidden = {rows[j].get("hidden_size") for j in sel} - {None}
        tag = f"N = {_si(n)}" + (f" (H {int(next(iter(hidden)))})" if len(hidden) == 1 else "")
        ax.plot(compute[sel], loss[sel], "o", color=color, label=tag, ms=6, zorder=3)
        # This size's own FLOPs per sample when known, so its curve meets its runs.
        per_sample = (np.mean([rows[j]["flops"] / rows[j]["samples"] for j in sel]) if all(rows[j].get("flops")
                      for j in sel) else relation.k * n ** relation.gamma)
        d = grid / per_sample
        ax.plot(grid, law.loss(n, d), "-", color=color, lw=1.2, alpha=0.85)
    n_opt, d_opt = optimal_allocation(law, grid, relation)
    ax.plot(grid, law.loss(n_opt, d_opt), "--", color="black", lw=1.4, label="compute-optimal")
    if forecast is not None:
        n = forecast["params"]
        ax.plot(grid, law.loss(n, grid * forecast["samples"] / fc_compute), ":", color="tab:red", lw=1.2)
        lo, hi = forecast.get("interval", [forecast["loss"]] * 2)
        ax.errorbar([fc_compute], [forecast["loss"]], yerr=[[forecast["loss"] - lo], [hi - forecast["loss"]]],
                    fmt="D", color="tab:red", ms=6, capsize=4, zorder=4,
                    label=f"forecast, N = {_si(n)}" + (f" ({forecast['confidence']:.0%} interval)"
                                                       if "interval" in forecast else ""))
        if "actual" in forecast:
            ax.plot([fc_compute], [forecast["actual"]], "*", color="black", ms=11, zorder=5,
                    label=f"held-out run ({forecast['error']:+.1%})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(shown.min() / 1.25, shown.max() * 1.6)
    from matplotlib.ticker import LogLocator, ScalarFormatter  # lazy: start-up time
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}", fontsize=10)
    return _finish(plt, fig, ax, out)


def optimal_allocation_plot(law: Law, relation: ComputeRelation, out: str | Path, budgets,
                            boot: list[Law] = (), rows: list[dict] = (), confidence: float = 0.95,
                            params_column: str = "params") -> Path:
    """Predicted compute-optimal N and D against the budget, with bootstrap bands."""
    plt = pyplot()
    budgets = np.asarray(budgets, float)
    n_opt, d_opt = optimal_allocation(law, budgets, relation)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.0))
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    for ax, y, idx, label in ((axes[0], n_opt, 0, "parameters N_opt"), (axes[1], d_opt, 1, "training samples D_opt")):
        ax.plot(budgets, y, color="tab:blue", lw=1.8, label="fit")
        if boot:
            draws = np.stack([optimal_allocation(b, budgets, relation)[idx] for b in boot])
            lo, hi = np.percentile(draws, q, axis=0)
            ax.fill_between(budgets, lo, hi, color="tab:blue", alpha=0.2, label=f"{confidence:.0%} bootstrap")
        if rows:
            c = run_compute(list(rows), relation, params_column)
            v = [r[params_column] if idx == 0 else r["samples"] for r in rows]
            ax.plot(c, v, "o", color="grey", ms=4, label="runs")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute budget C (FLOPs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    exp_n = law.beta / (law.alpha + relation.gamma * law.beta)
    fig.suptitle(f"compute-optimal allocation, C = {relation.k:.3g}·N^{relation.gamma:.2f}·D: "
                 f"N_opt ∝ C^{exp_n:.2f}, D_opt ∝ C^{1 - relation.gamma * exp_n:.2f}", fontsize=10)
    fig.tight_layout()
    try:
        return save_figure(fig, out)
    finally:
        plt.close(fig)


def loss_vs_epochs(study, out: str | Path, forecast: dict | None = None, plain=None) -> Path:
    """A data-constrained study: each point's mean loss (seed range as error bars) against its
    epochs over its U patients, one colour per model size, with the fitted law of each size
    (solid; ``plain``, a plain `study.Study` of the same runs: dotted) and ``forecast`` (a
    `study.forecast`, optionally scored) with its interval and the run's actual loss."""
    plt = pyplot()
    pts = study.points
    sizes = sorted({p.params for p in pts} | ({forecast["params"]} if forecast else set()))
    unique = forecast.get("U") if forecast else None
    top = max([p.samples / p.unique for p in pts] + ([forecast["epochs"]] if forecast and "epochs" in forecast
                                                       else []))
    grid = np.logspace(np.log10(min(p.samples / p.unique for p in pts)) - 0.2, np.log10(top) + 0.3, 200)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    shown = []
    for i, n in enumerate(sizes):
        color = cmap(i / max(len(sizes) - 1, 1) * 0.9)
        mine = [p for p in pts if p.params == n]
        u = mine[0].unique if mine else unique
        if mine:
            x = np.array([p.samples / p.unique for p in mine])
            y = np.array([p.loss for p in mine])
            err = np.array([[p.loss - min(p.losses) for p in mine], [max(p.losses) - p.loss for p in mine]])
            hidden = mine[0].hidden_size
            ax.errorbar(x, y, yerr=err, fmt="o", color=color, ms=6, capsize=3, zorder=3,
                        label=f"N = {_si(n)}" + (f" (H {hidden:g})" if hidden else ""))
            shown += list(y)
        curve = study.predict(n, grid * u, u)
        ax.plot(grid, curve, "-", color=color, lw=1.2, alpha=0.85)
        if plain is not None:
            ax.plot(grid, plain.predict(n, grid * u), ":", color=color, lw=1.0, alpha=0.85)
    if plain is not None:
        ax.plot([], [], ":", color="grey", label="plain L(N, D) of the same runs")
    if forecast is not None and "epochs" in forecast:
        lo, hi = forecast.get("interval", [forecast["loss"]] * 2)
        ax.errorbar([forecast["epochs"]], [forecast["loss"]], yerr=[[forecast["loss"] - lo], [hi - forecast["loss"]]],
                    fmt="D", color="tab:red", ms=6, capsize=4, zorder=4,
                    label=f"forecast, N = {_si(forecast['params'])}")
        shown += [lo, hi]
        if "actual" in forecast:
            ax.plot([forecast["epochs"]], [forecast["actual"]], "*", color="black", ms=11, zorder=5,
                    label=f"held-out run ({forecast['error']:+.1%})")
            shown.append(forecast["actual"])
    law = study.law
    ax.set_xscale("log")
    ax.set_ylim(min(shown) / 1.08, max(shown) * 1.08)
    ax.set_xlabel("epochs over the U pretraining patients (samples / U)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N'^{law.alpha:.3f} + {law.B:.3g}/D'^{law.beta:.3f}, "
                 f"R*_D = {law.r_star_d:.3g}" + (f", R*_N = {law.r_star_n:.3g}" if law.r_star_n else ""), fontsize=10)
    return _finish(plt, fig, ax, out)
