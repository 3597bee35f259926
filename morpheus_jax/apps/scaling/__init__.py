"""Scaling-law studies: ladders of runs, `morpheus sweep`, the fit of L(N, D) and its plots."""
