"""What the subcommands share: flag helpers and help texts.

Every ``cli`` module imports the library inside its command functions, so ``morpheus --help``
and argument errors answer without starting JAX (start-up time, not cycles: nothing below
``cli`` imports it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from morpheus_jax.core.errors import ConfigError

CKPT_HELP = "a run folder (its latest checkpoint), a checkpoints folder or one checkpoint step folder"
DATASET_HELP = "prepared dataset folder (morpheus prepare)"


def modality_paths(values: list[str] | None, flag: str) -> dict[str, Path]:
    """``["rna=a.csv", …]`` → ``{"rna": Path("a.csv"), …}``."""
    out = {}
    for item in values or []:
        if "=" not in item:
            raise ConfigError(f"{flag} expects MODALITY=PATH, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = Path(v)
    return out


def add_config_flags(s: argparse.ArgumentParser, example: str) -> None:
    """``--config`` and the dotted overrides, as every config-driven command takes them."""
    s.add_argument("--config", help="YAML config file or a name of a shipped config (demo, paper; default demo)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted config overrides, e.g. {example}")
