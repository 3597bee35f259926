"""engine.Trainer with a stand-in step (no model, no compiling): hooks, cadence, divergence."""

import numpy as np
import pytest

from morpheus_jax.core.errors import TrainingDiverged, UserError
from morpheus_jax.engine.trainer import Trainer


def _step(bad_from=None):
    """A step whose loss is 1/step, non-finite from step ``bad_from`` on."""
    def step(state, batch):
        n = state["step"] + 1
        loss = np.float32(np.nan if bad_from is not None and n >= bad_from else 1.0 / n)
        return {"step": n}, {"loss": loss, "grad_norm": np.float32(1.0)}
    return step


def _batches():
    while True:
        yield {"x": np.zeros(2)}


def test_rows_evaluations_and_saves_follow_their_cadence():
    rows, saves = [], []
    trainer = Trainer(_step(), steps=10, samples_per_step=4, log_every=3, eval_every=5,
                      evaluate=lambda s: {"val_loss": float(s["step"])}, on_row=rows.append,
                      checkpoint_every=4, save=lambda step, state, ev: saves.append((step, ev)))
    result = trainer.run({"step": 0}, _batches())
    assert result.step == 10 and result.stopped_by is None and result.state["step"] == 10
    assert [r["step"] for r in rows] == [3, 5, 6, 9, 10]
    assert [r["loss"] for r in rows] == pytest.approx([1 / 3, 1 / 5, 1 / 6, 1 / 9, 1 / 10])
    assert [r.get("val_loss") for r in rows] == [None, 5.0, None, None, 10.0]
    assert saves == [(4, None), (8, None), (10, {"step": 10, "val_loss": 10.0})]
    assert result.last_eval == {"step": 10, "val_loss": 10.0}


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_is_never_saved():
    saves = []
    trainer = Trainer(_step(bad_from=6), steps=20, samples_per_step=1, log_every=5, checkpoint_every=3,
                      save=lambda step, state, ev: saves.append(step))
    with pytest.raises(TrainingDiverged, match=r"^step 6: the loss is nan") as e:
        trainer.run({"step": 0}, _batches())
    assert isinstance(e.value, UserError)
    assert saves == [3]            # step 6 would have been saved: checked first, refused


def _skipping_step(skip_steps):
    """A step reporting ``skipped`` (train.nonfinite=skip) at ``skip_steps``."""
    def step(state, batch):
        n = state["step"] + 1
        bad = n in skip_steps
        return {"step": n}, {"loss": np.float32(np.nan if bad else 1.0 / n), "grad_norm": np.float32(1.0),
                             "skipped": np.float32(bad)}
    return step


def test_skipped_updates_are_counted_and_only_a_long_run_of_them_stops(capsys):
    saves = []
    trainer = Trainer(_skipping_step({4, 5, 9}), steps=12, samples_per_step=1, log_every=3, checkpoint_every=3,
                      save=lambda step, state, ev: saves.append(step), max_skipped_in_a_row=3)
    assert trainer.run({"step": 0}, _batches()).step == 12
    assert saves == [3, 6, 9, 12]
    out = capsys.readouterr().err
    assert "step 6: 2 of the last 3 updates skipped" in out and "step 9: 1 of the last 3 updates skipped" in out
    trainer = Trainer(_skipping_step({4, 5, 6, 7}), steps=12, samples_per_step=1, log_every=2,
                      save=lambda step, state, ev: saves.append(step), max_skipped_in_a_row=3)
    with pytest.raises(TrainingDiverged, match=r"^steps 4-6: 3 updates in a row skipped"):
        trainer.run({"step": 0}, _batches())


def test_skip_nonfinite_keeps_the_state_of_a_bad_step_and_matches_a_good_one():
    import jax
    import jax.numpy as jnp
    import optax

    from morpheus_jax.engine.state import init_state
    from morpheus_jax.engine.step import make_update_step

    def loss_fn(params, batch, keys, norm):
        return jnp.sum((params["w"] * batch["x"]) ** 2) / norm, {}

    def norm_fn(batch, keys):
        return jnp.float32(batch["x"].shape[0])

    tx, schedule = optax.adamw(1e-2), optax.constant_schedule(1e-2)
    state = init_state({"w": jnp.arange(3.0)}, tx, 0)
    plain = jax.jit(make_update_step(loss_fn, norm_fn, tx, schedule))
    skip = jax.jit(make_update_step(loss_fn, norm_fn, tx, schedule, skip_nonfinite=True))
    good, bad = {"x": jnp.ones((2, 3))}, {"x": jnp.array([[1.0, jnp.nan, 1.0], [1.0, 1.0, 1.0]])}
    a, ma = plain(state, good)
    b, mb = skip(state, good)
    assert float(mb["skipped"]) == 0.0 and "skipped" not in ma
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    c, mc = skip(b, bad)
    assert float(mc["skipped"]) == 1.0 and not np.isfinite(float(mc["loss"]))
    assert int(c["step"]) == int(b["step"]) + 1
    for x, y in zip(jax.tree.leaves((c["params"], c["opt_state"])), jax.tree.leaves((b["params"], b["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
