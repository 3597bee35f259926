"""Reading the chosen GDC copy-number and methylation files into one patients × candidates
table, each file once, in parallel over worker processes.

A worker parses one file and returns its values aligned to the candidate columns (NaN where
the file has no value) and which candidates the file lists at all; the main process keeps
only those vectors, so memory grows with patients × candidate features, not with the files.
Candidates are fixed before reading where the names are known (methylation: the manifest's
autosomal probes, or a given mapping); copy-number columns are the first file's genes in its
order, later files' new genes appended (the files of one GENCODE release share one order).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from morpheus_jax.core.log import progress_off
from morpheus_jax.data.tcga.sources import AUTOSOMES, chromosome, read_betas, read_cnv_file

_STATE: dict = {}  # the candidate index of the running read (set in each worker by _init)


@dataclasses.dataclass
class Table:
    """Rows: patients with a file; columns: candidates in source order."""
    values: np.ndarray            # [patients, candidates] float64, NaN = missing
    listed: np.ndarray            # [candidates] bool: listed by every file read
    keys: list[str]               # column keys (``name`` or ``name#occurrence``)
    names: list[str]              # feature names
    chrom: list[str | None]
    pos: np.ndarray               # [candidates] float64
    unmatched: int                # most lines of one file outside the candidates


def _init(state: dict) -> None:
    _STATE.clear()
    _STATE.update(state)
    _STATE["index"] = pd.Index(state["keys"])


def _align(keys: np.ndarray, values: np.ndarray, pos: np.ndarray | None = None):
    index: pd.Index = _STATE["index"]
    pos = index.get_indexer(keys) if pos is None else pos
    hit = pos >= 0
    row = np.full(len(index), np.nan)
    row[pos[hit]] = values[hit]
    listed = np.zeros(len(index), bool)
    listed[pos[hit]] = True
    return row, np.packbits(listed), int((~hit).sum())


def dnam_row(path: str):
    probes, betas = read_betas(Path(path))
    # Files of one array list the same probes in the same order: their alignment is reused.
    cached = _STATE.get("probe_order")
    if cached is None or len(cached[0]) != len(probes) or not np.array_equal(cached[0], probes):
        first = ~pd.Index(probes).duplicated()  # a probe listed twice keeps its first line
        cached = _STATE["probe_order"] = (probes, first, _STATE["index"].get_indexer(probes[first]))
    _, first, pos = cached
    row, listed, unmatched = _align(probes[first], betas[first], pos)
    return row, listed, unmatched, None


def cnv_keys(df: pd.DataFrame, allowed: set[str] | None) -> pd.DataFrame:
    """A copy-number file's rows as candidate columns: key ``name#occurrence`` (a name listed
    twice is two columns, so 'repeated name, first kept' applies after the missing filter),
    keeping names with an autosomal row (or in ``allowed``)."""
    df = df.assign(occ=df.groupby("gene_name", sort=False).cumcount().to_numpy(),
                   chrom=[chromosome(c) for c in df["chromosome"]])
    if allowed is not None:
        df = df[df["gene_name"].isin(allowed)]
    else:
        auto = set(df.loc[df["chrom"].isin(AUTOSOMES), "gene_name"])
        df = df[df["gene_name"].isin(auto)]
    return df.assign(key=df["gene_name"] + "#" + df["occ"].astype(str))


def cnv_row(path: str):
    df = cnv_keys(read_cnv_file(Path(path)), _STATE.get("allowed"))
    keys = df["key"].to_numpy()
    row, listed, _ = _align(keys, df["copy_number"].to_numpy(np.float64))
    new = df[~pd.Index(keys).isin(_STATE["index"])]
    extras = (new["key"].tolist(), new["gene_name"].tolist(), new["chrom"].tolist(),
              new["start"].to_numpy(np.float64), new["copy_number"].to_numpy(np.float64)) if len(new) else None
    return row, listed, 0, extras


def read_table(paths: list[Path], state: dict, names: list[str], chrom: list, pos: np.ndarray,
               row_fn: Callable, workers: int, desc: str, progress: bool) -> Table:
    """Every file through ``row_fn`` (in ``workers`` processes), stacked in the given order.
    Columns a file adds beyond the candidates (copy number only) are appended; they are not
    listed by every file."""
    keys, names, chrom, pos = list(state["keys"]), list(names), list(chrom), list(np.asarray(pos, np.float64))
    base = len(keys)
    values = np.empty((len(paths), base))   # every row is assigned (no NaN pages held by forked workers)
    listed = np.ones(base, bool)
    added: dict[str, int] = {}
    pending = []
    unmatched = 0
    for i, (row, packed, miss, extras) in enumerate(tqdm(_map(paths, state, row_fn, workers), total=len(paths),
                                                         desc=desc, disable=progress_off(progress))):
        values[i] = row
        listed &= np.unpackbits(packed, count=base).astype(bool)
        unmatched = max(unmatched, miss)
        if extras:
            new_keys, new_names, new_chrom, new_pos, new_values = extras
            cols = []
            for key, name, c, p in zip(new_keys, new_names, new_chrom, new_pos):
                if key not in added:
                    added[key] = base + len(added)
                    names.append(name), chrom.append(c), pos.append(p)
                cols.append(added[key])
            pending.append((i, cols, new_values))
    if added:
        values = np.concatenate([values, np.full((len(paths), len(added)), np.nan)], axis=1)
        for i, cols, v in pending:
            values[i, cols] = v
        listed = np.concatenate([listed, np.zeros(len(added), bool)])
    return Table(values, listed, keys + list(added), names, chrom, np.asarray(pos, np.float64), unmatched)


def _worker_start(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    """A worker ends with the command that started it (Linux: the parent-death signal), so a
    killed build leaves no process behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
        if os.getppid() != parent:                                    # the parent died before prctl
            os._exit(1)
    if initializer is not None:
        initializer(*initargs)


def pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> cf.ProcessPoolExecutor:
    """Worker processes: forked (fast start) unless JAX runs in this process (forking a
    multithreaded process can deadlock), then spawned."""
    context = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
    return cf.ProcessPoolExecutor(max_workers=min(workers, os.cpu_count() or 1), mp_context=context,
                                  initializer=_worker_start, initargs=(os.getpid(), initializer, initargs))


def _map(paths: list[Path], state: dict, row_fn: Callable, workers: int):
    if workers <= 1 or len(paths) < 2:
        _init(state)
        yield from (row_fn(str(p)) for p in paths)
        return
    with pool(min(workers, len(paths)), initializer=_init, initargs=(state,)) as workers_pool:
        yield from workers_pool.map(row_fn, [str(p) for p in paths], chunksize=4)
