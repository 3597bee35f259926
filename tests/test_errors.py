"""The error contract (core/errors.py): a `UserError` reaches the user of ``morpheus`` as one
line ``morpheus COMMAND: error: …`` and exit status 2; anything else is a bug and keeps its
traceback. Everything here is cheap: no training, no compiled model."""

import inspect
import subprocess
import sys

import pytest

from morpheus_jax.cli.main import main
from morpheus_jax.core import errors
from morpheus_jax.core.config import MeshConfig
from morpheus_jax.core.errors import ConfigError, InputError, MorpheusError, UserError
from morpheus_jax.data import records


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"morpheus {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- (a), (b): a bug keeps its traceback, a user error is one line ----------------------------------

def test_library_bug_reaches_the_caller(monkeypatch, tmp_path, capsys):
    def broken(root, **kw):
        raise ValueError("a bug in load_manifest")

    monkeypatch.setattr(records, "load_manifest", broken)
    with pytest.raises(ValueError, match="a bug in load_manifest") as info:
        main(["inspect", str(tmp_path)])
    assert not isinstance(info.value, UserError)
    assert "error:" not in capsys.readouterr().err  # not printed as a user error


def test_user_error_is_one_line_naming_the_path(tmp_path, capsys):
    absent = tmp_path / "no_dataset_here"
    assert main(["inspect", str(absent)]) == 2
    line = _one_error_line(capsys, "inspect")
    assert str(absent) in line


def test_corrupt_manifest_is_a_dataset_error(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{not json")
    assert main(["inspect", str(tmp_path)]) == 2
    assert str(tmp_path / "manifest.json") in _one_error_line(capsys, "inspect")


def test_user_error_from_a_subprocess_has_no_traceback(tmp_path):
    absent = tmp_path / "absent"
    out = subprocess.run([sys.executable, "-m", "morpheus_jax.cli", "inspect", str(absent)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("morpheus inspect: error: ") and str(absent) in lines[0], out.stderr


# -- (c): a mesh that does not fit the devices --------------------------------------------------------

def test_mesh_larger_than_the_devices_is_a_config_error():
    import jax

    from morpheus_jax.core.sharding import make_mesh, mesh_shape

    n = jax.device_count()
    assert n == 8  # conftest: --xla_force_host_platform_device_count=8
    with pytest.raises(ConfigError, match=r"mesh\.data=64.*8 are present"):
        make_mesh(MeshConfig(data=64, fsdp=1, tensor=1))
    for cfg, match in [(MeshConfig(data=-1, fsdp=-1, tensor=1), r"mesh\.data=-1 mesh\.fsdp=-1.*at most one"),
                       (MeshConfig(data=0, fsdp=1, tensor=1), r"mesh\.data=0.*positive"),
                       (MeshConfig(data=-1, fsdp=3, tensor=1), r"mesh\.fsdp=3.*do not divide the 8 devices")]:
        with pytest.raises(ConfigError, match=match):
            mesh_shape(cfg, n)
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), n) == (4, 2, 1)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from conftest import synth_dataset

    root = tmp_path_factory.mktemp("errors_cohort")
    synth_dataset(root, patients=8, seed=0, dim=8, patches_per_slide=16)
    return root / "ds"


def test_pretrain_with_too_large_a_mesh_exits_2(small_dataset, tmp_path, capsys):
    """The mesh is checked before any data work or compiling."""
    code = main(["pretrain", "--no-progress", f"data.dir={small_dataset}", "data.raw_dir=null", "model.wsi_dim=8",
                 "mesh.data=64", f"run_dir={tmp_path / 'r'}"])
    assert code == 2
    line = _one_error_line(capsys, "pretrain")
    assert "mesh.data=64" in line and "8 are present" in line


def test_pretrain_checks_the_mesh_before_the_dataset(tmp_path, capsys):
    """A bad mesh fails before a demo cohort would be synthesised and prepared."""
    code = main(["pretrain", "--no-progress", f"data.dir={tmp_path / 'absent'}", f"data.raw_dir={tmp_path / 'raw'}",
                 "mesh.data=64", f"run_dir={tmp_path / 'r'}"])
    assert code == 2
    assert "mesh.data=64" in _one_error_line(capsys, "pretrain")
    assert not (tmp_path / "raw").exists() and not (tmp_path / "absent").exists()


def test_pretrain_without_a_dataset_names_it(tmp_path, capsys):
    code = main(["pretrain", "--no-progress", f"data.dir={tmp_path / 'absent'}", "data.raw_dir=null",
                 f"run_dir={tmp_path / 'r'}"])
    assert code == 2
    assert str(tmp_path / "absent") in _one_error_line(capsys, "pretrain")


# -- (d): the hierarchy, and the CLI catches UserError only ------------------------------------------

ERROR_CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass)
                 if issubclass(c, MorpheusError) and c.__module__ == errors.__name__]


def test_every_error_a_user_meets_is_a_user_error():
    names = {c.__name__ for c in ERROR_CLASSES}
    assert {"InputError", "ConfigError", "DataError", "PrepareError", "DatasetError", "DownstreamError",
            "ExportError", "LayoutError", "WeightFileError", "CheckpointError", "CheckpointNotFound",
            "OutputExists", "MissingPath"} <= names
    for cls in ERROR_CLASSES:
        if cls not in (MorpheusError, UserError):
            assert issubclass(cls, UserError), cls
    # Python callers keep catching the built-in exceptions.
    assert issubclass(InputError, ValueError)
    assert issubclass(errors.CheckpointNotFound, FileNotFoundError)
    assert issubclass(errors.MissingPath, FileNotFoundError)
    assert issubclass(errors.OutputExists, FileExistsError)


@pytest.mark.parametrize("cls", [c for c in ERROR_CLASSES if issubclass(c, UserError)], ids=lambda c: c.__name__)
def test_cli_prints_every_user_error(cls, monkeypatch, tmp_path, capsys):
    def raising(root, **kw):
        raise cls(f"{root}: the message")

    monkeypatch.setattr(records, "load_manifest", raising)
    assert main(["inspect", str(tmp_path)]) == 2
    assert _one_error_line(capsys, "inspect") == f"morpheus inspect: error: {tmp_path}: the message"


@pytest.mark.parametrize("cls", [ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError,
                                 RuntimeError, MorpheusError], ids=lambda c: c.__name__)
def test_cli_lets_everything_else_through(cls, monkeypatch, tmp_path):
    def raising(root, **kw):
        raise cls("not a user error")

    monkeypatch.setattr(records, "load_manifest", raising)
    with pytest.raises(cls):
        main(["inspect", str(tmp_path)])


def test_multiline_user_error_is_printed_on_one_line(monkeypatch, tmp_path, capsys):
    def raising(root, **kw):
        raise errors.DatasetError("first part\n  second part\n")

    monkeypatch.setattr(records, "load_manifest", raising)
    assert main(["inspect", str(tmp_path)]) == 2
    assert _one_error_line(capsys, "inspect") == "morpheus inspect: error: first part second part"


# -- (e): cheap bad inputs of the commands ----------------------------------------------------------

def _cases(tmp):
    full = tmp / "full"
    full.mkdir()
    (full / "x").write_text("taken")
    (tmp / "three.csv").write_text("params,samples,loss\n1e3,1e4,3.0\n2e3,1e4,2.9\n4e3,1e4,2.8\n")
    (tmp / "six.csv").write_text("params,samples,loss\n" + "".join(f"{2 ** i}e3,1e4,{3 - i / 10}\n" for i in range(6)))
    (tmp / "sizes.json").write_text("{not json")
    (tmp / "ladder.yaml").write_text("axes: [1,\n")
    (tmp / "fixed.yaml").write_text("fixed: [train.steps, 10]\n")
    (tmp / "bad_config.yaml").write_text("train: {steps: [1,\n")
    return [
        (["pretrain", "--config", str(tmp / "bad_config.yaml")], "pretrain", str(tmp / "bad_config.yaml")),
        (["pretrain", "train.steps=[1"], "pretrain", "train.steps=[1"),
        (["pretrain", "data.num_patches=0"], "pretrain", "data.num_patches"),
        (["pretrain", "train.learning_rate=-1e-3"], "pretrain", "train.learning_rate"),
        (["pretrain", "train.log_every=0"], "pretrain", "train.log_every"),
        (["pretrain", "--config", str(tmp)], "pretrain", str(tmp)),
        (["prepare", "--out", str(tmp / "o")], "prepare", "--raw"),
        (["synth", str(full)], "synth", str(full)),
        (["synth", str(tmp / "s"), "--patients", "1"], "synth", "--patients"),
        (["synth", str(tmp / "s"), "--patches-per-slide", "0"], "synth", "--patches-per-slide"),
        (["scaling", "fit", "--out", str(tmp / "o")], "scaling fit", "--table"),
        (["scaling", "fit", "--table", str(tmp / "absent.csv"), "--out", str(tmp / "o")], "scaling fit",
         str(tmp / "absent.csv")),
        (["scaling", "fit", "--table", str(tmp / "three.csv"), "--out", str(tmp / "o")], "scaling fit", "5 runs"),
        (["scaling", "fit", "--table", str(tmp / "six.csv"), "--confidence", "2", "--out", str(tmp / "o")],
         "scaling fit", "--confidence"),
        (["scaling", "flops", "--group-sizes", str(tmp / "sizes.json")], "scaling flops", str(tmp / "sizes.json")),
        (["sweep", str(tmp / "ladder.yaml"), "--dry-run"], "sweep", str(tmp / "ladder.yaml")),
        (["sweep", str(tmp / "fixed.yaml"), "--dry-run"], "sweep", "'fixed'"),
        (["export", "--checkpoint", str(tmp / "nope"), "--out", str(tmp / "x.safetensors")], "export",
         str(tmp / "nope")),
        (["inspect", str(tmp / "nope")], "inspect", str(tmp / "nope")),
        (["pretrain", "--config", "no_such_config"], "pretrain", "no_such_config"),
        (["pretrain", "--coordinator", "127.0.0.1:1"], "pretrain", "--num-processes"),
    ]


def test_cheap_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    for argv, command, named in _cases(tmp_path):
        assert main(argv) == 2, argv
        line = _one_error_line(capsys, command)
        assert named in line, (argv, line)
    assert not (tmp_path / "o").exists()  # nothing written before the error


# -- library functions a command reaches with user data -------------------------------------------

def test_metrics_raise_input_errors():
    from morpheus_jax.metrics.classification import roc_auc
    from morpheus_jax.metrics.survival import event_from_censorship

    with pytest.raises(InputError, match="positive and negative"):
        roc_auc([0, 0, 0], [0.1, 0.2, 0.3])      # a cross-validation fold holding one class
    with pytest.raises(InputError, match="censorship"):
        event_from_censorship([0, 2])


def test_sweep_keeps_going_and_shows_a_bug_with_its_traceback(tmp_path, monkeypatch):
    from morpheus_jax.apps.scaling import sweep as sw
    from morpheus_jax.apps.scaling.ladder import Ladder, RunSpec

    ladder = Ladder(name="t", base="demo", out=tmp_path, fixed={}, axes=[], launch={})
    rows = [{"run": RunSpec(name, tmp_path / name, {}, {}), "config": None, "steps": 1, "layouts": None,
             "status": "pending"} for name in ("user", "bug")]
    failures = iter([errors.DatasetError("data/x: no prepared dataset"), KeyError("internal")])

    def pretrain(cfg, progress):
        raise next(failures)

    monkeypatch.setattr(sw, "pretrain", pretrain)
    lines = []
    assert sw.run_local(ladder, rows, echo=lines.append) == {"user": "failed", "bug": "failed"}
    user = next(x for x in lines if x.startswith("[1/2] user failed"))
    bug = next(x for x in lines if x.startswith("[2/2] bug failed"))
    assert user == "[1/2] user failed: data/x: no prepared dataset"
    assert "Traceback" in bug and "KeyError: 'internal'" in bug


# -- the manifest type checks itself -----------------------------------------------------------------

@pytest.mark.parametrize("damage, named", [
    (lambda m: m.pop("patches"), "patches"),
    (lambda m: m["counts"].update(pretrain=-1), "counts.pretrain"),
    (lambda m: m["modalities"]["rna"].update(features=[]), "modalities.rna.features"),
    (lambda m: m.update(shards=[{"split": "pretrain"}]), "shards"),
    (lambda m: m.update(schema_version=99), "schema_version"),
])
def test_a_damaged_manifest_is_named_field_by_field(small_dataset, tmp_path, capsys, damage, named):
    import json
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(small_dataset, ds)
    manifest = json.loads((ds / "manifest.json").read_text())
    damage(manifest)
    (ds / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(ds)]) == 2
    line = _one_error_line(capsys, "inspect")
    assert str(ds / "manifest.json") in line and named in line
