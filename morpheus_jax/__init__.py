"""morpheus-jax: MORPHEUS (masked omics modelling over H&E and molecular profiles) in JAX."""

__version__ = "0.1.0"
