"""MORPHEUS in PyTorch (extra ``torch``): the authors' module layout, no MONAI, no JAX.

    from morpheus_jax.torch import from_export
    model = from_export("morpheus.safetensors").eval()      # MorpheusProto, strict load
    z = model.encode(wsi, {"rna": rna})                      # [B, 1 + P + T, H]

`MorpheusProto` / `MorpheusProtoEncoder` have exactly the state-dict keys of the authors'
modules (reference §5), so exports load with ``load_state_dict(strict=True)`` and the
authors' own state dicts load here.
"""

from morpheus_jax.torch.hub import build_from_sidecar, from_export, load_weights, read_sidecar
from morpheus_jax.torch.model import (
                                      GroupSpec,
                                      MorpheusDecoder,
                                      MorpheusProto,
                                      MorpheusProtoEncoder,
                                      OmicsReverseTokenizer,
                                      OmicsTokenizer,
                                      TransformerBlock,
                                      WSITokenizer,
)

__all__ = ["MorpheusProto", "MorpheusProtoEncoder", "MorpheusDecoder", "OmicsTokenizer", "OmicsReverseTokenizer",
           "TransformerBlock", "WSITokenizer", "GroupSpec", "from_export", "build_from_sidecar", "load_weights",
           "read_sidecar"]
