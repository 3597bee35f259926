"""Evaluation metrics as pure NumPy functions (reconstruction, classification, survival)."""
