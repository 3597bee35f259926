import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from morpheus_jax.cli.main import build_parser
from morpheus_jax.core.config import Config

ROOT = Path(__file__).resolve().parent.parent


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "morpheus_jax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in _subcommands():
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_flag_has_help(name):
    sub = _subcommands()[name]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 8, f"{name}: {action.dest} has no help"
    text = sub.format_help()
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in text


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in _keys(Config()) if f"`{k}`" not in readme]
    assert not missing, f"config keys not in README: {missing}"
