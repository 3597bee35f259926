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
