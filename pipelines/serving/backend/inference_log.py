"""The inference log's writer: what a served model answered, row by row, in day-partitioned parquet.

Layout (what the drift check and the feedback join read)::

    <folder>/date=YYYY-MM-DD/part-<UTC time, microseconds>-<random>.parquet   rows served that UTC day

Columns: the ones the writer is given (a tabular model: its input features as Triton received
them, ``prediction``, ``label``), then ``request_id`` (string, the row's key), ``model``
(string), ``model_version`` (int64), ``served_at`` (timestamp[us, UTC]) and ``latency_ms``
(float64).

Off the request path: ``append`` only puts the answered arrays in a buffer under a lock; a
background thread writes the buffer as one chunk per day when it holds ``flush_rows`` rows or
its oldest row is ``flush_seconds`` old, and ``close`` writes what is left. A chunk is written
beside (``.part-*.parquet.partial``, which readers skip) and renamed into place, so a reader
never sees half a chunk. A clean stop loses nothing: ``close`` (Triton calls the model's
``finalize`` at unload and at shutdown) writes the rest, and a server told to stop whose shutdown
may skip ``finalize`` has its writer write through (``write_through_on_sigterm``). A crash loses
the rows not yet written: the buffer (fewer than ``flush_rows`` rows, at most
``flush_seconds`` old, give or take the request that filled it) plus a chunk being written at
that moment.

Copied beside ``model.py`` in every version folder; it runs in Triton's backend environment
(numpy 1, pyarrow, no pandas) and in the project's, which uses it to write logs of its own
(``pipelines.serving.client.write_log``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REQUEST_ID = "request_id"
MODEL = "model"
MODEL_VERSION = "model_version"
SERVED_AT = "served_at"
LATENCY_MS = "latency_ms"
# A rollout's shadow log, beside the model's: the answers of the version that did not answer
# (``model.py``'s router), ``<inference_log>/<model>__shadow``, in the same layout.
SHADOW_SUFFIX = "__shadow"
SERVED_AT_TYPE = pa.timestamp("us", tz="UTC")
# The columns every row gets, after the model's own.
STANDARD = {REQUEST_ID: pa.string(), MODEL: pa.string(), MODEL_VERSION: pa.int64(), SERVED_AT: SERVED_AT_TYPE, LATENCY_MS: pa.float64()}
# Triton's data types as parquet column types (the model's inputs and outputs, one value a row).
TRITON_TYPES = {
    "TYPE_STRING": pa.string(),
    "TYPE_FP32": pa.float32(),
    "TYPE_FP64": pa.float64(),
    "TYPE_INT32": pa.int32(),
    "TYPE_INT64": pa.int64(),
    "TYPE_BOOL": pa.bool_(),
}
# Rows kept for another try when chunks cannot be written, as a multiple of flush_rows; the
# oldest are dropped beyond it (each drop is logged with its count), so a full disk never
# exhausts the server's memory.
KEPT_CHUNKS = 100

log = logging.getLogger("flywheel.inference_log")


def tensor_columns(tensors: Sequence[Mapping[str, Any]]) -> dict[str, pa.DataType]:
    """Log columns of the tensors of a Triton model config (its ``input`` or ``output`` list, as
    JSON): one value a row (dims [1]) as its type, several (a classifier's scores) as a list."""
    columns = {}
    for tensor in tensors:
        kind = TRITON_TYPES[tensor["data_type"]]
        columns[tensor["name"]] = kind if [int(d) for d in tensor.get("dims", [1])] == [1] else pa.list_(kind)
    return columns


def from_config(config: Mapping[str, Any], model: str, columns: Mapping[str, pa.DataType], suffix: str = "") -> InferenceLogWriter | None:
    """The writer a Triton model config's parameters ask for (``repository.log_parameters``):
    ``inference_log`` the folder (unset or empty: None, logging off) with ``suffix`` appended to
    its name (a rollout's shadow log), ``inference_log_model`` the model it logs as (default
    ``model``), ``inference_log_flush_rows`` and ``inference_log_flush_seconds``. It writes
    through once the process gets a SIGTERM (``write_through_on_sigterm``)."""
    parameters = {name: value["string_value"] for name, value in config.get("parameters", {}).items()}
    folder = parameters.get("inference_log", "")
    if not folder:
        return None
    writer = InferenceLogWriter(
        folder + suffix,
        parameters.get("inference_log_model") or model,
        columns,
        int(parameters["inference_log_flush_rows"]),
        float(parameters["inference_log_flush_seconds"]),
    )
    write_through_on_sigterm(writer)
    return writer


_SIGTERM_WRITERS: list[InferenceLogWriter] = []  # told to write through by the one watching thread


def write_through_on_sigterm(writer: InferenceLogWriter) -> None:
    """Have ``writer`` write through once this process gets a SIGTERM (sent to Triton's process
    group, as ``TritonServer.stop`` and systemd do). Call from the main thread (a model's
    ``initialize``).

    The Python backend's stub ignores SIGTERM and leaves its end to the server, which calls
    ``finalize`` when it unloads the model at shutdown; but Triton first serves the client
    connections still open, up to its exit timeout, and if they outlast it, exits without
    unloading: ``finalize`` never runs. Written through, every row answered after the signal is on
    disk before its answer leaves. The signal is seen by a thread reading Python's wakeup pipe (the
    main thread waits in the stub's C++ loop, where Python handlers do not run); one pipe and
    thread serve every writer of the process (a process has one wakeup fd).
    """
    _SIGTERM_WRITERS.append(writer)
    if len(_SIGTERM_WRITERS) > 1:
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)  # Python writes each signal's number there from the C handler
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # still ignored: the server ends the stub

    def watch() -> None:
        while signal.SIGTERM not in os.read(read, 64):
            pass
        for each in _SIGTERM_WRITERS:
            each.write_through()

    threading.Thread(target=watch, name="inference-log-sigterm", daemon=True).start()


def request_keys(request_id: str, rows: int) -> list[str]:
    """The keys of a request's rows: its id for one row, ``<id>/<i>`` for row i of several; a
    request without an id (``""``) gets a uuid4 hex made here."""
    request_id = request_id or uuid.uuid4().hex
    return [request_id] if rows == 1 else [f"{request_id}/{i}" for i in range(rows)]


@dataclass(frozen=True)
class _Batch:
    """Rows answered together: one ``append``."""

    columns: Mapping[str, np.ndarray[Any, Any]]  # name -> shape (rows,) or (rows, width)
    request_ids: np.ndarray[Any, Any]  # shape (rows,), strings
    model_version: int
    served_at_us: int  # microseconds since the epoch, UTC
    latency_ms: float | np.ndarray[Any, Any]  # theirs, or one a row
    day: str  # YYYY-MM-DD of served_at, UTC
    appended: float  # time.monotonic() when buffered

    @property
    def rows(self) -> int:
        return len(self.request_ids)


class InferenceLogWriter:
    """Buffers answered rows and writes them to ``folder`` in day-partitioned parquet chunks.

    ``columns``: the model's columns and their parquet types, in order (a column some append
    lacks is blank in its rows, e.g. the ``label`` of a version that answers none). Use as a
    context manager, or call ``close``, so the last rows are written.
    """

    def __init__(self, folder: str | Path, model: str, columns: Mapping[str, pa.DataType], flush_rows: int, flush_seconds: float) -> None:
        if flush_rows < 1 or not flush_seconds > 0:
            raise ValueError(f"inference log {folder}: flush_rows must be >= 1 and flush_seconds > 0, got {flush_rows} and {flush_seconds}")
        clash = set(columns) & set(STANDARD)
        if clash:
            raise ValueError(f"inference log {folder}: columns {sorted(clash)} are the log's own; rename them")
        self.folder = Path(folder)
        self.model = model
        self.schema = pa.schema([*columns.items(), *STANDARD.items()])
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.max_rows = KEPT_CHUNKS * flush_rows
        self._batches: list[_Batch] = []
        self._rows = 0
        self._closing = False
        self._through = False  # write_through: each append written before it returns
        self._retry_at = 0.0  # time.monotonic() before which a failed write is not tried again
        self.lost = 0  # rows that were answered but will never be written (each loss is logged)
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"inference-log-{model}", daemon=True)
        self._thread.start()

    def __enter__(self) -> InferenceLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(
        self,
        columns: Mapping[str, np.ndarray[Any, Any]],
        request_ids: Sequence[str] | np.ndarray[Any, Any],
        model_version: int,
        served_at: float,
        latency_ms: float | np.ndarray[Any, Any] = float("nan"),
    ) -> None:
        """Buffer rows answered together: ``columns`` name -> one value a row (shape (rows,) or
        (rows, 1); (rows, width) for a list column), ``request_ids`` one key a row, ``served_at``
        seconds since the epoch (``time.time()``), ``latency_ms`` theirs (or one a row; NaN:
        blank, for a step that cannot know when the request arrived).

        Never raises (it runs on the request path): rows that cannot be buffered, or that
        arrive after ``close``, are logged as lost, with their count.
        """
        rows = len(request_ids)
        try:
            ids = np.asarray(request_ids, dtype=object).reshape(-1)
            if ids.size == 0:
                return
            values = {name: np.asarray(value) for name, value in columns.items() if name in self.schema.names}
            wrong = {name: len(value) for name, value in values.items() if len(value) != ids.size}
            if wrong:
                raise ValueError(f"{ids.size} request ids but {wrong} rows")
            batch = _Batch(values, ids, int(model_version), int(round(served_at * 1e6)), latency_ms, time.strftime("%Y-%m-%d", time.gmtime(served_at)), time.monotonic())
            with self._wake:
                if self._closing:
                    log.warning("inference log %s: %d rows answered after close were not logged", self.folder, batch.rows)
                    self.lost += batch.rows
                    return
                if not self._through:
                    self._batches.append(batch)
                    self._rows += batch.rows
                    if len(self._batches) == 1 or self._rows >= self.flush_rows:  # the thread waits for the first row, or is due
                        self._wake.notify()
                    return
            for unwritten in self._write([batch]):  # written through; a failed write is kept for the thread's next try
                with self._wake:
                    self._batches.append(unwritten)
                    self._rows += unwritten.rows
                    self._retry_at = time.monotonic() + self.flush_seconds
        except Exception:  # noqa: BLE001 - the log never fails a request
            log.exception("inference log %s: rows could not be buffered and are lost", self.folder)
            self.lost += rows

    def write_through(self) -> None:
        """From now on, write each append before it returns (one chunk each), and what is buffered
        at once: for a server going down, which may end without a ``close`` (see ``model.py``)."""
        with self._wake:
            if self._through:
                return
            self._through = True
            self._wake.notify()
        log.warning("inference log %s: the server is stopping; rows are written as they are answered", self.folder)

    def close(self, timeout: float = 60.0) -> None:
        """Write every buffered row and stop the thread (waiting at most ``timeout`` seconds)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("inference log %s: not written within %.0f s of close; %d buffered rows may be lost", self.folder, timeout, self._rows)

    # --- the thread ------------------------------------------------------------------------

    def _due_in(self) -> float | None:
        """Seconds until the buffer is due to be written (0: now), None while it is empty. After
        a failed write the next try waits ``flush_seconds``."""
        if not self._batches:
            return None
        due = 0.0 if self._rows >= self.flush_rows or self._through else self._batches[0].appended + self.flush_seconds - time.monotonic()
        return max(due, self._retry_at - time.monotonic(), 0.0)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and self._due_in() != 0.0:
                    self._wake.wait(self._due_in())
                batches, self._batches, self._rows = self._batches, [], 0
                closing = self._closing
            unwritten = self._write(batches)
            if not unwritten:
                if closing:
                    return
                continue
            with self._wake:  # put back in front for the next try, within the bound
                kept = self._keep(unwritten + self._batches)
                self._batches, self._rows = kept, sum(b.rows for b in kept)
                if closing:
                    log.error("inference log %s: %d rows could not be written at close and are lost", self.folder, self._rows)
                    self.lost += self._rows
                    return
                self._retry_at = time.monotonic() + self.flush_seconds

    def _keep(self, batches: list[_Batch]) -> list[_Batch]:
        """The newest batches within ``max_rows``; the count of the dropped ones is logged."""
        total = sum(b.rows for b in batches)
        dropped = 0
        while batches and total > self.max_rows:
            total -= batches[0].rows
            dropped += batches.pop(0).rows
        if dropped:
            self.lost += dropped
            log.error("inference log %s: %d rows dropped: more than %d could not be written", self.folder, dropped, self.max_rows)
        return batches

    def _write(self, batches: list[_Batch]) -> list[_Batch]:
        """Write the batches, one chunk per day; returns those to try again (their chunk could
        not be written). A batch whose values do not fit the schema is dropped and logged, so it
        never holds up the others."""
        days: dict[str, list[_Batch]] = {}
        for batch in batches:
            days.setdefault(batch.day, []).append(batch)
        failed = []
        for day, rows in days.items():
            try:
                table = self.table(rows)
            except Exception:  # noqa: BLE001 - which batch does not fit is found by converting each alone
                rows = [batch for batch in rows if self._fits(batch)]
                table = self.table(rows) if rows else None
            if table is None:
                continue
            try:
                self.write_chunk(day, table)
            except Exception:  # noqa: BLE001 - a full disk, a lost mount: kept for the next try, logged
                log.exception("inference log %s: a chunk of %d rows for %s could not be written; kept for another try", self.folder, table.num_rows, day)
                failed += rows
        return failed

    def _fits(self, batch: _Batch) -> bool:
        try:
            self.table([batch])
        except Exception:  # noqa: BLE001 - logged, with the rows it drops
            log.exception("inference log %s: %d rows do not fit the log's schema %s and are dropped", self.folder, batch.rows, self.schema)
            self.lost += batch.rows
            return False
        return True

    def table(self, batches: Sequence[_Batch]) -> pa.Table:
        """The batches as one table of ``self.schema``."""
        sizes = np.array([b.rows for b in batches])
        arrays = [_column([b.columns.get(name) for b in batches], sizes, kind) for name, kind in zip(self.schema.names, self.schema.types) if name not in STANDARD]
        rows = int(sizes.sum())
        arrays += [
            pa.array(np.concatenate([b.request_ids for b in batches]), pa.string()),
            pa.array(np.full(rows, self.model, dtype=object), pa.string()),
            pa.array(np.repeat([b.model_version for b in batches], sizes).astype(np.int64)),
            pa.array(np.repeat([b.served_at_us for b in batches], sizes).astype(np.int64), SERVED_AT_TYPE),
            pa.array(np.concatenate([np.broadcast_to(np.asarray(b.latency_ms, np.float64), (b.rows,)) for b in batches]), from_pandas=True),
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def write_chunk(self, day: str, table: pa.Table) -> Path:
        """Write ``table`` as a new chunk of the ``day`` partition: beside, then renamed."""
        partition = self.folder / f"date={day}"
        partition.mkdir(parents=True, exist_ok=True)
        # Microseconds in the name: one writer's chunks sort in the order they were written.
        now = time.time()
        path = partition / f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}{int(now % 1 * 1e6):06d}Z-{uuid.uuid4().hex[:12]}.parquet"
        partial = partition / f".{path.name}.partial"
        pq.write_table(table, partial)
        os.replace(partial, path)
        return path


def _column(values: list[np.ndarray[Any, Any] | None], sizes: np.ndarray[Any, Any], kind: pa.DataType) -> pa.Array:
    """One column of the batches' rows as ``kind``: ``values`` one array a batch (``sizes`` its
    rows), None where a batch lacks the column (blank there)."""
    present = [v for v in values if v is not None]
    if not present:
        return pa.nulls(int(sizes.sum()), kind)
    if pa.types.is_list(kind):  # shape (rows, width) a batch
        lists = [pa.nulls(n, kind) if v is None else pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), kind.value_type), v.shape[1]).cast(kind) for v, n in zip(values, sizes)]
        return pa.concat_arrays(lists)
    dtype = present[0].dtype
    blank = None if dtype.kind == "O" else 0
    flat = np.concatenate([np.full(n, blank, dtype=dtype) if v is None else v.reshape(n) for v, n in zip(values, sizes)])
    mask = np.repeat([v is None for v in values], sizes) if len(present) < len(values) else None
    return pa.array(flat, kind, mask=mask)
