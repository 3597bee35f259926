"""The package works installed from its wheel, away from the checkout.

Builds the wheel (pip, no build isolation, offline) from a copy of the checkout's files, checks
its contents against the checkout (every shipped config byte for byte, every module, no tests/ or
top-level configs/), then runs the shipped-config entry points from the unzipped wheel in a
subprocess whose cwd is an empty folder and whose PYTHONPATH is only the unzipped wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "morpheus_jax"
CONFIGS = PKG / "configs"


def _package_files(root: Path, pattern: str = "*") -> dict[str, Path]:
    """Files under ``root`` matching ``pattern`` by wheel path (``morpheus_jax/...``), caches left out."""
    return {p.relative_to(REPO).as_posix(): p for p in sorted(root.rglob(pattern))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def _source_files() -> list[str]:
    """The checkout's files as a fresh clone plus uncommitted work would have them: tracked
    and untracked-but-not-ignored (no build/, *.egg-info, runs/, data/)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True, timeout=60).stdout
        return [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        skip = {".git", "build", "dist", "runs", "data", "__pycache__", ".venv", "venv", ".ci-venv"}
        return [p.relative_to(REPO).as_posix() for p in REPO.rglob("*")
                if not (set(p.relative_to(REPO).parts) & skip) and not p.name.endswith(".egg-info")
                and not any(q.name.endswith(".egg-info") for q in p.parents) and (p.is_file() or p.is_symlink())]


def _copy_source(dst: Path) -> None:
    # setuptools builds in the source tree (build/, *.egg-info): a copy keeps the checkout clean
    # and keeps a stale build/lib (modules since deleted) out of the wheel under test.
    for rel in _source_files():
        src, out = REPO / rel, dst / rel
        if not (src.exists() or src.is_symlink()):
            continue  # tracked but deleted in the work tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        elif src.is_file():
            shutil.copy2(src, out)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    try:
        import setuptools  # noqa: F401  (the build backend, used without build isolation)
    except ImportError:
        pytest.skip("setuptools is not installed: the wheel cannot be built offline (--no-build-isolation)")
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    _copy_source(src)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--no-cache-dir", "-w", str(dist), str(src)],
                          check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    wheels = list(dist.glob("morpheus_jax-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}, found {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def unzipped(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        configs = _package_files(CONFIGS)
        assert configs, f"no configs under {CONFIGS}"
        shipped = {n for n in names if n.startswith("morpheus_jax/configs/") and not n.endswith("/")}
        assert sorted(shipped) == sorted(configs), "configs in the wheel differ from morpheus_jax/configs/"
        for name, path in configs.items():
            assert zf.read(name) == path.read_bytes(), f"{name} in the wheel differs from {path}"
        modules = _package_files(PKG, "*.py")
        missing = sorted(set(modules) - names)
        assert not missing, f"modules missing from the wheel: {missing}"
        assert "morpheus_jax/py.typed" in names
        assert not [n for n in names if n.startswith("tests/")], "tests/ is in the wheel"
        assert not [n for n in names if n.startswith("configs/")], "the top-level configs/ is in the wheel"
        tops = {n.split("/", 1)[0] for n in names}
        assert {t for t in tops if not t.endswith(".dist-info")} == {"morpheus_jax"}, f"unexpected top-level {tops}"
        [ep] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "morpheus = morpheus_jax.cli:main" in zf.read(ep).decode()


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The venv's python with only the unzipped wheel on PYTHONPATH, from an empty folder."""
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run([sys.executable, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def empty(tmp_path) -> Path:
    d = tmp_path / "elsewhere"
    d.mkdir()
    return d


def _hidden(name: str) -> int:
    return yaml.safe_load((CONFIGS / name).read_text())["model"]["hidden_size"]


def test_installed_configs_load(unzipped, empty):
    code = ("import json, sys\n"
            "from morpheus_jax.core.config import load_config\n"
            "c = load_config('paper'); d = load_config(None)\n"
            "print(c.model.hidden_size, d.model.hidden_size)\n"
            "print(json.dumps({m: getattr(v, '__file__', None) for m, v in sys.modules.items()"
            " if m == 'morpheus_jax' or m.startswith('morpheus_jax.')}))\n")
    proc = _run(unzipped, empty, "-c", code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sizes, files = proc.stdout.strip().splitlines()[-2:]
    assert sizes.split() == [str(_hidden("paper.yaml")), str(_hidden("demo.yaml"))]
    files = json.loads(files)
    assert "morpheus_jax" in files
    root = unzipped.resolve()
    outside = {m: f for m, f in files.items() if f is not None and root not in Path(f).resolve().parents}
    assert not outside, f"imported from outside the unzipped wheel (the checkout or an editable install?): {outside}"


def test_installed_sweep_dry_run(unzipped, empty):
    from morpheus_jax.apps.scaling.ladder import expand, load_ladder

    runs = [r.name for r in expand(load_ladder("tiny"))]
    assert runs
    proc = _run(unzipped, empty, "-m", "morpheus_jax.cli", "sweep", "tiny", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert not [r for r in runs if r not in listed], f"runs missing from the dry run:\n{proc.stdout}"
    assert f"{len(runs)} runs" in proc.stdout, proc.stdout


def test_installed_scaling_flops(unzipped, empty):
    proc = _run(unzipped, empty, "-m", "morpheus_jax.cli", "scaling", "flops", "--config", "paper",
                "--group-sizes", "paper_group_sizes", "--batch", "32")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FLOPs" in proc.stdout, proc.stdout
