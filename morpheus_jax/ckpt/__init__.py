"""The checkpoint store: the only code that knows the Orbax / Grain on-disk layout, and the
authors' PyTorch weight layout."""
