"""The ``morpheus`` command line (`main`); nothing in the library imports it."""

from morpheus_jax.cli.main import main

__all__ = ["main"]
