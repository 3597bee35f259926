import os

# Tests run on CPU with a few simulated devices; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile

import jax

# Runs in one session rebuild identical programs (fresh closures): share compiled code.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "morpheus-jax-test-xla-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import numpy as np
import pytest

from morpheus_jax.config import ModelConfig
from morpheus_jax.model.tokenizers import GroupLayout


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
    base = dict(hidden_size=32, num_prototypes=4, wsi_dim=24, group_hidden=16, encoder_heads=4, decoder_heads=4,
                encoder_mlp_dim=32, decoder_mlp_dim=32, group_buckets=2)
    base.update(kw)
    return ModelConfig(**base)


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
