"""The training engine: state, step builders, the run (mesh, shardings, compiled step),
the training loop (trainer), validation during training."""
