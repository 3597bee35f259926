"""Reading checkpoints written before the canonical parameter layout (morpheus-jax 0.1).

Those stored each per-group MLP matrix whose shape depends on the group size as one
zero-padded stack per size bucket (``omics_tokenizers.<m>.w1.<bucket>`` ``[Gb, Wb, Dh]``,
``b1.<bucket>``; ``reverse_tokenizer.w2.<bucket>`` ``[Gb, Dh, Wb]``, ``b2.<bucket>``), so
reading them needed the ``model.group_buckets`` they were written with (their spec's
config has it). `canonical_params` turns such parameters into today's layout; export,
`morpheus_jax.load` and fine-tuning read old checkpoints through it. Resuming an old run's
optimizer state is not supported (see README, "Checkpoints").
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from morpheus_jax.core.spec import GroupLayout
from morpheus_jax.model.tokenizers import pack_buckets

_BUCKETED = re.compile(r"^omics_(tokenizers\.\w+\.(w1|b1)|decoders\.\w+\.reverse_tokenizer\.(w2|b2))\.\d+$")


def is_bucketed(names) -> bool:
    return any(_BUCKETED.match(n) for n in names)


def canonical_params(flat: Mapping[str, np.ndarray], layouts: Mapping[str, GroupLayout]) -> dict[str, np.ndarray]:
    """Bucketed parameters → canonical ones. ``layouts``: built with the bucket count the
    checkpoint was written with."""
    out = {n: v for n, v in flat.items() if not _BUCKETED.match(n)}
    for m, lay in layouts.items():
        nb = range(len(lay.buckets))
        tok = f"omics_tokenizers.{m}"
        if f"{tok}.w1.0" in flat:
            out[f"{tok}.w1"] = pack_buckets([np.asarray(flat[f"{tok}.w1.{b}"]) for b in nb], lay)
            b1 = np.concatenate([np.asarray(flat[f"{tok}.b1.{b}"]) for b in nb])
            out[f"{tok}.b1"] = b1[np.argsort(lay.bucket_order())]
        rev = f"omics_decoders.{m}.reverse_tokenizer"
        if f"{rev}.w2.0" in flat:
            out[f"{rev}.w2"] = pack_buckets([np.asarray(flat[f"{rev}.w2.{b}"]).transpose(0, 2, 1) for b in nb], lay)
            out[f"{rev}.b2"] = pack_buckets([np.asarray(flat[f"{rev}.b2.{b}"]) for b in nb], lay)
    return out
