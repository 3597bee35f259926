"""One way to report progress: `info` and `warning` lines, and the run's metrics.jsonl.

Lines go through ``tqdm.write`` so they never tear a progress bar; info goes to stdout,
warnings to stderr. In a multi-process job
`info` speaks for the job (process 0 only); `warning` is printed by every process that
sees the problem, prefixed with its index when there are several.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm


def _process() -> tuple[int, int]:
    if "jax" not in sys.modules:  # JAX never started: a single process
        return 0, 1
    import jax  # lazy: only once JAX has started (checked above)
    return jax.process_index(), jax.process_count()


def progress_off(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a progress bar: off when not asked for, and off by itself when
    stderr is not a terminal (a batch job's log gets no bar frames)."""
    return None if progress else True


def info(msg: str) -> None:
    index, _ = _process()
    if index == 0:
        tqdm.write(msg, file=sys.stdout)


def warning(msg: str) -> None:
    index, count = _process()
    prefix = f"warning (process {index}): " if count > 1 else "warning: "
    sys.stdout.flush()                       # keep the order of info and warning lines
    tqdm.write(prefix + msg, file=sys.stderr)
    sys.stderr.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file. Read tolerantly: a process killed while appending leaves
    a torn last line, which is dropped with a warning (a damaged line elsewhere too), never fatal."""
    path = Path(path)
    if not path.exists():
        return []
    rows, bad = [], []
    with open(path, errors="replace") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip("\x00 \t\r\n"):    # blank, or the zeros a crash can leave at the end
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad.append(i)
    if bad:     # one warning, however many lines
        which = f"line {bad[0]} is" if len(bad) == 1 else (f"{len(bad)} lines ({', '.join(map(str, bad[:3]))}"
                                                                       f"{', …' if len(bad) > 3 else ''}) are")
        warning(f"{path}: {which} not a complete JSON row (a write cut short); ignored")
    return rows


def append_jsonl(path: str | Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
