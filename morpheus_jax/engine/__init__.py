"""The training engine: state, step builders, the run (mesh, shardings, compiled step),
validation during training."""
