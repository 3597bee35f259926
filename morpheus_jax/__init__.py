"""morpheus-jax: MORPHEUS (masked omics modelling over H&E and molecular profiles) in JAX."""

__version__ = "0.2.0"


def __getattr__(name):
    # `load` pulls in JAX; import it only when asked for.
    if name == "load":
        from morpheus_jax.api import load  # lazy: start-up time (JAX)
        return load
    raise AttributeError(f"module 'morpheus_jax' has no attribute {name!r}")
