import pytest
import yaml

from morpheus_jax.core.config import CONFIG_DIR, load_config, save_config
from morpheus_jax.core.errors import ConfigError


def test_demo_is_default_and_paper_matches_reference():
    demo = load_config()
    assert demo.run_dir == "runs/demo" and demo.data.dir.endswith("dataset")
    paper = load_config("paper")
    m = paper.model
    assert (m.hidden_size, m.num_prototypes, m.encoder_layers, m.encoder_heads, m.encoder_mlp_dim) == (256, 16, 1, 8, 256)
    assert (m.decoder_layers, m.decoder_heads, m.decoder_dropout, m.encoder_dropout) == (1, 8, 0.0, 0.15)
    t = paper.train
    assert (t.learning_rate, t.weight_decay, t.global_batch_size, t.epochs, t.schedule) == (5e-4, 1e-3, 128, 300, "paper")
    assert (t.warmup_epochs, t.cosine_period_epochs, paper.seed, paper.masking.ratio) == (10, 500, 1999, 0.75)


def test_overrides_types_and_required_keys():
    cfg = load_config(None, ["train.steps=7", "model.hidden_size=48", "model.encoder_heads=4", "model.decoder_heads=4",
                             "seed=3", "checkpoint.every=2", "train.global_batch_size=6", "model.encoder_layers=2",
                             "model.num_prototypes=5", "data.dir=/x/y", "run_dir=/tmp/r", "train.grad_clip_norm=1.0",
                             "model.modalities=[rna,cnv]", "mesh.rules.groups=[]"])
    assert cfg.train.steps == 7 and cfg.model.hidden_size == 48 and cfg.seed == 3 and cfg.checkpoint.every == 2
    assert cfg.train.global_batch_size == 6 and cfg.model.encoder_layers == 2 and cfg.model.num_prototypes == 5
    assert cfg.data.dir == "/x/y" and cfg.run_dir == "/tmp/r" and cfg.train.grad_clip_norm == 1.0
    assert cfg.model.modalities == ["rna", "cnv"]
    assert cfg.mesh.rules["groups"] == [] and cfg.mesh.rules["mlp"] == ["tensor"]


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("modle.hidden_size=3", "unknown config key 'modle'"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("model.hidden_size=30", "not divisible"),
    ("masking.ratio=1.5", "masking.ratio"),
    ("train.steps", "key=value"),
])
def test_bad_overrides_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'train.lr'"):
        load_config(path)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=11", "model.hidden_size=96", "model.encoder_heads=4", "model.decoder_heads=4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 11


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "rules":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_every_config_file_loads_with_its_values_and_round_trips(tmp_path):
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {p.stem for p in paths} >= {"demo", "paper"}
    for path in paths:
        cfg = load_config(path)
        for key, value in _flat(yaml.safe_load(path.read_text())).items():
            obj = cfg
            for part in key.split("."):
                obj = getattr(obj, part)
            assert obj == pytest.approx(value) if isinstance(value, float) else obj == value, (path.name, key)
        save_config(cfg, tmp_path / path.name)
        assert load_config(tmp_path / path.name) == cfg, path.name
