"""Typed configuration: dataclasses, YAML files and dotted ``key=value`` overrides.

A config is a value. ``load_config(path, overrides)`` reads a YAML file (keys nested as in
the dataclasses below), applies ``section.key=value`` overrides parsed as YAML scalars, and
rejects unknown keys with the full dotted name. ``save_config`` writes the resolved config
that every run stores beside its outputs.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from morpheus_jax.core.atomic import write_text
from morpheus_jax.core.errors import ConfigError
from morpheus_jax.core.modality import check_name

# The shipped configs live inside the package (package data), so they resolve in a wheel too.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def shipped_file(name: str | os.PathLike, *, suffix: str = ".yaml", subdir: str = "") -> Path:
    """An existing path as given, else a file shipped in ``CONFIG_DIR/subdir`` by bare name
    (``paper`` → ``configs/paper.yaml``); a ``ConfigError`` naming both places otherwise."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIG_DIR / subdir / (path.name if path.suffix else f"{path.name}{suffix}")
    if path.parent == Path(".") and shipped.exists():
        return shipped
    names = sorted(p.stem for p in (CONFIG_DIR / subdir).glob(f"*{suffix}"))
    raise ConfigError(f"{name}: not found (no such file, and not a shipped name: {', '.join(names)})")


@dataclasses.dataclass
class DataConfig:
    dir: str = "data/demo/dataset"
    # Raw cohort in the synth layout; `pretrain` prepares it into `dir` when `dir` is absent.
    raw_dir: str | None = "data/demo/raw"
    # Synthesised into raw_dir when raw_dir is absent (the demo); None: never synthesise.
    synth_patients: int | None = 500
    # Share of pretraining patients the synthesised cohort holds out as val-pretrain.
    synth_val_fraction: float = 0.1
    num_patches: int = 1024
    # Train on this fraction of the pretrain split (scaling ladders): the first ceil(f·n)
    # patients of one fixed permutation, so smaller fractions are subsets of larger ones.
    train_fraction: float = 1.0
    worker_count: int = 0
    # Batches read ahead (and reader threads) per process / per worker.
    prefetch_buffer: int = 4
    eval_batch_size: int = 16
    # Evaluation bags (every patch) are padded to this many patches times a power of two, the
    # smallest that holds the bag (few shapes to compile).
    eval_bag_bucket: int = 1024
    allow_missing_modalities: bool = False
    # Where training bags come from: "stream" (read from the dataset on the host each step),
    # "device" (every device holds its shard of patients' patches in memory and draws the
    # bags in the step; the host sends omics and keys), "auto" (device when it fits).
    patch_source: str = "stream"
    # The device bank's dtype: float16, or int8 with a per-patch absmax scale (half the memory).
    bank_dtype: str = "float16"
    # A rerun whose data.dir holds another dataset than its checkpoints were trained on refuses;
    # true: continue from the checkpoint on the new data (same features needed).
    continue_on_new_data: bool = False


@dataclasses.dataclass
class ModelConfig:
    hidden_size: int = 256
    num_prototypes: int = 16
    # The WSI tokenizer's prototype queries at initialisation: "zeros" (the authors': all start
    # equal, dropout in the encoder separates them) or "normal" (std 0.02). The random stream is
    # the same either way, so every other initial weight is too.
    prototype_init: str = "zeros"
    wsi_dim: int = 1536
    # Width of the per-group MLPs (tokenizers and reverse tokenizers).
    group_hidden: int = 256
    encoder_layers: int = 1
    encoder_heads: int = 8
    encoder_mlp_dim: int = 256
    encoder_dropout: float = 0.15
    decoder_layers: int = 1
    decoder_heads: int = 8
    decoder_mlp_dim: int = 256
    decoder_dropout: float = 0.0
    # The omics the model encodes and decodes, in model order; null: the dataset's (its
    # manifest order); []: a WSI-only encoder (fine-tuning).
    modalities: list[str] | None = None
    # The step computes the per-group MLPs in this many buckets of similar group size (1 = one
    # stack padded to the largest group). A speed knob: checkpoints hold the canonical layout.
    group_buckets: int = 4
    compute_dtype: str = "float32"
    # Recompute transformer blocks' activations in the backward pass (memory for compute).
    remat: bool = False
    layer_norm_eps: float = 1e-5
    # "standard" (torch's initialisation, one AdamW rate) or "mup" (maximal-update
    # parametrisation, `morpheus_jax.model.mup`: per-layer initialisation and learning rates
    # relative to a base model of these widths, attention logits q.k/d; rates tuned at the
    # base transfer across hidden sizes).
    parametrization: str = "standard"
    mup_base_hidden_size: int = 64
    mup_base_group_hidden: int = 64


@dataclasses.dataclass
class MaskingConfig:
    ratio: float = 0.75


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    # If set, overrides `steps` with epochs * ceil(pretrain patients / global_batch_size).
    epochs: int | None = None
    global_batch_size: int = 128
    # Split each batch into this many micro-batches whose gradients are summed before one
    # update (the same update, the activation memory of one micro-batch).
    grad_accum_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    # AdamW's first moment dtype ("bfloat16" halves its memory and traffic); the second
    # moment stays float32.
    mu_dtype: str = "float32"
    # "cosine": optax linear warm-up then cosine decay to end_lr_factor * lr over the run.
    # "paper": the authors' per-epoch factor min(linear warm-up, 0.5(1+cos(pi e / period))).
    # "constant": train.learning_rate throughout (the authors' classification fine-tuning).
    schedule: str = "cosine"
    warmup_steps: int = 100
    # Cosine decay length (default: the run's steps). Set it to keep the schedule fixed
    # when a run is extended by raising train.steps.
    decay_steps: int | None = None
    end_lr_factor: float = 0.0
    warmup_epochs: int = 10
    cosine_period_epochs: int = 500
    grad_clip_norm: float | None = None
    # A step with a non-finite loss or gradient norm: "stop" the run there (naming the step;
    # the last checkpoint is the one before), or "skip" its update and go on (the run stops
    # after train.max_skipped_in_a_row such steps in a row).
    nonfinite: str = "stop"
    max_skipped_in_a_row: int = 20
    log_every: int = 10
    eval_every: int = 200


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    # Also keep this many checkpoints with the lowest val_loss (those saved at eval steps).
    keep_best: int = 1
    # Multi-process runs agree on a SIGTERM/SIGINT (a host-blocking all-gather) every this
    # many steps, and at steps that log or evaluate; a single process checks every step.
    preemption_check_every: int = 10


def _default_rules() -> dict[str, list[str]]:
    # Logical axis → mesh axes. A parameter dimension takes its rule unless a mesh axis is
    # already used by another of its dimensions or does not divide it; then it is replicated.
    return {
        "batch": ["data", "fsdp"],
        "embed": ["fsdp"],
        "wsi_feature": ["fsdp"],
        "group_hidden": ["fsdp"],
        "mlp": ["tensor"],
        "qkv": ["tensor"],
        "heads_merged": ["tensor"],
        "embed_out": ["tensor"],
        "groups": ["tensor"],
        "group_in": [],
        "group_entries": [],
        "prototypes": [],
        # activations
        "act_embed": [],
        "act_heads": ["tensor"],
        "act_mlp": ["tensor"],
    }


@dataclasses.dataclass
class MeshConfig:
    """Device mesh; -1 takes the devices the other axes leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, list[str]] = dataclasses.field(default_factory=_default_rules)


@dataclasses.dataclass
class Config:
    run_dir: str = "runs/demo"
    seed: int = 1999
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)




def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a parsed YAML value against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            else:
                raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "3e-3" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = _hints(type(obj))
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(prefix + k for k in hints))
            raise ConfigError(f"unknown config key '{where}' (known here: {known})")
        current = getattr(obj, key)
        if isinstance(current, dict) and isinstance(value, dict):
            # Open mappings (sharding rules): keys are data, merged into the defaults.
            merged = dict(current)
            merged.update(_coerce(value, hints[key], where))
            setattr(obj, key, merged)
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of sub-keys, got {value!r}")
            _apply(current, value, where + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "model.hidden_size=64"]`` → nested dict of YAML-parsed values."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key part")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({yaml_problem(e)})") from None
    return nested


def read_yaml_mapping(path: Path, what: str, error: type[ConfigError] = ConfigError) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); ``error`` names the file otherwise."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise error(f"{path}: cannot read the {what} YAML ({yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level")
    return data


def yaml_problem(e: Exception) -> str:
    """A YAML parse error in one line: the problem and where (PyYAML's own text spans lines)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def from_dict(data: dict[str, Any] | None) -> Config:
    cfg = Config()
    _apply(cfg, data or {})
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Default: the shipped ``demo``; a bare name (``paper``) is a shipped config (`shipped_file`)."""
    path = shipped_file("demo" if path is None else path)
    data = read_yaml_mapping(path, "config")
    cfg = Config()
    try:
        _apply(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    _apply(cfg, parse_overrides(list(overrides)))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    m = cfg.model
    for name, heads in (("encoder", m.encoder_heads), ("decoder", m.decoder_heads)):
        if m.hidden_size % heads:
            raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.{name}_heads={heads}")
    if not 0.0 <= cfg.masking.ratio < 1.0:
        raise ConfigError(f"masking.ratio must be in [0, 1), got {cfg.masking.ratio}")
    if cfg.train.schedule not in ("cosine", "paper", "constant"):
        raise ConfigError(f"train.schedule must be 'cosine', 'paper' or 'constant', got {cfg.train.schedule!r}")
    if m.parametrization not in ("standard", "mup"):
        raise ConfigError(f"model.parametrization must be 'standard' or 'mup', got {m.parametrization!r}")
    for key in ("mup_base_hidden_size", "mup_base_group_hidden"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(m, key)}")
    if m.prototype_init not in ("zeros", "normal"):
        raise ConfigError(f"model.prototype_init must be 'zeros' or 'normal', got {m.prototype_init!r}")
    if cfg.train.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite must be 'stop' or 'skip', got {cfg.train.nonfinite!r}")
    if cfg.data.patch_source not in ("stream", "device", "auto"):
        raise ConfigError(f"data.patch_source must be 'stream', 'device' or 'auto', got {cfg.data.patch_source!r}")
    if cfg.data.bank_dtype not in ("float16", "int8"):
        raise ConfigError(f"data.bank_dtype must be 'float16' or 'int8', got {cfg.data.bank_dtype!r}")
    if cfg.train.mu_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"train.mu_dtype must be float32 or bfloat16, got {cfg.train.mu_dtype!r}")
    if m.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.compute_dtype must be float32 or bfloat16, got {m.compute_dtype!r}")
    # Empty: a WSI-only encoder (fine-tuning); pretraining needs at least one (engine.run).
    if m.modalities is not None:
        for name in m.modalities:
            check_name(name, "model.modalities")
        if len(set(m.modalities)) != len(m.modalities):
            raise ConfigError(f"model.modalities must be distinct names, got {m.modalities}")
    if cfg.train.global_batch_size < 1 or cfg.train.steps < 0:
        raise ConfigError("train.global_batch_size must be >= 1 and train.steps >= 0")
    if not 0.0 < cfg.data.train_fraction <= 1.0:
        raise ConfigError(f"data.train_fraction must be in (0, 1], got {cfg.data.train_fraction}")
    if m.group_buckets < 1:
        raise ConfigError("model.group_buckets must be >= 1")
    for key, lowest in _LOWER_BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < lowest:
            raise ConfigError(f"{key} must be >= {lowest:g}, got {value}")
    for key in ("train.learning_rate",):
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name) > 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(getattr(cfg, section), name)}")
    for name in ("encoder_dropout", "decoder_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(m, name)}")


# Ranges checked by `validate` (a value below the bound is a ConfigError naming the key).
_LOWER_BOUNDS = {
    "data.num_patches": 1, "data.worker_count": 0, "data.prefetch_buffer": 1, "data.eval_batch_size": 1,
    "data.eval_bag_bucket": 1,
    "model.hidden_size": 1, "model.num_prototypes": 1, "model.wsi_dim": 1, "model.group_hidden": 1,
    "model.encoder_layers": 0, "model.encoder_heads": 1, "model.encoder_mlp_dim": 1,
    "model.decoder_layers": 0, "model.decoder_heads": 1, "model.decoder_mlp_dim": 1, "model.layer_norm_eps": 0.0,
    "train.epochs": 1, "train.weight_decay": 0.0, "train.b1": 0.0, "train.b2": 0.0, "train.warmup_steps": 0,
    "train.decay_steps": 1, "train.end_lr_factor": 0.0, "train.warmup_epochs": 0, "train.cosine_period_epochs": 1,
    "train.grad_clip_norm": 0.0, "train.max_skipped_in_a_row": 1, "train.grad_accum_steps": 1, "train.log_every": 1, "train.eval_every": 0,
    "checkpoint.every": 0, "checkpoint.keep": 1, "checkpoint.keep_best": 0, "checkpoint.preemption_check_every": 1,
}


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Atomic write of the resolved config as YAML."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Model settings that change how the step computes or how weights start, not the function or
# what a checkpoint stores: a run may resume with other values.
COMPUTE_ONLY = ("group_buckets", "remat", "prototype_init")


def model_modalities(model: ModelConfig, available) -> list[str]:
    """``model.modalities``, or (when null) the modalities ``available`` (a dataset's, a
    checkpoint's, the layouts given), in their order."""
    return list(available) if model.modalities is None else list(model.modalities)


def with_modalities(cfg: Config, available) -> Config:
    """``cfg`` with ``model.modalities`` resolved against ``available`` (what a run records)."""
    model = dataclasses.replace(cfg.model, modalities=model_modalities(cfg.model, available))
    return dataclasses.replace(cfg, model=model)


def model_config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Dotted keys whose values differ between two model configs (`COMPUTE_ONLY` ones aside)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"model.{k}: {da[k]!r} != {db[k]!r}" for k in da if da[k] != db.get(k) and k not in COMPUTE_ONLY]


# -- fine-tuning ----------------------------------------------------------------------------------

@dataclasses.dataclass
class FinetuneConfig:
    """`morpheus finetune …` settings, overridden as ``finetune.<field>=value`` (the flags are
    aliases); defaults are §3's fine-tuning values. The optimizer and schedule fields mean what
    the `TrainConfig` fields of the same names mean (`train_config`)."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 1e-2
    dropout: float = 0.35
    warmup_epochs: int = 5
    cosine_period_epochs: int = 25
    num_patches: int | None = None          # None: the pretraining config's data.num_patches
    eval_batch_size: int | None = None      # None: the pretraining config's data.eval_batch_size
    seed: int = 1999
    pretrained: bool = True                 # False: the same model from random weights
    schedule: str = "paper"                 # "paper" (per-epoch warm-up + cosine) or "constant"
    grad_accum_steps: int = 1               # micro-batches per update (batch_size is the update's)

    def train_config(self) -> TrainConfig:
        """The optimizer and learning-rate schedule as the engine reads them (AdamW β 0.9, 0.999)."""
        return TrainConfig(learning_rate=self.learning_rate, weight_decay=self.weight_decay, b1=0.9, b2=0.999,
                           schedule=self.schedule, warmup_epochs=self.warmup_epochs,
                           cosine_period_epochs=self.cosine_period_epochs)


# The flag each fine-tuning key is also given by (named in errors).
FINETUNE_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "learning_rate": "--lr",
                  "weight_decay": "--weight-decay", "dropout": "--dropout", "warmup_epochs": "--warmup-epochs",
                  "cosine_period_epochs": "--cosine-period", "num_patches": "--num-patches",
                  "eval_batch_size": "--eval-batch-size", "seed": "--seed", "schedule": "--schedule",
                  "grad_accum_steps": "--grad-accum-steps"}


def load_finetune_config(values: dict[str, Any], overrides: list[str] = ()) -> FinetuneConfig:
    """`FinetuneConfig` from ``values`` (field → value; the flags) then ``finetune.<field>=value``
    overrides, type-checked like the pretraining config and validated."""
    cfg = FinetuneConfig()
    _apply(cfg, values, "finetune.")
    parsed = parse_overrides(list(overrides))
    other = sorted(set(parsed) - {"finetune"})
    if other:
        raise ConfigError(f"fine-tuning overrides are finetune.<key>=value; got {other[0]}.… "
                          f"(keys: {', '.join(f'finetune.{k}' for k in FINETUNE_FLAGS)}, finetune.pretrained)")
    if parsed:
        if not isinstance(parsed["finetune"], dict):
            raise ConfigError("override 'finetune=…' needs a key: finetune.<key>=value")
        _apply(cfg, parsed["finetune"], "finetune.")
    validate_finetune(cfg)
    return cfg


def validate_finetune(f: FinetuneConfig) -> None:
    def name(key: str) -> str:
        return f"finetune.{key} ({FINETUNE_FLAGS[key]})"

    for key in ("epochs", "batch_size", "grad_accum_steps", "warmup_epochs", "cosine_period_epochs",
                "num_patches", "eval_batch_size"):
        value = getattr(f, key)
        if value is not None and value < 1:
            raise ConfigError(f"{name(key)} must be at least 1, got {value}")
    if not 0.0 <= f.dropout < 1.0:
        raise ConfigError(f"{name('dropout')} must be in [0, 1), got {f.dropout}")
    if f.learning_rate <= 0:
        raise ConfigError(f"{name('learning_rate')} must be positive, got {f.learning_rate}")
    if f.batch_size % f.grad_accum_steps:
        raise ConfigError(f"{name('batch_size')} {f.batch_size} must be a multiple of {name('grad_accum_steps')} "
                          f"{f.grad_accum_steps}")
    if f.schedule not in ("paper", "constant"):
        raise ConfigError(f"{name('schedule')} must be paper or constant, got {f.schedule!r}")
