"""Atomic file writes.

Every file the package writes goes through `replacing`: the content is written to a temp
file next to the target and renamed onto it, so a reader (or a resumed run) sees the old
file or the new one, never half of one, and a crash leaves no partial output. Temp names
are unique per process and call, so the processes of one multi-host job (or two jobs)
writing the same path never collide on the temp file; the last rename wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from morpheus_jax.core.errors import ResourceError, resource_exhausted


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh hidden sibling of ``path`` (``.NAME.tmp-PID-RANDOM``): never matched by a
    ``*.SUFFIX`` glob over the folder, so a crash's leftover is not mistaken for output."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on normal exit rename it onto ``path`` (creating the
    parent folder), on an exception remove it and leave ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if tmp.is_file():      # some writers (safetensors) create owner-only files: the usual mode instead
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as e:
        if _out_of_space(e, path.parent):
            raise ResourceError(f"{path}: no space left on the device while writing it (nothing was replaced; "
                                "free disk space or write elsewhere, then rerun)") from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _out_of_space(exc: BaseException, folder: Path) -> bool:
    """A failed write ran out of disk: its error says so, or (writers such as torch.save
    report only an I/O error) the folder's disk has under 1 MiB left."""
    if isinstance(exc, ResourceError):
        return False
    ran_out = resource_exhausted(exc)
    if ran_out is not None:
        return "no space" in ran_out
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def write_text(path: str | os.PathLike, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=1))


def write_csv(path: str | os.PathLike, frame, **to_csv_kwargs) -> Path:
    """A pandas DataFrame as CSV (``index=False`` unless given)."""
    to_csv_kwargs.setdefault("index", False)
    with replacing(path) as tmp:
        frame.to_csv(tmp, **to_csv_kwargs)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A Matplotlib figure, in the format its suffix names."""
    path = Path(path)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (datasets' shards, checkpoints' files)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
