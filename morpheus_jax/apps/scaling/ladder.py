"""Scaling ladders: a YAML file that expands into runs, one run folder each.

A ladder names a base config, fixed overrides and axes; its runs are the cartesian
product of the axes (first axis slowest)::

    name: tiny
    base: demo                     # a config in configs/ or a path
    out: runs/scaling/tiny         # run folders go to OUT/<run name>
    fixed: {train.warmup_steps: 10, data.num_patches: 128}
    axes:
      model:                       # a bundle axis: each point sets several keys
        - {name: h16, model.hidden_size: 16, model.encoder_mlp_dim: 32}
        - {name: h32, model.hidden_size: 32, model.encoder_mlp_dim: 64}
      budget.samples: [1600, 4800] # a key axis: one value per point
    launch: {zone: us-central2-b, accelerator: v5litepod-8}   # defaults for remote launchers
    seeds: 3                       # each point run with seeds s, s+1, s+2 (s: the config's seed)

Keys are dotted config keys, plus training-length budgets resolved to ``train.steps``:
``budget.samples`` (samples seen: steps = ceil(samples / global batch)),
``budget.tokens`` (encoder tokens seen, ``1 + P + k`` per sample) and ``budget.flops``
(useful training FLOPs, `morpheus_jax.model.flops`). Run names join one label per axis
(``h32-n4800``; a key axis labels itself with a short prefix and the value; with ``seeds``
above 1, each run's name ends in its seed, ``h32-n4800-seed2000``).

A run is *done* when its ``final.json`` exists, *interrupted* when it has checkpoints but
no ``final.json`` (rerunning `pretrain` on it resumes), *pending* otherwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

from morpheus_jax.core.config import CONFIG_DIR, Config, load_config, model_modalities, read_yaml_mapping, shipped_file
from morpheus_jax.core.errors import ConfigError, DatasetError, LadderError
from morpheus_jax.data import records
from morpheus_jax.model.flops import sequence_lengths, step_flops

BUDGET_KEYS = ("budget.samples", "budget.tokens", "budget.flops")

# Short labels of common axes in run names; other keys use their last part.
LABELS = {
    "model.hidden_size": "h", "model.encoder_layers": "l", "model.decoder_layers": "dl",
    "model.encoder_heads": "nh", "model.decoder_heads": "dnh", "model.num_prototypes": "p",
    "model.group_hidden": "gh", "model.encoder_mlp_dim": "mlp", "model.decoder_mlp_dim": "dmlp",
    "data.train_fraction": "frac", "data.num_patches": "np", "train.steps": "s", "train.epochs": "ep",
    "train.global_batch_size": "b", "train.learning_rate": "lr", "masking.ratio": "mr", "seed": "seed",
    "budget.samples": "n", "budget.tokens": "tok", "budget.flops": "c",
}



@dataclasses.dataclass
class Point:
    label: str
    overrides: dict[str, Any]


@dataclasses.dataclass
class Axis:
    name: str
    points: list[Point]


@dataclasses.dataclass
class Ladder:
    name: str
    base: str
    out: Path
    fixed: dict[str, Any]
    axes: list[Axis]
    launch: dict[str, Any]
    group_sizes: str | None = None
    path: Path | None = None
    seeds: int = 1


@dataclasses.dataclass
class RunSpec:
    """One expanded run: its name, folder and ``key → value`` overrides of the base config
    (budgets still as ``budget.*`` keys until `resolve_steps`)."""

    name: str
    run_dir: Path
    overrides: dict[str, Any]
    labels: dict[str, str]

    @property
    def budget(self) -> dict[str, Any]:
        return {k: v for k, v in self.overrides.items() if k in BUDGET_KEYS}

    @property
    def config_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.overrides.items() if k not in BUDGET_KEYS}


# -- reading -------------------------------------------------------------------------------------

def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "mesh.rules":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def format_value(v: Any) -> str:
    """A value as it goes into a run name: ``0.5`` → ``0.5``, ``1e15`` → ``1e15``, ``64`` → ``64``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        s = format(v, "g").replace("e+", "e")
        return re.sub(r"e(-?)0+(\d)", r"e\1\2", s)
    if isinstance(v, (list, tuple)):
        return "_".join(format_value(x) for x in v)
    return str(v)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("_") or "run"


def key_label(key: str, value: Any) -> str:
    return _safe(LABELS.get(key, key.split(".")[-1]) + format_value(value))


def override_arg(key: str, value: Any) -> str:
    """``key=value`` as `morpheus pretrain` parses it (values as YAML; JSON is YAML)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _parse_axis(name: str, values: Any, where: str) -> Axis:
    if not isinstance(values, list) or not values:
        raise LadderError(f"{where}: axis {name!r} must be a non-empty list")
    points = []
    for i, v in enumerate(values):
        if isinstance(v, dict):
            v = dict(v)
            label = v.pop("name", None)
            over = _flatten(v)
            if not over:
                raise LadderError(f"{where}: point {i} of axis {name!r} sets no key")
            label = _safe(str(label)) if label is not None else "-".join(key_label(k, x) for k, x in over.items())
            points.append(Point(label, over))
        else:
            if "." not in name and name != "seed":
                raise LadderError(f"{where}: axis {name!r} has plain values, so its name must be a dotted "
                                  f"config key (e.g. model.hidden_size) or a budget.* key")
            points.append(Point(key_label(name, v), {name: v}))
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        raise LadderError(f"{where}: axis {name!r} has repeated point names {labels}")
    return Axis(name, points)


def _resolve_base(base: str, ladder_dir: Path) -> str:
    """A path (as given, or beside the ladder file), or a shipped name (kept as the name, so
    launch commands stay portable)."""
    if (ladder_dir / base).exists() and not Path(base).exists():
        return str(ladder_dir / base)
    try:
        found = shipped_file(base)
    except ConfigError as e:
        raise LadderError(f"base config: {e}") from None
    return base if not Path(base).exists() and found.parent == CONFIG_DIR else str(found)


def load_ladder(path: str | Path, out: str | Path | None = None, seeds: int | None = None) -> Ladder:
    """Read and check a ladder file; ``out`` replaces its output root, ``seeds`` its seeds."""
    try:
        path = shipped_file(path, subdir="scaling")
    except ConfigError as e:
        raise LadderError(f"ladder file {e}") from None
    data = read_yaml_mapping(path, "ladder", LadderError)
    known = {"name", "base", "out", "fixed", "axes", "launch", "group_sizes", "description", "seeds"}
    unknown = set(data) - known
    if unknown:
        raise LadderError(f"{path}: unknown ladder keys {sorted(unknown)} (known: {sorted(known)})")
    name = _safe(str(data.get("name") or path.stem))
    axes_data = data.get("axes") or {}
    if not isinstance(axes_data, dict):
        raise LadderError(f"{path}: 'axes' must be a mapping of axis name → list of values")
    axes = [_parse_axis(k, v, str(path)) for k, v in axes_data.items()]
    for key in ("fixed", "launch"):
        if not isinstance(data.get(key) or {}, dict):
            raise LadderError(f"{path}: {key!r} must be a mapping of key → value, got {data[key]!r}")
    fixed = _flatten(data.get("fixed") or {})
    if "run_dir" in fixed or any("run_dir" in p.overrides for a in axes for p in a.points):
        raise LadderError(f"{path}: run_dir is set by the sweep (OUT/<run name>)")
    group_sizes = data.get("group_sizes")
    if group_sizes and not Path(group_sizes).exists() and (path.parent / group_sizes).exists():
        group_sizes = str(path.parent / group_sizes)
    seeds = data.get("seeds", 1) if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise LadderError(f"{path}: seeds (the ladder's 'seeds' or --seeds) must be a positive integer, got {seeds!r}")
    if seeds > 1 and ("seed" in fixed or any(a.name == "seed" for a in axes)):
        raise LadderError(f"{path}: seeds {seeds} sets each run's seed; leave seed out of 'fixed' and 'axes'")
    return Ladder(name=name, base=_resolve_base(str(data.get("base", "demo")), path.parent),
                  out=Path(out if out is not None else data.get("out") or f"runs/scaling/{name}"),
                  fixed=fixed, axes=axes, launch=dict(data.get("launch") or {}),
                  group_sizes=group_sizes, path=path, seeds=seeds)


def expand(ladder: Ladder) -> list[RunSpec]:
    """The ladder's runs: fixed overrides, then each axis's point (later keys win); with
    ``seeds`` k > 1, each run k times with seeds s … s+k−1 (s: the base config's seed)."""
    axes = list(ladder.axes)
    if ladder.seeds > 1:
        try:
            first = load_config(ladder.base, []).seed
        except ConfigError as e:
            raise LadderError(f"base config: {e}") from None
        axes.append(Axis("seed", [Point(key_label("seed", first + i), {"seed": first + i})
                                  for i in range(ladder.seeds)]))
    runs = []
    for combo in itertools.product(*[a.points for a in axes]) if axes else [()]:
        over = dict(ladder.fixed)
        for p in combo:
            over.update(p.overrides)
        budgets = [k for k in over if k in BUDGET_KEYS]
        if len(budgets) > 1:
            raise LadderError(f"run sets several budgets {budgets}; choose one of {BUDGET_KEYS}")
        name = "-".join(p.label for p in combo) or ladder.name
        runs.append(RunSpec(name, ladder.out / name, over, {a.name: p.label for a, p in zip(axes, combo)}))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise LadderError("two runs of the ladder have the same name; give the bundle points distinct names")
    return runs


# -- configs, budgets -------------------------------------------------------------------------------

def run_config(ladder: Ladder, run: RunSpec, steps: int | None = None) -> Config:
    """The run's resolved config (``train.steps`` = ``steps`` and no ``train.epochs`` when a
    budget was resolved)."""
    over = [override_arg(k, v) for k, v in run.config_overrides.items()]
    over.append(f"run_dir={run.run_dir}")
    if steps is not None:
        over += [f"train.steps={steps}", "train.epochs=null"]
    try:
        return load_config(ladder.base, over)
    except ConfigError as e:
        raise LadderError(f"run {run.name}: {e}") from None


def read_group_sizes(path: str | Path) -> dict[str, list[int]]:
    """``{modality: [sizes]}`` from a JSON of ``{m: [sizes]}`` or ``{m: {"sizes": [...]}}``
    (the layout of the shipped ``paper_group_sizes``); a path or a shipped name."""
    path = shipped_file(path, suffix=".json")
    expected = 'a JSON {modality: [group sizes]} or {modality: {"sizes": [group sizes]}}'
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read group sizes ({e}); expected {expected}") from None
    try:
        sizes = {m: [int(s) for s in (v["sizes"] if isinstance(v, dict) else v)] for m, v in data.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ConfigError(f"{path}: expected {expected}") from None
    bad = [m for m, v in sizes.items() if not v or min(v) < 1]
    if bad:
        raise ConfigError(f"{path}: group sizes of {', '.join(bad)} must be a non-empty list of positive integers")
    return sizes


def dataset_layouts(cfg: Config, group_sizes: str | Path | None = None):
    """Group layouts from ``group_sizes`` when given (an explicit flag wins), else from the
    run's dataset (its manifest); None when neither is available."""
    if group_sizes:
        sizes = read_group_sizes(group_sizes)
        mods = model_modalities(cfg.model, sizes)
        absent = [m for m in mods if m not in sizes]
        if absent:
            raise ConfigError(f"{group_sizes}: no group sizes for {', '.join(absent)} (model.modalities lists "
                              f"{mods})")
        return {m: sizes[m] for m in mods}
    manifest = Path(cfg.data.dir) / "manifest.json"
    if manifest.exists():
        man = records.load_manifest(cfg.data.dir)
        mods = model_modalities(cfg.model, man.modalities)
        absent = [m for m in mods if m not in man.modalities]
        if absent:
            raise DatasetError(f"{cfg.data.dir}: the dataset has no {', '.join(absent)} data (it has "
                               f"{', '.join(man.modalities)}); model.modalities lists {mods}")
        return man.layouts(mods, cfg.model.group_buckets)
    return None


def resolve_steps(cfg: Config, budget: dict[str, Any], layouts) -> int | None:
    """``train.steps`` for a budget (None when the budget needs group layouts and none are given)."""
    if not budget:
        return None
    (key, value), = budget.items()
    gbs = cfg.train.global_batch_size
    if key == "budget.samples":
        return max(1, math.ceil(float(value) / gbs))
    if layouts is None:
        return None
    if key == "budget.tokens":
        per_sample = sequence_lengths(cfg.model, layouts, cfg.masking.ratio)["encoder_tokens"]
        return max(1, math.ceil(float(value) / (gbs * per_sample)))
    per_step = step_flops(cfg.model, layouts, gbs, cfg.data.num_patches, cfg.masking.ratio)["useful"]
    return max(1, round(float(value) / per_step))


# -- status -------------------------------------------------------------------------------------------

def run_status(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if (run_dir / "final.json").exists():
        return "done"
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(p.is_dir() and p.name.isdigit() for p in ckpt.iterdir()):
        return "interrupted"
    return "pending"


# -- launch commands ------------------------------------------------------------------------------------

def pretrain_args(ladder: Ladder, run: RunSpec, steps: int | None) -> list[str]:
    """Arguments of `morpheus pretrain` for a run."""
    args = ["--config", ladder.base]
    args += [override_arg(k, v) for k, v in run.config_overrides.items()]
    args.append(f"run_dir={run.run_dir}")
    if steps is not None:
        args += [f"train.steps={steps}", "train.epochs=null"]
    return args


def vm_name(ladder: Ladder, run: RunSpec) -> str:
    """A TPU VM / job name: lower case letters, digits and hyphens, ≤ 63 characters."""
    s = re.sub(r"[^a-z0-9-]+", "-", f"{ladder.name}-{run.name}".lower()).strip("-")
    if not s[:1].isalpha():
        s = "m" + s
    return s[:63].rstrip("-")


def launch_command(launcher: str, ladder: Ladder, run: RunSpec, steps: int | None, *,
                   zone: str | None = None, accelerator: str | None = None) -> list[str]:
    """The command that starts a run with the ``launch/`` scripts."""
    args = pretrain_args(ladder, run, steps)
    name = vm_name(ladder, run)
    if launcher == "tpu_vm":
        zone = zone or ladder.launch.get("zone")
        accelerator = accelerator or ladder.launch.get("accelerator")
        if not zone:
            raise LadderError("--launcher tpu_vm needs --zone (or launch: {zone: …} in the ladder)")
        accel = ["--accelerator", str(accelerator)] if accelerator else []   # else the script's default
        return ["launch/tpu_vm.sh", "--name", name, "--zone", str(zone), *accel, "--", *args]
    if launcher == "slurm":
        return ["sbatch", f"--job-name={name}", "launch/slurm_gpu.sbatch", *args]
    if launcher == "local":
        return ["morpheus", "pretrain", *args]
    raise LadderError(f"unknown launcher {launcher!r} (local, tpu_vm, slurm)")


def shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
