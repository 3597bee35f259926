"""The prepared dataset format (schema version 1).

A dataset is a folder::

    manifest.json                          written last; its presence marks a complete dataset
    records/<split>-<shard:05d>.array_record   one record per patient (ArrayRecord)
    patches/<split>-<shard:05d>.zarr       patch features of that shard's patients, zarr3
                                            array [rows, wsi_dim], chunks [chunk_rows, wsi_dim],
                                            uncompressed ("bytes" codec)

Each patient's patches are stored contiguously and pre-shuffled (all of their slides
together), so a training sample reads a random set of the patient's chunk segments (whole
chunks, `pipeline.draw_rows`): a constant, small number of chunk reads whatever the bag size.

A record (msgpack map) holds::

    submitter_id, project_id, split       str
    index                                 int, position of the patient in its split
    patch_shard, patch_offset, patch_count   int, where the patches live
    slides                                list[str], the slide files the patches came from
    omics                                 {modality: float32 [F_m]} canonical feature order,
                                          transforms of §1 applied (absent modality: zeros)
    available                             {modality: bool}
    meta                                  {column: value} the other metadata columns

The manifest holds the schema version, counts per split, for each modality its group
names, group sizes, feature names (canonical order), fill value and transform, the patch
dtype/dim/chunking, and each shard file with its byte size and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from morpheus_jax.core.atomic import sha256_file
from morpheus_jax.core.errors import DatasetError
from morpheus_jax.core.manifest import Manifest

MANIFEST = "manifest.json"



# -- record codec -----------------------------------------------------------------------

def _pack_default(obj):
    if isinstance(obj, np.ndarray):
        return {"__nd__": True, "dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _unpack_hook(obj):
    if obj.get("__nd__"):
        return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    return obj


def encode_record(record: dict[str, Any]) -> bytes:
    return msgpack.packb(record, default=_pack_default, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False, strict_map_key=False)


# -- files --------------------------------------------------------------------------------

def record_path(root: Path, split: str, shard: int) -> Path:
    return Path(root) / "records" / f"{split}-{shard:05d}.array_record"


def patch_path(root: Path, split: str, shard: int) -> Path:
    return Path(root) / "patches" / f"{split}-{shard:05d}.zarr"


def sha256_tree(path: Path) -> str:
    """Checksum of a folder (a zarr array): relative names and contents, in sorted order."""
    h = hashlib.sha256()
    path = Path(path)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def zarr_spec(path: Path, rows: int | None = None, dim: int | None = None, dtype: str | None = None,
              chunk_rows: int | None = None) -> dict:
    """TensorStore spec of a patch array; with shape arguments it creates the array."""
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if rows is not None:
        spec["metadata"] = {
            "shape": [rows, dim],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, dim]}},
            "chunk_key_encoding": {"name": "default"},
            "data_type": dtype,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "fill_value": 0,
        }
        spec["create"] = True
        spec["delete_existing"] = True
    return spec


class RawChunks:
    """Direct reads of an uncompressed patch array (the layout `zarr_spec` writes: zarr v3,
    one ``bytes`` little-endian codec, chunks ``[chunk_rows, dim]`` stored whole as
    ``c/<i>/0``): rows are copied from the page cache straight into the caller's buffer with
    one ``preadv`` per chunk piece — the cost of a raw read, without TensorStore's staging
    copy. `open` returns None for an array in any other layout (the caller reads it through
    TensorStore)."""

    def __init__(self, path: Path, chunk_rows: int, row_bytes: int, rows: int):
        self.path, self.chunk_rows, self.row_bytes, self.rows = path, chunk_rows, row_bytes, rows
        self._prefix = os.path.join(str(path), "c", "")           # string joins: Path costs more than a read

    @classmethod
    def open(cls, path: Path) -> "RawChunks | None":
        try:
            meta = json.loads((Path(path) / "zarr.json").read_text())
            rows, dim = meta["shape"]
            chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
            dtype = np.dtype(meta["data_type"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        codecs = meta.get("codecs")
        plain = (codecs == [{"name": "bytes", "configuration": {"endian": "little"}}]
                 and meta.get("chunk_key_encoding") in ({"name": "default"},
                                                        {"name": "default", "configuration": {"separator": "/"}})
                 and chunk[1] == dim and np.little_endian)
        return cls(Path(path), int(chunk[0]), int(dim) * dtype.itemsize, int(rows)) if plain else None

    def chunk_file(self, i: int) -> str:
        return f"{self._prefix}{i}{os.sep}0"

    def read_into(self, start: int, stop: int, out: np.ndarray) -> int:
        """Rows ``[start, stop)`` into ``out`` (C-contiguous, ``stop - start`` rows); returns
        the bytes of the chunks touched."""
        view = memoryview(out).cast("B")
        pos, touched = 0, 0
        while start < stop:
            i = start // self.chunk_rows
            end = min(stop, (i + 1) * self.chunk_rows)
            n = (end - start) * self.row_bytes
            f = self.chunk_file(i)
            try:
                fd = os.open(f, os.O_RDONLY)
            except FileNotFoundError:       # zarr: an absent chunk holds the fill value (0), as TensorStore reads it
                view[pos: pos + n] = bytes(n)
                fd = None
            except OSError as e:
                raise DatasetError(f"{f}: cannot read a patch chunk ({e.strerror}); the dataset is damaged "
                                   "(`morpheus prepare --overwrite` rewrites it)") from None
            if fd is None:
                got = n
            else:
                try:
                    got = os.preadv(fd, [view[pos: pos + n]], (start - i * self.chunk_rows) * self.row_bytes)
                except OSError as e:
                    raise DatasetError(f"{f}: cannot read a patch chunk ({e.strerror}); the dataset is damaged "
                                       "(`morpheus prepare --overwrite` rewrites it)") from None
                finally:
                    os.close(fd)
            if got != n:
                raise DatasetError(f"{f}: {got} of {n} bytes at row {start}: truncated; the dataset is damaged "
                                   "(`morpheus prepare --overwrite` rewrites it)")
            pos += n
            touched += self.chunk_rows * self.row_bytes
            start = end
        return touched


def load_manifest(root: str | os.PathLike, check_files: bool = True) -> Manifest:
    """The dataset's `Manifest`, checked (a missing, unreadable or ill-formed one is a `DatasetError`);
    with ``check_files`` its shard files are checked too (`file_problems`: sizes only, cheap)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder does not exist (run `morpheus prepare`)")
    if not path.exists():
        raise DatasetError(f"{path}: missing; {root} is not a complete prepared dataset "
                           "(an interrupted `morpheus prepare` leaves no manifest)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable or not valid JSON ({e}); "
                           "rerun `morpheus prepare --overwrite`") from None
    manifest = Manifest.from_json(manifest, str(path))
    if check_files:
        problems = file_problems(root, manifest)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DatasetError(f"{problems[0]}{more}; the dataset {root} is damaged (`morpheus inspect` lists what, "
                               "`morpheus prepare --overwrite` rewrites it)")
    return manifest


def _array_header_problem(path: Path, shape: list[int], dtype: str, chunk: list[int]) -> str | None:
    """What is wrong with a patch array's ``zarr.json`` (None when it says what the manifest does)."""
    try:
        header = json.loads(path.read_text())
        found = (list(header["shape"]), header["data_type"],
                 list(header["chunk_grid"]["configuration"]["chunk_shape"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        return f"{path}: damaged array header ({type(e).__name__}: {str(e)[:80]})"
    if found != (shape, dtype, chunk):
        return (f"{path}: the array header says shape {found[0]}, {found[1]}, chunks {found[2]}; the manifest says "
                f"{shape}, {dtype}, chunks {chunk}")
    return None


def file_problems(root: str | os.PathLike, manifest: Manifest) -> list[str]:
    """Shard files that are missing or have the wrong size (a stat per file, no reading): the
    record files' sizes are in the manifest; every zarr chunk file of a patch array has the size
    of a full chunk. (Only `verify_dataset`'s checksums tell a missing chunk from an all-zero one.)"""
    root, p = Path(root), manifest.patches
    chunk_bytes = p.chunk_rows * p.dim * patch_numpy_dtype(p.dtype).itemsize
    problems = []
    for entry in manifest.shards:
        records, patches = root / entry["records"]["path"], root / entry["patches"]["path"]
        if not records.is_file():
            problems.append(f"{records}: missing")
        elif "bytes" in entry["records"] and records.stat().st_size != entry["records"]["bytes"]:
            problems.append(f"{records}: {records.stat().st_size} bytes, the manifest says "
                            f"{entry['records']['bytes']} (truncated or replaced)")
        if not (patches / "zarr.json").is_file():
            problems.append(f"{patches}: missing or not a zarr array (no zarr.json)")
            continue
        header = _array_header_problem(patches / "zarr.json", [max(entry["num_patches"], 1), p.dim], p.dtype,
                                       [p.chunk_rows, p.dim])
        if header:
            problems.append(header)
            continue
        chunks = [f for f in patches.rglob("*") if f.is_file() and f.name != "zarr.json"]
        expected = -(-max(entry["num_patches"], 1) // p.chunk_rows)
        wrong = [f for f in chunks if f.stat().st_size != chunk_bytes]
        if len(chunks) > expected:     # fewer is possible: TensorStore skips all-zero chunks
            problems.append(f"{patches}: {len(chunks)} chunk files, at most {expected} expected")
        elif wrong:
            problems.append(f"{wrong[0]}: {wrong[0].stat().st_size} bytes, a chunk has {chunk_bytes} (truncated)")
    return problems


def verify_dataset(root: str | os.PathLike, manifest: Manifest | None = None) -> list[str]:
    """Problems found checking every shard against the manifest (empty list = valid)."""
    root = Path(root)
    manifest = manifest or load_manifest(root)
    problems = file_problems(root, manifest)
    for entry in manifest.shards:
        for kind, checker in (("records", sha256_file), ("patches", sha256_tree)):
            rel = entry[kind]["path"]
            path = root / rel
            if not path.exists() or any(x.startswith(f"{path}") for x in problems):
                continue
            if checker(path) != entry[kind]["sha256"]:
                problems.append(f"{path}: checksum mismatch")
    return problems


def feature_names(manifest: Manifest, modality: str) -> list[str]:
    return manifest.modalities[modality].features


def patch_numpy_dtype(name: str) -> np.dtype:
    """NumPy dtype of stored patches (``bfloat16`` via ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes  # lazy: start-up time
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
