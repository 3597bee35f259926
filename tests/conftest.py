import os

# Tests run on CPU with a few simulated devices; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile
from pathlib import Path

import jax

# Runs in one session rebuild identical programs (fresh closures): share compiled code,
# with the subprocesses the tests start too.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "morpheus-jax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import numpy as np
import pytest

from morpheus_jax.core.config import ModelConfig
from morpheus_jax.core.spec import GroupLayout


def make_layouts(seed=0, spec=(("rna", 6, 40, True), ("dnam", 5, 30, False), ("cnv", 4, 25, False)), buckets=2):
    """Small random group layouts; rna groups overlap."""
    rng = np.random.default_rng(seed)
    out = {}
    for m, g, f, overlap in spec:
        if overlap:
            groups = [sorted(rng.choice(f, rng.integers(3, 12), replace=False).tolist()) for _ in range(g)]
            used = sorted({i for grp in groups for i in grp})
            remap = {old: new for new, old in enumerate(used)}
            groups = [[remap[i] for i in grp] for grp in groups]
            nf = len(used)
        else:
            perm = rng.permutation(f)
            cuts = np.sort(rng.choice(np.arange(1, f), g - 1, replace=False))
            groups = [sorted(p.tolist()) for p in np.split(perm, cuts)]
            nf = f
        out[m] = GroupLayout.build([f"{m}_g{i}" for i in range(g)], groups, nf, buckets)
    return out


def tiny_model_config(**kw):
    # Distinct prototype queries (normal init) so that equivalence tests see every prototype path.
    base = dict(hidden_size=32, num_prototypes=4, wsi_dim=24, group_hidden=16, encoder_heads=4, decoder_heads=4,
                encoder_mlp_dim=32, decoder_mlp_dim=32, group_buckets=2, prototype_init="normal",
                modalities=["rna", "dnam", "cnv"])      # make_layouts' modalities, as a run records them
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _own_working_folder(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh empty folder: nothing it does depends on (or writes to) the
    folder pytest was started in (a newcomer runs the suite where the demo left data/ and runs/)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def layouts():
    return make_layouts()


def jit_model(model, **static):
    """``f(wsi, mask, omics, plan=None, key=None)`` → jitted ``model(...)`` (eager dispatch of
    hundreds of small ops is far slower than one compile)."""
    from flax import nnx

    @nnx.jit
    def call(m, wsi, mask, omics, plan, key):
        return m(wsi, mask, omics, plan, key=key, **static)

    return lambda wsi, mask, omics, plan=None, key=None: call(model, wsi, mask, omics, plan, key)


TINY_DIM = 32


def synth_dataset(root, *, patients: int, seed: int, dim: int, patches_per_slide: int = 40, **options):
    """Write a synthetic cohort to ``root/raw`` and prepare it into ``root/ds``.

    ``options``: extra `PrepareOptions` fields. Returns the prepared manifest."""
    from morpheus_jax.data.prepare import PrepareOptions, RawCohort, prepare
    from morpheus_jax.data.synth import write_synthetic_cohort

    write_synthetic_cohort(root / "raw", n_patients=patients, seed=seed, feature_dim=dim,
                           mean_patches_per_slide=patches_per_slide, progress=False)
    return prepare(RawCohort.from_dir(root / "raw"), root / "ds",
                   PrepareOptions(wsi_dim=dim, progress=False, **options))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared synthetic cohort (80 patients, 32-dim patches) shared by training tests."""
    root = tmp_path_factory.mktemp("tiny_cohort")
    synth_dataset(root, patients=80, seed=11, dim=TINY_DIM, patches_per_slide=60)
    return root / "ds"


# The schedule's length (decay_steps) and the evaluation bag size are fixed so that runs of
# different lengths compile the same programs (shared through the compilation cache).
TINY_OVERRIDES = [
    "data.num_patches=48", f"model.wsi_dim={TINY_DIM}", "model.hidden_size=32", "model.num_prototypes=4",
    "model.group_hidden=32", "model.encoder_heads=4", "model.decoder_heads=4", "model.encoder_mlp_dim=64",
    "model.decoder_mlp_dim=64", "model.encoder_dropout=0.1", "train.steps=30", "train.decay_steps=40",
    "train.global_batch_size=8", "train.learning_rate=3e-3", "train.warmup_steps=5", "train.log_every=1",
    "train.eval_every=0", "checkpoint.every=100", "data.eval_bag_bucket=1024", "mesh.data=1"]


def tiny_overrides(dataset, run_dir, *extra) -> list[str]:
    """Overrides of a small pretraining run on `tiny_dataset` (later ones win)."""
    return [f"data.dir={dataset}", "data.raw_dir=null", f"run_dir={run_dir}", *TINY_OVERRIDES, *extra]


def tiny_run_config(dataset, run_dir, *extra):
    from morpheus_jax.core.config import load_config

    return load_config(None, tiny_overrides(dataset, run_dir, *extra))


# -- checkpoints and models with named features (test_export, test_torch_parity, test_api) ---------

def named_setup(seed=0, **model_kw):
    """(config, groups {m: {g: [names]}}, features {m: [names]}, layouts) from the tiny layouts;
    rna groups overlap and the canonical order is not the walk order."""
    from morpheus_jax.core.config import Config
    from morpheus_jax.core.spec import GroupLayout

    cfg = Config()
    cfg.model = tiny_model_config(**model_kw)
    base = make_layouts(seed, buckets=cfg.model.group_buckets)
    groups = {m: {n: [f"{m}_f{i}" for i in idx] for n, idx in zip(lay.group_names, lay.feature_index)}
              for m, lay in base.items()}
    features = {m: [f"{m}_f{i}" for i in range(lay.num_features)] for m, lay in base.items()}
    layouts = {m: GroupLayout.from_mapping(groups[m], features[m], cfg.model.group_buckets) for m in base}
    assert layouts == base
    return cfg, groups, features, layouts


def random_params(cfg, layouts, seed=0, with_decoders=True):
    """Non-trivial values everywhere (LayerNorm weights/biases, tokens, prototypes); padding stays zero."""
    from morpheus_jax.model.morpheus import init_model
    from morpheus_jax.model.params import ParamCodec

    model = init_model(cfg.model, layouts, seed, with_decoders=with_decoders)
    flat = {k: np.asarray(v) for k, v in ParamCodec(model).flatten(model).items()}
    rng = np.random.default_rng(seed + 100)
    out = {}
    for k, v in flat.items():
        noise = rng.normal(size=v.shape).astype(np.float32) * 0.3
        if k.endswith(".weight") and v.ndim == 1:
            out[k] = 1.0 + noise
        elif np.all(v == 0):
            out[k] = noise
        else:
            out[k] = v + 0.3 * noise * (v != 0)
        out[k] = out[k].astype(np.float32)
    return out


def save_checkpoint(run_dir, cfg, groups, features, params, step=7, optimizer=True):
    """``run_dir/checkpoints/<step>``: as training writes it (state with AdamW state and RNG, spec;
    no data item), or with ``optimizer=False`` as import writes it (step and parameters)."""
    import jax.numpy as jnp
    import optax

    from morpheus_jax.ckpt.checkpoint import write_checkpoint
    from morpheus_jax.ckpt.store import Checkpointer
    from morpheus_jax.core.spec import ModelSpec
    from morpheus_jax.engine.state import init_state

    if not optimizer:
        return write_checkpoint(Path(run_dir) / "checkpoints", step, params, ModelSpec.build(cfg, groups, features))
    state = init_state({k: jnp.asarray(v) for k, v in params.items()}, optax.adamw(1e-3), 0)
    state["step"] = jnp.asarray(step, jnp.int32)
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", keep=2, async_save=False)
    ckpt.save(step, state, None, ModelSpec.build(cfg, groups, features))
    ckpt.close()
    return Path(run_dir) / "checkpoints" / str(step)


def run_cli(argv):
    from morpheus_jax.cli.main import main as cli_main

    return cli_main([str(a) for a in argv])


# -- downstream: a pretrained checkpoint on a labelled cohort --------------------------------------

# Fine-tuning flags of a short run (6 epochs).
FINETUNE_FAST = ["--epochs", "6", "--lr", "2e-3", "--batch-size", "16", "--warmup-epochs", "1", "--cosine-period", "8"]


@pytest.fixture(scope="session")
def pretrained_cohort(tmp_path_factory):
    """(run folder, dataset folder, scratch folder): 160 synthetic patients, 120 pretraining steps
    (the downstream tests' checkpoint: test_downstream, test_regress)."""
    from morpheus_jax.apps.pretrain import pretrain
    from morpheus_jax.core.config import load_config

    root = tmp_path_factory.mktemp("downstream")
    synth_dataset(root, patients=160, seed=3, dim=TINY_DIM)
    cfg = load_config(None, [
        f"data.dir={root / 'ds'}", "data.raw_dir=null", f"run_dir={root / 'run'}", "data.num_patches=32",
        f"model.wsi_dim={TINY_DIM}", "model.hidden_size=32", "model.num_prototypes=4", "model.group_hidden=32",
        "model.encoder_heads=4", "model.decoder_heads=4", "model.encoder_mlp_dim=64", "model.decoder_mlp_dim=64",
        "train.steps=120", "train.global_batch_size=16", "train.learning_rate=3e-3", "train.warmup_steps=10",
        "train.log_every=20", "train.eval_every=0", "checkpoint.every=1000", "data.eval_bag_bucket=512",
        "data.eval_batch_size=16", "mesh.data=1"])
    pretrain(cfg, progress=False)
    return root / "run", root / "ds", root
