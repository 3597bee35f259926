"""Everything a run needs before its first step, from a prepared dataset: the model's group
layouts, the mesh, and the sharded train state with its jitted, ahead-of-time compiled step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from morpheus_jax.core import batch, log
from morpheus_jax.core import sharding as shd
from morpheus_jax.core.config import Config, with_modalities
from morpheus_jax.core.errors import ConfigError
from morpheus_jax.core.manifest import Manifest
from morpheus_jax.core.spec import GroupLayout, ModelSpec
from morpheus_jax.data import pipeline, records
from morpheus_jax.engine import state as st
from morpheus_jax.engine.step import make_train_step
from morpheus_jax.model import mup
from morpheus_jax.model.morpheus import init_model
from morpheus_jax.model.params import ParamCodec


def _abstract_state(codec: ParamCodec, tx, seed: int) -> dict:
    """Shapes and dtypes of the train state (no arrays allocated)."""
    return jax.eval_shape(lambda: st.init_state(
        {n: jax.ShapeDtypeStruct(codec.shapes[n], codec.dtypes[n]) for n in codec.names}, tx, seed))


def model_spec(cfg: Config, manifest: Manifest) -> ModelSpec:
    """The checkpoint spec of a run on this dataset."""
    info = manifest.modalities
    return ModelSpec.build(cfg, {m: info[m].groups for m in info}, {m: info[m].features for m in info})


@dataclasses.dataclass
class Run:
    """A run's static pieces: data, layouts, mesh, codec, optimizer, shardings, the step.
    ``root``/``manifest`` are None for a run planned without a dataset (`plan_run`)."""

    cfg: Config
    root: Path | None
    manifest: Manifest | None
    patch_dim: int
    patch_dtype: str
    layouts: dict[str, GroupLayout]
    num_train: int
    steps: int
    steps_per_epoch: int
    mesh: jax.sharding.Mesh
    codec: ParamCodec
    schedule: object
    tx: object
    param_shardings: dict
    state_shardings: dict
    batch_shardings: dict
    _initial: object = None

    @property
    def rules(self) -> dict:
        return self.cfg.mesh.rules

    def init_state(self) -> dict:
        """Fresh state, created directly in its sharded layout."""
        model, self._initial = self._initial or init_model(self.cfg.model, self.layouts, self.cfg.seed), None
        state = st.init_state(self.codec.flatten(model), self.tx, self.cfg.seed)
        return jax.device_put(state, self.state_shardings)

    def abstract_state(self) -> dict:
        """Shapes, dtypes and target shardings (what Orbax restores onto)."""
        shapes = _abstract_state(self.codec, self.tx, self.cfg.seed)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, self.state_shardings)

    def abstract_batch(self) -> dict:
        shapes = batch.shapes(self.cfg.train.global_batch_size, self.cfg.data.num_patches,
                              self.patch_dim, records.patch_numpy_dtype(self.patch_dtype),
                              {m: lay.num_features for m, lay in self.layouts.items()})
        return batch.abstract(shapes, self.batch_shardings)

    def train_step(self):
        """``(state, batch) → (state, metrics)``, not jitted (`jitted_step`, the device bank's step)."""
        return make_train_step(self.codec, self.tx, self.schedule, self.layouts, self.cfg.masking.ratio,
                               skip_nonfinite=self.cfg.train.nonfinite == "skip",
                               accum_steps=self.cfg.train.grad_accum_steps)

    def jitted_step(self):
        """The train step, jitted with explicit shardings and donated state (not compiled:
        `compile_step` compiles it here, `jax.export` lowers it for other platforms)."""
        step = self.train_step()

        def traced(state, batch):
            with shd.activation_sharding(self.mesh, self.rules):
                return step(state, batch)

        return jax.jit(traced, in_shardings=(self.state_shardings, self.batch_shardings),
                       out_shardings=(self.state_shardings, None), donate_argnums=0)

    def compile_step(self):
        """`jitted_step` compiled ahead of time; its memory analysis is logged."""
        compiled = self.jitted_step().lower(self.abstract_state(), self.abstract_batch()).compile()
        log_memory(compiled)
        return compiled


def log_memory(compiled) -> None:
    """The compiled step's memory analysis, per device (where the backend gives one)."""
    mem = compiled.memory_analysis()
    if mem is not None:
        gb = 1 / 2**30
        log.info(f"train step memory per device: arguments {mem.argument_size_in_bytes * gb:.2f} GiB, outputs "
                 f"{mem.output_size_in_bytes * gb:.2f} GiB, temporaries {mem.temp_size_in_bytes * gb:.2f} GiB, "
                 f"code {mem.generated_code_size_in_bytes * gb:.3f} GiB")


def build_run(cfg: Config) -> Run:
    """The run of ``cfg`` on its prepared dataset (``data.dir``)."""
    root = Path(cfg.data.dir)
    manifest = records.load_manifest(root)
    cfg = with_modalities(cfg, manifest.modalities)       # null: the dataset's modalities, in its order
    if not cfg.model.modalities:
        raise ConfigError("model.modalities is empty: masked omics modelling needs at least one modality "
                          f"(the dataset has {', '.join(manifest.modalities) or 'none'})")
    if manifest.allow_missing_modalities and not cfg.data.allow_missing_modalities:
        raise ConfigError(f"{root} was prepared with --allow-missing-modalities (some patients lack omics); "
                          "set data.allow_missing_modalities=true to train on it")
    if manifest.patches.dim != cfg.model.wsi_dim:
        raise ConfigError(f"model.wsi_dim={cfg.model.wsi_dim} but {root} holds {manifest.patches.dim}-dim patch "
                          f"features (set model.wsi_dim={manifest.patches.dim})")
    layouts = manifest.layouts(cfg.model.modalities, cfg.model.group_buckets)
    return plan_run(cfg, layouts, patch_dim=manifest.patches.dim, patch_dtype=manifest.patches.dtype,
                    num_train=pipeline.num_train_records(manifest, cfg.data.train_fraction), root=root,
                    manifest=manifest)


def plan_run(cfg: Config, layouts: dict[str, GroupLayout], *, patch_dim: int, patch_dtype: str, num_train: int,
             root: Path | None = None, manifest: Manifest | None = None, devices=None) -> Run:
    """The run of ``cfg`` on ``layouts`` and patches of ``patch_dim`` × ``patch_dtype``
    (`build_run` takes them from a dataset), on ``devices`` (default all)."""
    cfg = with_modalities(cfg, layouts)                   # null: the layouts' modalities
    steps = st.total_steps(cfg, num_train)
    spe = pipeline.steps_per_epoch(num_train, cfg.train.global_batch_size)
    mesh = shd.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules
    gbs = cfg.train.global_batch_size
    accum = cfg.train.grad_accum_steps
    if gbs % (shd.batch_divisor(mesh, rules) * accum) or gbs % jax.process_count():
        raise ConfigError(f"train.global_batch_size={gbs} must be divisible by the batch mesh axes "
                          f"({shd.batch_divisor(mesh, rules)} devices) times train.grad_accum_steps={accum}, and "
                          f"by {jax.process_count()} processes")
    model = init_model(cfg.model, layouts, cfg.seed)
    codec = ParamCodec(model)
    schedule = st.make_schedule(cfg.train, steps, spe)
    tx = st.make_optimizer(cfg.train, schedule, mup.learning_rate_multipliers(cfg.model, codec.axes))
    psh = shd.tree_shardings(codec.axes, codec.shapes, rules, mesh)
    ssh = shd.state_shardings(_abstract_state(codec, tx, cfg.seed), psh, codec.shapes, mesh)
    bsh = batch.shardings(mesh, rules, layouts)
    return Run(cfg, root, manifest, patch_dim, patch_dtype, layouts, num_train, steps, spe, mesh, codec, schedule, tx, psh, ssh, bsh, model)
