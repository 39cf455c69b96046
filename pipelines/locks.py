"""An OS file lock with a record of who holds it, for locks a person may meet (a revert that
waits for a retrain, a second ``flywheel up``): the refusal can name the holder."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from pipelines.lineage import Record, write_json


class Held(Exception):
    """The lock is held by another process; ``holder`` is its record (empty if unreadable)."""

    def __init__(self, holder: Record) -> None:
        super().__init__(f"held by {holder}")
        self.holder = holder


@contextlib.contextmanager
def holding(lock: Path, timeout: float, **holder: object) -> Iterator[None]:
    """Hold the file lock ``lock`` (``filelock``: released by the OS if the process dies) while the
    block runs, with ``<lock>.json`` beside it saying who: pid, host, since, and ``holder``.
    ``Held`` with that record when another process keeps it past ``timeout`` seconds (0: at once)."""
    from filelock import FileLock, Timeout

    lock.parent.mkdir(parents=True, exist_ok=True)
    record = lock.with_name(f"{lock.name}.json")
    try:
        file_lock = FileLock(lock, timeout=timeout)
        file_lock.acquire()
    except Timeout:
        raise Held(json.loads(record.read_text()) if record.exists() else {}) from None
    try:
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(record, {"pid": os.getpid(), "host": socket.gethostname(), "since": since, **holder})
        yield
    finally:
        record.unlink(missing_ok=True)
        file_lock.release()
