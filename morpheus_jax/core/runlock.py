"""One run folder, one writer: a lock file held for the life of the process that writes.

The lock is an ``flock`` on ``RUN_DIR/.lock`` (its text names the holder: host, pid, start
time). The operating system drops it when the holder exits, however it exits, so a lock left by
a dead process is simply taken over (with a warning naming it). A second writer on a folder in
use refuses in one line naming the holder. In a multi-process job only process 0 takes it: the
job's processes are one writer.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from morpheus_jax.core import log
from morpheus_jax.core.errors import ConfigError

LOCK = ".lock"


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise ConfigError(f"run_dir={self.path.parent} is in use by {holder} (one run folder, one writer): "
                              "wait for it to finish, stop it, or use another run_dir") from None
        previous = _read(fd)
        if previous:
            log.warning(f"{self.path}: taking over the lock of {_describe(previous)}, which is no longer running")
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)      # a clean exit leaves no holder to take over from
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {started})"
