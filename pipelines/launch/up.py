"""``flywheel up``: one local Airflow, one Triton and one MLflow tracking server (unless
``tracking.uri`` is null) on a deployment home, supervised.

* **One at a time.** ``only_instance`` holds an OS file lock in the Airflow home for as long as
  ``up`` runs (``pipelines.locks``; the OS lets go if the process dies), with a record of who holds it:
  a second ``up`` is refused at once, naming the running one's pid and ports.
* **Supervised.** ``supervise`` polls the servers: a Triton that exits is restarted (the
  versions its ``config.pbtxt`` files name are loaded again), and so is an MLflow server (its
  runs are in its SQLite database; training meanwhile logs locally), at most ``max_restarts`` times in
  ``RESTART_WINDOW_S``; after that, or when Airflow exits, it stops loudly with the exit code and
  the log to read, instead of serving nothing quietly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from pipelines.locks import Held, holding

log = logging.getLogger(__name__)
LOCK_FILE = "flywheel-up.lock"
RESTART_WINDOW_S = 600.0


class UpError(RuntimeError):
    """``flywheel up`` cannot start, or a server it runs stopped for good."""


class Supervised(Protocol):
    """A server ``supervise`` watches (``TritonServer``, ``LocalAirflow``, ``MlflowServer``)."""

    def poll(self) -> int | None: ...  # its exit code, None while it runs

    def start(self, timeout: float = ...) -> None: ...

    def log_tail(self, lines: int = ...) -> str: ...


@contextlib.contextmanager
def only_instance(folder: Path, **running: object) -> Iterator[None]:
    """Hold ``folder``'s ``up`` lock while the block runs; ``UpError`` naming the holder's pid,
    start time and ``running`` details (ports) when another ``up`` holds it."""
    try:
        with holding(folder / LOCK_FILE, 0, **running):
            yield
    except Held as held:
        who = held.holder
        details = ", ".join(f"{key} {value}" for key, value in who.items() if key not in ("pid", "host", "since"))
        raise UpError(
            f"flywheel up is already running on {folder.parent} (pid {who.get('pid', '?')}, {details}, since {who.get('since', '?')}); "
            f"use it, or stop it first (Ctrl-C in its terminal, or kill {who.get('pid', '<pid>')})"
        ) from None


def supervise(
    servers: Mapping[str, Supervised],
    restartable: set[str],
    max_restarts: int = 3,
    every_s: float = 2.0,
    stopped: Callable[[], bool] = lambda: False,
) -> None:
    """Watch ``servers`` (by name) until ``stopped()``: restart one in ``restartable`` that exited,
    at most ``max_restarts`` times in ``RESTART_WINDOW_S``; ``UpError`` with the exit code and
    the log's tail when that is exceeded or another server exits."""
    restarts: dict[str, list[float]] = {name: [] for name in restartable}
    while not stopped():
        for name, server in servers.items():
            code = server.poll()
            if code is None:
                continue
            tail = server.log_tail(20)
            now = time.monotonic()
            recent = [t for t in restarts.get(name, []) if now - t < RESTART_WINDOW_S]
            if name not in restartable or len(recent) >= max_restarts:
                why = "" if name not in restartable else f" {len(recent) + 1} times in {RESTART_WINDOW_S / 60:.0f} minutes"
                raise UpError(f"{name} exited with code {code}{why}; stopping everything. The end of its log:\n{tail}")
            log.error("%s exited with code %s; restarting it (%d of %d). The end of its log:\n%s", name, code, len(recent) + 1, max_restarts, tail)
            try:
                server.start()
            except Exception as error:  # noqa: BLE001 - whatever stops the restart stops `up`, said
                raise UpError(f"{name} exited with code {code} and could not be restarted: {error}") from error
            restarts[name] = [*recent, now]
        time.sleep(every_s)
