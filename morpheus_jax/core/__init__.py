"""Contracts and plumbing every layer shares: config, errors, group layouts, the batch,
sharding, multi-process start-up, atomic writes, logging."""
