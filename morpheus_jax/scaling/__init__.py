"""Scaling-law experiments: FLOP and parameter accounting (`flops`), ladders of runs
(`ladder`, `sweep`), the fit of L(N, D) and the compute-optimal frontier (`fit`, `plots`),
and the `morpheus sweep` / `morpheus scaling` commands (`cli`)."""
