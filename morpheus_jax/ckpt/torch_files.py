"""PyTorch weight files: ``.safetensors`` or ``.pt`` (chosen by suffix) plus a sidecar JSON.

The sidecar ``FILE.json`` beside ``FILE`` holds what a state dict cannot: the config, the
modality order, group names and sizes, the mappings and the canonical feature names.
Writes are atomic (temporary file in the same folder, then rename). ``.safetensors``
needs only NumPy (bfloat16 through ml_dtypes); ``.pt`` needs torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from morpheus_jax.core.atomic import replacing
from morpheus_jax.core.errors import WeightFileError

SUFFIXES = (".safetensors", ".pt", ".pth")
DTYPES = ("float32", "bfloat16")



def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def check_suffix(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightFileError(f"{path}: unsupported suffix {suffix!r}; use .safetensors, .pt or .pth")
    return suffix


def write_weights(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], sidecar: Mapping[str, Any] | None,
                  *, dtype: str = "float32") -> Path:
    """Write ``state_dict`` (NumPy float32) as ``dtype`` to ``path`` and ``sidecar`` to ``path.json``."""
    path = Path(path)
    suffix = check_suffix(path)
    if dtype not in DTYPES:
        raise WeightFileError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(np_dtype)) for k, v in state_dict.items()}
    with contextlib.ExitStack() as both:     # both files written beside, then both renamed: never one alone
        if sidecar is not None:
            both.enter_context(replacing(sidecar_path(path))).write_text(json.dumps(sidecar, indent=1))
        tmp = both.enter_context(replacing(path))
        if suffix == ".safetensors":
            from safetensors.numpy import save_file  # lazy: optional dependency (the torch extra)

            save_file(arrays, str(tmp), metadata={"format": "pt"})
        else:
            import torch  # lazy: optional dependency (the torch extra)

            tensors = {k: torch.from_numpy(np.array(v, np.float32)).to(getattr(torch, dtype)).contiguous()
                       for k, v in state_dict.items()}
            torch.save(tensors, tmp)
    return path


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """A plain state dict, or one saved inside ``{"state_dict": …}`` / ``{"model": …}``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and "global_token" not in obj:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightFileError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """(state dict as float32 NumPy arrays in file order, the sidecar JSON or None)."""
    path = Path(path)
    suffix = check_suffix(path)
    if not path.exists():
        raise WeightFileError(f"{path}: no such file")
    if suffix == ".safetensors":
        from safetensors.numpy import load_file  # lazy: optional dependency (the torch extra)

        try:
            raw = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for any bad header
            raise WeightFileError(f"{path}: cannot be read as a safetensors file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else 'truncated or not safetensors'})") from None
        sd = {k: np.asarray(v, np.float32) for k, v in raw.items()}
    else:
        import torch  # lazy: optional dependency (the torch extra)

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle and zip errors alike
            raise WeightFileError(f"{path}: cannot be read as a PyTorch file ({e})") from None
        sd = {}
        for k, v in _unwrap(obj, path).items():
            if not isinstance(v, torch.Tensor):
                raise WeightFileError(f"{path}: entry {k!r} is not a tensor")
            sd[k] = v.detach().to(torch.float32).cpu().numpy()
    side = sidecar_path(path)
    try:
        sidecar = json.loads(side.read_text()) if side.exists() else None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise WeightFileError(f"{side}: the sidecar JSON is unreadable ({e})") from None
    return sd, sidecar
