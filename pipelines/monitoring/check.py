"""The drift check of one window of the inference log against the served version's reference.

Each published version carries ``reference.parquet``: a seeded sample of the training split
it learned from (``monitoring.reference_rows``), so drift is always measured against what the
model in service was trained on. A check writes, for the window ending at ``end``::

    reports/drift/<model>/<end as YYYYmmddTHHMMSSZ>/report.html    Evidently's report
    reports/drift/<model>/<end as YYYYmmddTHHMMSSZ>/summary.json   verdict, share, per-column tests

built beside and renamed into place, so a reader never sees half a report and a re-run of
the same window (a retry, a backfill) replaces it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipelines.artifacts import NULL_FILE, REFERENCE_FILE, REPORT_FILE, SUMMARY_FILE, TEXT
from pipelines.config import AnyProject, DatasetConfig, FeatureType, MonitoringConfig, ProjectConfig
from pipelines.data.sampling import positions, read_sample, take
from pipelines.lineage import Record, read_json, write_json
from pipelines.metrics import Sample, emit
from pipelines.monitoring import calibration
from pipelines.monitoring.calibration import NullDistribution
from pipelines.monitoring.drift import ColumnKind, DriftCheckError, calibrate, compare, draws_from_pool
from pipelines.serving import repository
from pipelines.serving.client import log_dir

if TYPE_CHECKING:
    from evidently.core.report import Snapshot  # untyped: Any to mypy

log = logging.getLogger(__name__)

FOLDER_TIME = "%Y%m%dT%H%M%SZ"
# Rows read a check, in multiples of the reference's rows. A window's statistics are scaled by the
# effective size n m / (n + m) of n window rows against m reference rows, and the calibration's
# ladder stops at 16 m, so a sample of 16 m rows tests as a window of any size does (n_eff 0.94 m
# against at most m). Training rows read for a reference and its calibration pool: 64 m, a pool
# whose own noise is small beside every calibrated window's.
WINDOW_SAMPLE = 16
TRAIN_SAMPLE = 64


def monitored_columns(dataset: DatasetConfig, monitoring: MonitoringConfig) -> dict[str, ColumnKind]:
    """The logged features of a tabular project the drift check tests (all but
    ``monitoring.exclude_columns``), each with its kind."""
    kinds = {FeatureType.numeric: ColumnKind.numeric, FeatureType.categorical: ColumnKind.categorical}
    excluded = set(monitoring.exclude_columns)
    return {f.name: kinds[f.type] for f in dataset.features if f.name not in excluded}


def write_reference(train: Path, dataset: DatasetConfig, monitoring: MonitoringConfig, seed: int, folder: Path) -> Record:
    """What a version is compared against, written into ``folder``: ``reference.parquet``, a
    sample of the training split ``train`` (a parquet file), its features only, at most
    ``monitoring.reference_rows`` rows drawn with ``seed`` (from at most ``TRAIN_SAMPLE`` times
    as many training rows, themselves a seeded sample: memory does not grow with the split); and ``drift_null.parquet``, each
    monitored column's null calibrated on windows drawn from the training rows beside that
    sample (``drift.calibrate``). Returns the file paths by name and the calibration's summary
    (pool rows, 0 when the windows were bootstrapped from the reference; sizes, draws, seconds)
    for the lineage."""
    frame = read_sample(train, [f.name for f in dataset.features], TRAIN_SAMPLE * monitoring.reference_rows, seed)
    sample = frame.sample(n=min(len(frame), monitoring.reference_rows), random_state=seed)
    sample.reset_index(drop=True).to_parquet(folder / REFERENCE_FILE, index=False)
    started = time.perf_counter()
    columns = monitored_columns(dataset, monitoring)
    pool = frame.drop(index=sample.index)
    nulls = calibrate(sample, pool, columns, monitoring.min_rows, monitoring.null_draws, seed)
    calibration.write(nulls, folder / NULL_FILE)
    return {
        "files": {REFERENCE_FILE: folder / REFERENCE_FILE, NULL_FILE: folder / NULL_FILE},
        "calibration": {
            "reference_rows": len(sample),
            "pool_rows": len(pool) if draws_from_pool(len(sample), len(pool)) else 0,
            "draws": monitoring.null_draws,
            "sizes": [int(n) for n in next(iter(nulls.values())).sizes] if nulls else [],
            "seconds": round(time.perf_counter() - started, 3),
        },
    }


def read_nulls(version_dir: Path, reference: pd.DataFrame, columns: dict[str, ColumnKind], monitoring: MonitoringConfig) -> dict[str, NullDistribution]:
    """The calibrated nulls stored with a version; a version published before calibration
    existed gets them now, from its reference alone (``drift.calibrate``, seeded)."""
    if (version_dir / NULL_FILE).exists():
        return calibration.read(version_dir / NULL_FILE)
    log.warning("%s: no %s; calibrating on the reference sample alone", version_dir, NULL_FILE)
    return calibrate(reference, reference.iloc[:0], columns, monitoring.min_rows, monitoring.null_draws, seed=0)


def read_window(folder: Path, start: datetime, end: datetime) -> pd.DataFrame:
    """The requests of the inference log ``folder`` (``client.log_dir``) served in ``[start,
    end)``; only the day partitions it spans are read. Empty if nothing was logged yet."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not folder.is_dir():
        return pd.DataFrame()
    days = pd.date_range(start.date(), end.date(), freq="D").strftime("%Y-%m-%d").tolist()
    served_at = ds.field("served_at")
    when = pa.timestamp("us", tz="UTC")
    rows = ds.dataset(folder, format="parquet", partitioning="hive", exclude_invalid_files=False).to_table(
        filter=ds.field("date").isin(days) & (served_at >= pa.scalar(start, when)) & (served_at < pa.scalar(end, when))
    )
    return rows.to_pandas()


def sample_window(folder: Path, start: datetime, end: datetime, columns: list[str], at_most: int, seed: int) -> tuple[pd.DataFrame, int, list[int]]:
    """``columns`` of the requests of the inference log ``folder`` served in ``[start, end)``
    (as ``read_window``), at most ``at_most`` of them: a seeded uniform sample of a larger
    window, read a record batch at a time. Returns the rows, the window's row count and the
    model versions that served in it."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    if not folder.is_dir():
        return pd.DataFrame(columns=columns), 0, []
    days = pd.date_range(start.date(), end.date(), freq="D").strftime("%Y-%m-%d").tolist()
    served_at, when = ds.field("served_at"), pa.timestamp("us", tz="UTC")
    window = ds.field("date").isin(days) & (served_at >= pa.scalar(start, when)) & (served_at < pa.scalar(end, when))
    log = ds.dataset(folder, format="parquet", partitioning="hive", exclude_invalid_files=False)
    rows = log.count_rows(filter=window)
    versions: set[int] = set()

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in log.to_batches(columns=[*columns, "model_version"], filter=window, use_threads=False):
            versions.update(int(v) for v in pc.unique(batch.column("model_version")).to_pylist())
            yield batch

    table = take(batches(), positions(rows, at_most, seed))
    frame = table.to_pandas() if table is not None else pd.DataFrame(columns=[*columns, "model_version"])
    return frame, rows, sorted(versions)


def reports_root(monitoring: MonitoringConfig, model: str) -> Path:
    """Where the drift reports of Triton's ``model`` are written, one folder a window."""
    return monitoring.reports_dir / model


def report_folder(monitoring: MonitoringConfig, model: str, end: datetime) -> Path:
    """The report folder of the window of ``model`` that ends at ``end``."""
    return reports_root(monitoring, model) / end.astimezone(timezone.utc).strftime(FOLDER_TIME)


def check_window(config: AnyProject, start: datetime, end: datetime) -> Record:
    """Test the requests served in ``[start, end)`` for drift; write the report; emit metrics.

    Returns the summary. With no served version yet, or fewer than ``monitoring.min_rows``
    logged rows, there is no verdict: the summary says why and no report is written.
    """
    model, monitoring = config.served_model, config.monitoring
    summary: Record = {
        "project": config.name,
        "model": model,
        "window": {"start": start.isoformat(), "end": end.isoformat()},
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    version = repository.served_version(config.served_model_dir)
    if version is None:
        return {**summary, "status": "skipped", "reason": "no version serves yet"}
    columns = monitored_columns(config.dataset, monitoring) if isinstance(config, ProjectConfig) else {TEXT: ColumnKind.text}
    current, rows, versions = sample_window(log_dir(config.serving, model), start, end, list(columns), WINDOW_SAMPLE * monitoring.reference_rows, int(end.timestamp()))
    if rows < monitoring.min_rows:
        reason = f"{rows} requests logged in the window, fewer than monitoring.min_rows={monitoring.min_rows}"
        log.info("no drift verdict for %s: %s", model, reason)
        return {**summary, "version": version, "status": "skipped", "reason": reason}
    reference_file = config.served_model_dir / str(version) / REFERENCE_FILE
    if not reference_file.exists():
        raise DriftCheckError(f"{reference_file}: missing; the served version {version} has no reference sample to compare with")
    reference = pd.read_parquet(reference_file)
    nulls = read_nulls(reference_file.parent, reference, columns, monitoring)
    result = compare(reference, current, columns, monitoring.tests, monitoring.drift_share, monitoring.false_alarm_rate, nulls)

    folder = report_folder(monitoring, model, end)
    summary = {
        **summary,
        "version": version,
        "status": "checked",
        # "current": the rows tested, a seeded sample of the window's when it holds more (WINDOW_SAMPLE)
        "rows": {"reference": len(reference), "current": len(current), "window": rows},
        "versions_seen": versions,
        **result.summary(),
        "report": str(folder / REPORT_FILE),
    }
    _write_report(folder, result.snapshot, summary)
    log.info(
        "%s drift share %.2f (threshold %.2f): %s; report %s",
        model,
        result.share,
        result.drift_share,
        result.drifted_columns or "no column drifted",
        summary["report"],
    )
    emit(config.metrics, config.identity, "drift", drift_samples(summary))
    return summary


def _write_report(folder: Path, snapshot: Snapshot, summary: Record) -> None:
    """Build the report folder beside, then swap it in (replacing an earlier run of the window)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    snapshot.save_html(str(partial / REPORT_FILE))
    write_json(partial / SUMMARY_FILE, summary)
    if folder.exists():
        replaced = folder.with_name(f".{folder.name}.replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(folder, replaced)
        os.rename(partial, folder)
        shutil.rmtree(replaced)
    else:
        os.rename(partial, folder)


def drift_samples(summary: Record) -> list[Sample]:
    """The metric samples of a checked window's ``summary``: share, verdict, rows, per-column tests."""
    samples = [
        Sample("flywheel_drift_share", "Share of monitored columns that drifted in the latest window.", summary["share"]),
        Sample("flywheel_drift_detected", "1 if the latest window's drifted share passed monitoring.drift_share.", float(summary["dataset_drift"])),
        Sample("flywheel_drift_window_rows", "Requests in the latest checked window.", float(summary["rows"]["current"])),
        Sample("flywheel_drift_window_end_timestamp_seconds", "End of the latest checked window.", datetime.fromisoformat(summary["window"]["end"]).timestamp()),
    ]
    rate = summary["false_alarm_rate"]
    for column in summary["columns"]:
        labels = {"column": column["column"], "method": column["method"]}
        if column["score"] is not None:  # None: no usable value in the window
            samples.append(Sample("flywheel_drift_column_score", "Drift score of a column in the latest window (see the method).", column["score"], labels))
        if column["threshold"] is not None:
            samples.append(Sample("flywheel_drift_column_threshold", "Score above which the column drifts at the latest window's size.", column["threshold"], labels))
        samples.append(Sample("flywheel_drift_column_drifted", "1 if the column drifted in the latest window.", float(column["drifted"]), labels))
        if column["p_value"] is not None:
            samples.append(Sample("flywheel_drift_column_p_value", "The column's p-value in the latest window (both of its tests).", column["p_value"], labels))
        samples.append(Sample("flywheel_drift_column_missing_share", "Share of missing or non-finite values of the column in the latest window.", column["missing_share"], labels))
        samples.append(
            Sample(
                "flywheel_drift_column_missing_rise",
                "1 if the column's missing or non-finite share rose beyond chance over the reference's in the latest window.",
                float(2 * column["missing_p_value"] <= rate),
                labels,
            )
        )
    return samples


def recent_reports(monitoring: MonitoringConfig, model: str, limit: int = 50) -> list[Record]:
    """Summaries of the latest ``limit`` checked windows of Triton's ``model``, newest first."""
    root = reports_root(monitoring, model)
    if not root.is_dir():
        return []
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
    return [read_json(p / SUMMARY_FILE) for p in folders[:limit] if (p / SUMMARY_FILE).exists()]
