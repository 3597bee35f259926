"""TensorBoard scalars of a run, written in the calling thread.

tensorboardX's ``SummaryWriter`` writes from a background thread: when that write fails (a
full disk) the thread dies with a traceback and the training loop then blocks on the
writer's full queue for ever. Here every row is framed (TFRecord: length, masked CRC-32C,
event, masked CRC-32C) and written before `add` returns, so a failure is an ordinary
exception in the training process (`core.errors.resource_exhausted` turns a full disk into
one line).

Each session writes its own ``events.out.tfevents.*`` file. A resumed session starts its
file with TensorBoard's purge marker (a ``SessionLog.START`` at the first step after the checkpoint), so the
rows an interrupted session wrote past its last checkpoint are hidden, as metrics.jsonl
rewrites them. A torn last record (a kill while appending) is skipped by TensorBoard's
reader; the other files are untouched.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


class ScalarEvents:
    def __init__(self, folder: str | Path, purge_step: int | None = None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog  # lazy: start-up time

        self._event = Event
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        # TensorBoard reads a folder's files in name order: sessions sort by their start time.
        name = f"events.out.tfevents.{now:017.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = folder / name
        self._file = open(self.path, "wb")
        self._write(Event(wall_time=now, step=purge_step or 0, file_version="brain.Event:2"))
        if purge_step:
            self._write(Event(wall_time=now, step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self._file.flush()

    def _write(self, event) -> None:
        from tensorboardX.record_writer import masked_crc32c  # lazy: start-up time

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data
                         + struct.pack("<I", masked_crc32c(data)))

    def add(self, step: int, values: dict[str, float]) -> None:
        """One event holding the row's scalars, flushed to the file."""
        from tensorboardX.proto.summary_pb2 import Summary  # lazy: start-up time

        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self._write(self._event(wall_time=time.time(), step=int(step), summary=summary))
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
