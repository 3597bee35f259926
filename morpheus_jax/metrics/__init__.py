"""Evaluation metrics as pure array functions (NumPy; the hazard loss in JAX) (reconstruction, classification, survival)."""
