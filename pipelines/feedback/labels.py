"""Ground truth that comes back for served requests, keyed by request id.

A feedback file (``feedback.landing_dir/<name>.csv`` or ``.parquet``; ``*.partial`` files are
still being written and are left alone) holds ``request_id,label[,observed_at]``: the request's
key in the inference log (``pipelines.serving``: the client's id, ``<id>/<i>`` for row i of a
request of several rows), the true label, and when it was observed (ISO 8601, offsets applied,
no offset read as UTC; blank or absent: when the file is processed). Other columns are ignored.
Each file, oldest name first:

* **Read.** A CSV is read as text (a request id keeps its leading zeros; a UTF-8 BOM and CRLF
  line ends read as plain UTF-8). A file that cannot be read, holds no rows or lacks
  ``request_id`` or ``label`` is **refused whole**: moved to
  ``feedback.quarantine_dir/<stem>-<UTC time>/`` with ``validation_result.json`` naming the file,
  the column and what was expected. The other files are still processed; then
  ``FeedbackFileError`` names every refused file.
* **Joined** to the inference log of the served model on ``request_id`` with DuckDB, out of core
  (``DUCKDB_MEMORY``, spilling to a temporary folder): only the day partitions from the earliest
  ``observed_at`` minus ``feedback.horizon_hours`` to the latest ``observed_at`` are read. A request
  id the log holds twice is matched to its latest answer at or before the observation.
* **Validated** with Great Expectations (an in-code suite, ``<project>_feedback``, in the
  project's File Data Context), each row on its own: the request id is present, unique in the
  file, not labelled by an earlier file, known (a logged answer), the label a number within the
  project's own suite's set or range for the label column (its ``expect_column_values_to_be_in_set``
  / ``_between`` on ``dataset.label.column``, without ``mostly``; a classification label the suite
  does not bound: the values of the raw data, else 0 and 1; a regression label: any number), and
  observed between 0 and ``horizon_hours`` after it was served. A row failing any of these is
  **quarantined** with the first failed check as its ``reason`` (``REASONS``), in
  ``feedback.quarantine_dir/<stem>-<UTC time>/rows.parquet`` beside ``validation_result.json``.
  All copies of a request id the file names twice are quarantined: which label is right is unknown.
* **Written**: the good rows, every inference-log column plus ``<dataset.label.column>`` (the
  truth, float64), ``observed_at`` and ``feedback_file``, to
  ``feedback.labelled_dir/date=<served day>/part-<sha256 of the file's bytes, 16 hex>.parquet``;
  then the file moves to ``feedback.archive_dir``. Every row read is labelled or quarantined.

A crash at any point leaves the file in landing; the next run rewrites the same parts (a file's
own parts do not count as earlier labels) and reuses its quarantine folder, so nothing is
doubled. The same bytes landed again are handled the same way.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.artifacts import LABEL_OUTPUT, REQUEST_ID, RESULT_FILE
from pipelines.config import FeedbackConfig, MetricsConfig, ProjectConfig, Task
from pipelines.data import raw
from pipelines.data.ingest import BATCH_SUFFIXES, land_file, move_into
from pipelines.data.schema import PARQUET_SUFFIXES, parse_times
from pipelines.data.validation import load_suite
from pipelines.errors import NotRetryable
from pipelines.lineage import Record, read_json, write_json
from pipelines.metrics import Sample, emit
from pipelines.monitoring.check import read_window
from pipelines.serving.client import log_dir

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

log = logging.getLogger(__name__)

LABEL, OBSERVED_AT = "label", "observed_at"  # the feedback file's truth and when it was observed
SERVED_AT = "served_at"
FEEDBACK_FILE = "feedback_file"
ROWS_FILE = "rows.parquet"
FOLDER_TIME = "%Y%m%dT%H%M%SZ"
EXPECTED = (
    "a CSV with a header row, or a parquet file, with the columns request_id and label and optionally "
    "observed_at (ISO 8601), and at least one row"
)
# DuckDB's memory for the join; beyond it, it spills to a temporary folder.
DUCKDB_MEMORY = "2GB"
# Why a row was quarantined, in the order the checks are read: a row gets the first it fails.
REASONS = (
    "missing_request_id",
    "duplicate_in_file",
    "bad_observed_at",
    "already_labelled",
    "unknown_request_id",
    "label_not_a_number",
    "label_not_allowed",
    "observed_before_served",
    "late",
)
# Helper columns of the validated frame (GE reads them; they are not written).
_LABELLED_IN, _HOURS = "labelled_in", "hours_after_served"
_ROW = "_row"
_VALUE_CHECKS = ("expect_column_values_to_be_in_set", "expect_column_values_to_be_between")


class FeedbackFileError(NotRetryable):
    """One or more feedback files were refused whole (moved to quarantine); the others were
    handled. ``summary`` is what ``ingest_feedback`` would have returned."""

    def __init__(self, message: str, summary: Record) -> None:
        super().__init__(message)
        self.summary = summary


def land_feedback(config: ProjectConfig, source: Path) -> Path:
    """Copy a CSV or parquet feedback file into ``feedback.landing_dir`` under its own name,
    atomically (``pipelines.data.ingest.land_file``: written as ``<name>.partial``, then renamed);
    returns its path. ``FileNotFoundError`` / ``ValueError`` for a missing ``source`` or another kind of file."""
    return land_file(config.dataset.model_copy(update={"landing_dir": config.feedback.landing_dir}), source)


def ingest_feedback(config: ProjectConfig, now: datetime | None = None) -> Record:
    """Join, validate and write every complete feedback file in ``feedback.landing_dir`` (see the
    module's docstring); ``now`` (UTC) stands for a missing ``observed_at`` and names quarantine folders.

    Returns ``{"files": [names], "refused": [names], "rows": rows read from the files not
    refused, "labelled": rows written, "quarantined": {reason: rows}, "windows": [[start, end],
    ...]}``: the ``performance.window_hours`` windows (aligned to UTC midnight, ISO 8601) whose
    served rows got labels. ``FeedbackFileError`` after all files were handled if any was
    refused whole; ``SuiteError`` for a broken project suite, before any file moves.
    """
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    feedback = config.feedback
    landing = feedback.landing_dir
    files = sorted(p for p in landing.iterdir() if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES) if landing.is_dir() else []
    summary: Record = {"files": [f.name for f in files], "refused": [], "rows": 0, "labelled": 0, "quarantined": {}, "windows": []}
    if not files:
        log.info("No feedback files in %s", landing)
        return summary
    label = config.dataset.label.column
    if label == LABEL_OUTPUT:
        raise NotRetryable(
            f"project {config.name}: dataset.label.column is {label!r}, the inference log's column of the served decision; "
            "the labelled rows need both: rename the dataset's label column"
        )

    validator = FeedbackValidator(config)  # a broken project suite stops here, before any file moves
    problems: list[str] = []
    windows: set[tuple[str, str]] = set()
    for path in files:
        frame = read_feedback(path)
        if isinstance(frame, Refusal):
            folder = _refuse(feedback, path, frame, now)
            summary["refused"].append(path.name)
            problems.append(f"- {path.name} -> {folder}: {frame.message}")
            log.error("%s refused, moved to %s: %s", path.name, folder, frame.message)
            continue
        outcome = _ingest_file(config, validator, path, frame, now)
        summary["rows"] += outcome["rows"]
        summary["labelled"] += outcome["labelled"]
        for reason, count in outcome["quarantined"].items():
            summary["quarantined"][reason] = summary["quarantined"].get(reason, 0) + count
        windows |= outcome["windows"]
        move_into(path, feedback.archive_dir)
    summary["windows"] = [list(w) for w in sorted(windows)]
    report(config.metrics, config.identity, summary)  # before raising, so a refusal reaches Prometheus
    if problems:
        message = f"{len(problems)} of {len(files)} feedback file(s) refused whole and moved to quarantine:\n" + "\n".join(problems)
        handled = [f for f in summary["files"] if f not in summary["refused"]]
        if handled:
            message += f"\nThe other files were joined: {handled} ({summary['labelled']} rows labelled, quarantined {summary['quarantined']})"
        raise FeedbackFileError(message, summary)
    return summary


def read_labelled(config: ProjectConfig, start: datetime, end: datetime) -> pd.DataFrame:
    """The labelled production rows served in ``[start, end)`` (``feedback.labelled_dir``; only
    the day partitions the window spans are read, ``monitoring.check.read_window``). Empty before any."""
    return read_window(config.feedback.labelled_dir, start, end)


class Refusal:
    """Why a feedback file is refused whole: the ``message`` and the ``column`` at fault (if one is)."""

    def __init__(self, message: str, column: str | None = None) -> None:
        self.message, self.column = message, column


def read_feedback(path: Path) -> pd.DataFrame | Refusal:
    """The rows of a feedback file (a CSV read as text, with or without a UTF-8 BOM; a request
    id of a parquet file as text), or why the file is refused whole (naming the file and column)."""
    name = path.name
    try:
        if path.stat().st_size == 0:
            return Refusal(f"{name}: the file is empty; expected {EXPECTED}")
        if path.name.lower().endswith(PARQUET_SUFFIXES):
            frame = pd.read_parquet(path)
        else:
            header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False, encoding="utf-8-sig").iloc[0].tolist()
            repeated = sorted({str(c) for c in header if header.count(c) > 1})
            if repeated:
                return Refusal(f"{name}: the header names {repeated} more than once; expected {EXPECTED}", repeated[0])
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    except (ValueError, OSError) as exc:  # pandas' and pyarrow's parse errors, bytes that are not UTF-8
        kind = "parquet file" if path.name.lower().endswith(PARQUET_SUFFIXES) else "CSV"
        return Refusal(f"{name}: not a readable {kind} ({type(exc).__name__}: {str(exc).strip()}); expected {EXPECTED}")
    for column in (REQUEST_ID, LABEL):
        if column not in frame.columns:
            return Refusal(f"{name}: no column {column!r} (the file has {[str(c) for c in frame.columns]}); expected {EXPECTED}", column)
    if frame.empty:
        return Refusal(f"{name}: a header but no rows; expected {EXPECTED}")
    frame = frame[[c for c in (REQUEST_ID, LABEL, OBSERVED_AT) if c in frame.columns]].reset_index(drop=True)
    return frame.assign(**{REQUEST_ID: frame[REQUEST_ID].map(_text, na_action="ignore").astype(object)})


def _text(value: object) -> str:
    """A request id as text: a whole number of a parquet column with blanks (read as a float) loses its ``.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _refuse(feedback: FeedbackConfig, path: Path, refusal: Refusal, now: datetime) -> Path:
    """Move a file refused whole into its quarantine folder, beside its ``validation_result.json``."""
    sha = file_sha(path)
    folder = quarantine_folder(feedback, path, sha, now)
    result = {
        "success": False,
        "file": path.name,
        "sha256": sha,
        "column": refusal.column,
        "error": refusal.message,
        "expected": EXPECTED,
        "checked_at": now.isoformat(),
    }
    write_json(folder / RESULT_FILE, result)  # the report first: a crash in between leaves the file in landing
    move_into(path, folder)
    return folder


def file_sha(path: Path) -> str:
    """The sha256 of the file's bytes (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def quarantine_folder(feedback: FeedbackConfig, path: Path, sha: str, now: datetime) -> Path:
    """``<quarantine_dir>/<stem>-<now>/``, or the folder an earlier, interrupted run of the same
    bytes under the same name made (its ``validation_result.json`` names them): reused, not doubled."""
    root = feedback.quarantine_dir
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            result = folder / RESULT_FILE
            if folder.name.startswith(f"{path.stem}-") and result.is_file():
                earlier = read_json(result)
                if earlier.get("sha256") == sha and earlier.get("file") == path.name:
                    return folder
    folder, copy = root / f"{path.stem}-{now.strftime(FOLDER_TIME)}", 2
    while folder.exists():
        folder, copy = root / f"{path.stem}-{now.strftime(FOLDER_TIME)}.{copy}", copy + 1
    return folder


def _ingest_file(config: ProjectConfig, validator: FeedbackValidator, path: Path, frame: pd.DataFrame, now: datetime) -> Record:
    """Join, validate and write one readable feedback file; returns its rows, labelled, quarantined by reason and windows."""
    import pyarrow as pa

    feedback, label = config.feedback, config.dataset.label.column
    sha = file_sha(path)
    part = f"part-{sha[:16]}.parquet"
    observed = _observed_at(frame, now)
    truth = pd.to_numeric(frame[LABEL], errors="coerce").astype("float64")
    rows = pd.DataFrame({_ROW: np.arange(len(frame), dtype=np.int64), REQUEST_ID: frame[REQUEST_ID], OBSERVED_AT: observed})
    joined = join_inference_log(log_dir(config.serving, config.served_model), feedback.labelled_dir, rows, feedback.horizon_hours, part)

    served = joined.column(SERVED_AT).to_pandas()
    checked = pd.DataFrame(
        {
            REQUEST_ID: frame[REQUEST_ID],
            label: truth,
            OBSERVED_AT: observed,
            SERVED_AT: served,
            _LABELLED_IN: joined.column(_LABELLED_IN).to_pandas(),
            _HOURS: (observed - served) / pd.Timedelta(hours=1),
        }
    )
    result, reasons = validator.validate(checked, path.stem)
    good = reasons.isna().to_numpy()

    labelled = joined.drop_columns([_ROW, _LABELLED_IN]).filter(pa.array(good))
    labelled = labelled.append_column(label, pa.array(truth[good], pa.float64()))
    labelled = labelled.append_column(OBSERVED_AT, pa.array(observed[good]).cast(pa.timestamp("us", tz="UTC"), safe=False))
    labelled = labelled.append_column(FEEDBACK_FILE, pa.array([path.name] * int(good.sum()), pa.string()))
    write_labelled(feedback.labelled_dir, labelled, part)

    quarantined = reasons.dropna().value_counts().to_dict()
    if quarantined:
        folder = quarantine_folder(feedback, path, sha, now)
        bad = frame[~good].assign(**{SERVED_AT: served[~good], "reason": reasons[~good]})
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{ROWS_FILE}.partial"
        bad.to_parquet(partial, index=False)
        partial.replace(folder / ROWS_FILE)
        counts = {"rows": len(frame), "labelled": int(good.sum()), "quarantined": quarantined}
        write_json(folder / RESULT_FILE, {"file": path.name, "sha256": sha, **counts, "checked_at": now.isoformat(), **result})
        log.warning("%s: %d of %d rows quarantined in %s: %s", path.name, len(bad), len(frame), folder, quarantined)
    log.info("%s: %d of %d rows labelled", path.name, int(good.sum()), len(frame))
    windows = performance_windows(served[good], config.performance.window_hours)
    return {"rows": len(frame), "labelled": int(good.sum()), "quarantined": {str(k): int(v) for k, v in quarantined.items()}, "windows": windows}


def _observed_at(frame: pd.DataFrame, now: datetime) -> pd.Series:
    """``observed_at`` as UTC timestamps: ``now`` where blank or absent, NaT where it does not parse."""
    default = pd.Timestamp(now)
    if OBSERVED_AT not in frame.columns:
        return pd.Series(default, index=frame.index, dtype="datetime64[ns, UTC]")
    parsed = parse_times(frame[OBSERVED_AT]).astype("datetime64[ns, UTC]")
    return parsed.where(frame[OBSERVED_AT].notna(), default)


def join_inference_log(log_folder: Path, labelled_dir: Path, rows: pd.DataFrame, horizon_hours: float, own_part: str) -> pa.Table:
    """For each of ``rows`` (columns ``_row``: 0..n-1, ``request_id``, ``observed_at`` UTC), in
    order: ``_row``, ``labelled_in`` (the feedback file of an earlier labelled part naming the
    request id, parts named ``own_part`` aside) and the inference log's columns of the request's
    answer (all null when the log of ``log_folder`` has none). One row per input row, as Arrow.

    DuckDB reads the day partitions from the earliest ``observed_at`` minus ``horizon_hours`` to
    the latest ``observed_at``; an id not found there is looked up in the other days, reading
    only ``request_id`` and ``served_at``, so that a late or early label is told from an unknown id.
    """
    import duckdb

    observed = rows[OBSERVED_AT].dropna()
    days = (
        set(pd.date_range((observed.min() - timedelta(hours=horizon_hours)).date(), observed.max().date(), freq="D").strftime("%Y-%m-%d"))
        if len(observed)
        else set()
    )
    parts = sorted(log_folder.glob("date=*/part-*.parquet")) if log_folder.is_dir() else []
    inside = [p for p in parts if p.parent.name.removeprefix("date=") in days]
    outside = [p for p in parts if p.parent.name.removeprefix("date=") not in days]
    earlier = [p for p in sorted(labelled_dir.glob("date=*/part-*.parquet")) if p.name != own_part] if labelled_dir.is_dir() else []

    spill = tempfile.mkdtemp(prefix="flywheel-feedback-duckdb-")
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")
        con.execute(f"SET temp_directory = {_literal(spill)}")
        con.execute("SET TimeZone = 'UTC'")
        con.register("feedback", rows[[_ROW, REQUEST_ID, OBSERVED_AT]])
        labelled_in = (
            f"SELECT {REQUEST_ID}, min({FEEDBACK_FILE}) AS {_LABELLED_IN} FROM {_parquet(earlier)} "
            f"WHERE {REQUEST_ID} IN (SELECT {REQUEST_ID} FROM feedback) GROUP BY {REQUEST_ID}"
            if earlier
            else f"SELECT NULL::VARCHAR AS {REQUEST_ID}, NULL::VARCHAR AS {_LABELLED_IN} WHERE false"
        )
        joined = con.sql(
            f"SELECT f.{_ROW} AS {_ROW}, e.{_LABELLED_IN} AS {_LABELLED_IN}, m.* EXCLUDE ({_ROW}, _pick) "
            f"FROM feedback AS f LEFT JOIN ({_matches(inside)}) AS m ON m.{_ROW} = f.{_ROW} "
            f"LEFT JOIN ({labelled_in}) AS e ON e.{REQUEST_ID} = f.{REQUEST_ID} ORDER BY f.{_ROW}"
        ).to_arrow_table()
        if outside and joined.column(SERVED_AT).null_count:
            joined = _served_elsewhere(con, joined, outside)
        return joined
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def _matches(files: list[Path], columns: list[str] | None = None) -> str:
    """SQL: per row of ``feedback``, its ``_row`` and the log ``files``' ``columns`` (None: all) of
    the answer to its request id: the latest at or before the observation, else the earliest after."""
    if not files:
        return f"SELECT NULL::BIGINT AS {_ROW}, NULL::VARCHAR AS {REQUEST_ID}, NULL::TIMESTAMPTZ AS {SERVED_AT}, 1 AS _pick WHERE false"
    chosen = ", ".join(f"l.{c}" for c in columns) if columns else "l.*"
    before = f"l.{SERVED_AT} <= f.{OBSERVED_AT}"
    return (
        f"SELECT f.{_ROW} AS {_ROW}, {chosen}, row_number() OVER (PARTITION BY f.{_ROW} ORDER BY {before} DESC, "
        f"CASE WHEN {before} THEN -epoch_us(l.{SERVED_AT}) ELSE epoch_us(l.{SERVED_AT}) END) AS _pick "
        f"FROM feedback AS f JOIN {_parquet(files)} AS l ON l.{REQUEST_ID} = f.{REQUEST_ID} QUALIFY _pick = 1"
    )


def _parquet(files: list[Path]) -> str:
    """SQL: the parquet ``files`` as one table (the columns of all of them; no ``date`` column from their folders)."""
    return f"read_parquet({_literal(files)}, union_by_name = true, hive_partitioning = false)"


def _served_elsewhere(con: duckdb.DuckDBPyConnection, joined: pa.Table, files: list[Path]) -> pa.Table:
    """``joined`` with ``served_at`` filled in for the rows not found in the days read, from the
    other days' ``files`` (only ``request_id`` and ``served_at`` are read): such a row was
    answered outside its horizon, and its other log columns stay null."""
    import pyarrow as pa

    found = con.sql(f"SELECT {_ROW}, {SERVED_AT} FROM ({_matches(files, [REQUEST_ID, SERVED_AT])}) ORDER BY {_ROW}").to_arrow_table()
    if not found.num_rows:
        return joined
    served = joined.column(SERVED_AT).to_pandas().copy()  # Arrow's memory is read-only
    served.iloc[found.column(_ROW).to_numpy()] = found.column(SERVED_AT).to_pandas().to_numpy()
    index = joined.schema.get_field_index(SERVED_AT)
    return joined.set_column(index, SERVED_AT, pa.array(served, joined.schema.field(SERVED_AT).type))


def _literal(value: str | Path | Iterable[Path]) -> str:
    """A SQL string literal, or a list of them."""
    if isinstance(value, (str, Path)):
        return "'" + str(value).replace("'", "''") + "'"
    return "[" + ", ".join(_literal(v) for v in value) + "]"


def write_labelled(labelled_dir: Path, rows: pa.Table, part: str) -> list[Path]:
    """Write ``rows`` as ``labelled_dir/date=<served_at's UTC day>/<part>``, each atomically (a
    hidden ``.partial``, renamed); a ``part`` of the same name in another day, left by an earlier
    run of the same file, is removed. Returns the parts written."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    days = pc.strftime(rows.column(SERVED_AT), format="%Y-%m-%d") if rows.num_rows else None
    written = []
    for day in sorted(pc.unique(days).to_pylist()) if days is not None else []:
        target = labelled_dir / f"date={day}" / part
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{part}.partial")
        pq.write_table(rows.filter(pc.equal(days, day)), partial)
        partial.replace(target)
        written.append(target)
    for stale in set(labelled_dir.glob(f"date=*/{part}")) - set(written) if labelled_dir.is_dir() else set():
        stale.unlink()
    return written


def performance_windows(served: pd.Series, window_hours: int) -> set[tuple[str, str]]:
    """The ``[start, end)`` windows of ``window_hours`` (a divisor of 24: aligned to UTC midnight)
    that hold the ``served`` times, as ISO 8601 pairs."""
    starts = pd.to_datetime(served.dropna(), utc=True).dt.floor(f"{window_hours}h").unique()
    span = pd.Timedelta(hours=window_hours)
    return {(start.isoformat(), (start + span).isoformat()) for start in starts}


class FeedbackValidator:
    """The in-code GE suite of a project's feedback rows, in its File Data Context (``<home>/gx``)."""

    def __init__(self, config: ProjectConfig) -> None:
        """The suite's label checks come from the project's own suite (``SuiteError`` if broken)."""
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

        label = config.dataset.label.column
        checks: list[tuple[str, dict[str, Any], str]] = [
            ("expect_column_values_to_not_be_null", {"column": REQUEST_ID}, "missing_request_id"),
            ("expect_column_values_to_be_unique", {"column": REQUEST_ID}, "duplicate_in_file"),
            ("expect_column_values_to_not_be_null", {"column": OBSERVED_AT}, "bad_observed_at"),
            ("expect_column_values_to_be_null", {"column": _LABELLED_IN}, "already_labelled"),
            ("expect_column_values_to_not_be_null", {"column": SERVED_AT}, "unknown_request_id"),
            ("expect_column_values_to_not_be_null", {"column": label}, "label_not_a_number"),
            *((kind, kwargs, "label_not_allowed") for kind, kwargs in label_checks(config)),
            ("expect_column_values_to_be_between", {"column": _HOURS, "min_value": 0, "max_value": config.feedback.horizon_hours}, "late"),
        ]
        expectations = [ExpectationConfiguration(type=kind, kwargs=kwargs, meta={"reason": reason}).to_domain_obj() for kind, kwargs, reason in checks]
        self.context = gx.get_context(mode="file", project_root_dir=str(config.home))
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        name = f"{config.name}_feedback"
        suite = self.context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
        source = self.context.data_sources.add_or_update_pandas("feedback")
        asset = next((a for a in source.assets if a.name == config.name), None) or source.add_dataframe_asset(config.name)
        batches = next((b for b in asset.batch_definitions if b.name == "file"), None) or asset.add_batch_definition_whole_dataframe("file")
        self.definition = self.context.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batches, suite=suite))

    def validate(self, checked: pd.DataFrame, run_name: str) -> tuple[Record, pd.Series]:
        """GE's result for the rows of ``checked`` (index 0..n-1; its lists of every unexpected
        value and index dropped: ``rows.parquet`` holds the rows) and each row's reason (NaN: good)."""
        from great_expectations.core.run_identifier import RunIdentifier

        run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(timezone.utc))
        result = self.definition.run(batch_parameters={"dataframe": checked}, result_format={"result_format": "COMPLETE"}, run_id=run_id)
        reasons = pd.Series(None, index=checked.index, dtype=object)
        found = []
        for check in result.results:
            spec = check.expectation_config
            assert spec is not None  # GE sets it on every result of a suite's run
            if check.exception_info and check.exception_info.get("raised_exception"):
                raise NotRetryable(f"feedback check {spec.type}({spec.kwargs.get('column')}) could not run: {check.exception_info.get('exception_message')}")
            found.append((REASONS.index(spec.meta["reason"]), check.result.get("unexpected_index_list") or []))
        for reason, flagged in ((REASONS[i], rows) for i, rows in sorted(found, key=lambda pair: pair[0])):
            fresh = [i for i in flagged if pd.isna(reasons.at[i])]  # a row keeps the first check it fails
            if reason == "late":  # the one range check of the time since serving: its two sides
                hours = checked.loc[fresh, _HOURS]
                reasons.loc[hours.index[hours < 0]] = "observed_before_served"
                reasons.loc[hours.index[hours >= 0]] = "late"
            else:
                reasons.loc[fresh] = reason
        # GE leaves ExpectationSuiteValidationResult.to_json_dict unannotated
        record: Record = result.to_json_dict()  # type: ignore[no-untyped-call]
        for entry in record.get("results", []):
            for key in ("unexpected_list", "unexpected_index_list", "unexpected_index_query"):
                (entry.get("result") or {}).pop(key, None)
        return record, reasons


def label_checks(config: ProjectConfig) -> list[tuple[str, dict[str, Any]]]:
    """The checks of a label's values, as (expectation type, kwargs): the project suite's
    ``expect_column_values_to_be_in_set`` / ``_between`` on ``dataset.label.column`` (without
    ``mostly``: each row is judged); for a classification label the suite does not bound, the set
    of the raw data's values (0 and 1 before there is raw data); for a regression label, none."""
    label = config.dataset.label
    checks = []
    for expectation in load_suite(config.dataset.expectation_suite).expectations:
        spec = expectation.configuration
        if spec.type in _VALUE_CHECKS and spec.kwargs.get("column") == label.column:
            checks.append((spec.type, {k: v for k, v in spec.kwargs.items() if k != "mostly"}))
    if checks or label.task != Task.classification:
        return checks
    values: list[Any] = [0, 1]
    if parts := raw.parts(config.dataset):
        with raw.connect(config.dataset) as con:  # the label column only, however long the history
            seen = con.sql(f'SELECT DISTINCT "{label.column}" FROM {raw.relation(parts)} WHERE "{label.column}" IS NOT NULL').fetchall()
        values = sorted(value for (value,) in seen) or values
    return [("expect_column_values_to_be_in_set", {"column": label.column, "value_set": values})]


def report(metrics: MetricsConfig, identity: dict[str, str], summary: Record) -> None:
    """Rows labelled and quarantined (by reason) and files handled or refused in this run
    (``summary``, as ``ingest_feedback`` returns it), for Prometheus. A metrics outage is logged,
    never the run's failure."""
    quarantined = summary["quarantined"]
    samples = [
        Sample("flywheel_feedback_rows", "Feedback rows of the latest run, by outcome.", float(summary["labelled"]), {"outcome": "labelled"}),
        Sample("flywheel_feedback_rows", "Feedback rows of the latest run, by outcome.", float(sum(quarantined.values())), {"outcome": "quarantined"}),
        *(
            Sample("flywheel_feedback_quarantined_rows", "Feedback rows of the latest run quarantined, by reason.", float(quarantined.get(r, 0)), {"reason": r})
            for r in REASONS
        ),
        Sample("flywheel_feedback_files", "Feedback files of the latest run, by outcome.", float(len(summary["files"]) - len(summary["refused"])), {"outcome": "joined"}),
        Sample("flywheel_feedback_files", "Feedback files of the latest run, by outcome.", float(len(summary["refused"])), {"outcome": "refused"}),
    ]
    try:
        emit(metrics, identity, "feedback", samples)
    except Exception:  # the files are already handled; the error raised next matters more
        log.exception("could not report the feedback metrics of %s", summary["files"])
