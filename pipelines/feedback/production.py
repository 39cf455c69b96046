"""Labelled production rows become training data: a window of them lands as a training batch.

The rows the served model answered in ``[start, end)`` whose ground truth has come back (the
labelled rows of ``pipelines.feedback.labels``) are written to the dataset's landing folder as
one parquet batch, ``production-<start>-<end>.parquet`` (times as ``%Y%m%dT%H%MZ``, UTC), with the
project's columns only. From there the batch goes the way of every batch: the retrain DAG's
``validate`` (the same suite, the same quarantine, the label check), then the raw data, keyed
by the request's id, so the next retrain learns from what the model served and what happened.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import FeatureType, ProjectConfig
from pipelines.lineage import Record

log = logging.getLogger(__name__)
PREFIX = "production"
NAME_TIME = "%Y%m%dT%H%MZ"
ISO_UTC = "%Y-%m-%dT%H:%M:%S.%fZ"  # microseconds, as served_at is logged


def batch_name(start: datetime, end: datetime) -> str:
    """The landed name of the window ``[start, end)``'s batch."""
    return f"{PREFIX}-{_utc(start).strftime(NAME_TIME)}-{_utc(end).strftime(NAME_TIME)}.parquet"


def _utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive one is taken as UTC already (as ``schema.parse_times`` does)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def as_batch(config: ProjectConfig, labelled: pd.DataFrame, integer_ids: bool = False) -> pd.DataFrame:
    """Labelled rows (the inference log's columns, the ground truth in the label column) as a
    batch of the project's columns, in its order (``dataset.columns``):

    * the id column <- ``request_id``: as int64 where the raw data's ids are integers
      (``integer_ids``; rows whose key is not a whole number, a key the server made or a
      ``<id>/<i>``, cannot be a row of such data and are left out: ``not_row_ids``), else as text;
      no id column: none;
    * the time column <- ``served_at``, as ISO 8601 UTC text (``2013-07-01T10:00:00.000000Z``);
    * the features as the model received them. Triton received numbers as FP32: each is widened
      through its shortest decimal (0.1f is 0.1, not 0.10000000149), and a numeric column whose
      values are all whole numbers, without a blank, is written as int64 (the suites type the
      flights' ``month``, ``day``, ... as int64), any other as float64. Categories stay text;
    * the label column <- the ground truth, by the same rule (a classifier's 0/1 as int64).

    A request id labelled twice keeps its newest label (``observed_at``)."""
    dataset = config.dataset
    rows = labelled.sort_values("observed_at", kind="stable") if "observed_at" in labelled else labelled
    rows = rows.drop_duplicates(subset=["request_id"], keep="last").sort_values(["served_at", "request_id"], kind="stable")
    if dataset.id_column and integer_ids:
        rows = rows[~not_row_ids(rows["request_id"])]
    out = pd.DataFrame(index=rows.index)
    if dataset.id_column:
        out[dataset.id_column] = rows["request_id"].astype("int64") if integer_ids else rows["request_id"].astype(str)
    if dataset.time_column:
        out[dataset.time_column] = pd.to_datetime(rows["served_at"], utc=True).dt.strftime(ISO_UTC)
    for feature in dataset.features:
        values = rows[feature.name]
        out[feature.name] = _number(values) if feature.type == FeatureType.numeric else values.astype(object)
    out[dataset.label.column] = _number(rows[dataset.label.column])
    return out.reset_index(drop=True)


def not_row_ids(keys: pd.Series) -> pd.Series:
    """Which request keys are not whole numbers, so cannot be the row id of data whose ids are integers."""
    return ~keys.astype(str).str.fullmatch(r"-?\d{1,18}")


def _integer_ids(config: ProjectConfig) -> bool:
    """Whether the raw data's id column holds integers (False before any raw data, or without an id column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data import raw

    dataset = config.dataset
    parts = raw.parts(dataset)
    if not dataset.id_column or not parts:
        return False
    schema = pq.read_schema(parts[-1])  # every part types its ids alike: ingestion types them
    return dataset.id_column in schema.names and pa.types.is_integer(schema.field(dataset.id_column).type)


def _number(values: pd.Series) -> pd.Series:
    """Numbers as a batch carries them: int64 where every value is a whole number (no blank),
    else float64; a float32 value widened through its shortest decimal, not its binary expansion."""
    if values.dtype == np.float32:
        values = values.astype(str).astype("float64")  # np.float32's str is the shortest decimal that round-trips
    numbers = pd.to_numeric(values).astype("float64")
    whole = numbers.notna().all() and bool(np.all(np.mod(numbers.to_numpy(), 1) == 0))
    return numbers.astype("int64") if whole else numbers


def _reason_not_to_land(config: ProjectConfig, name: str, rows: int) -> str | None:
    """Why the window's batch ``name`` of ``rows`` labelled rows is not landed again, or None:
    held for review; ingested before (reverted, or holding as many rows as there are now: more
    labels since land again, and the raw data replaces the older copies of their ids)."""
    from pipelines.data.batches import held_batches, list_batches

    held = held_batches(config)
    if name in held:
        return f"{name} is held for review in {held[name]['quarantine']}: confirm it (retrain Param confirm_batches) or leave it there"
    copies = [b for b in list_batches(config) if b["source"] == name and b["status"] != "held"]
    if copies:
        last = copies[-1]
        if last["status"] == "reverted":
            return f"{name} was ingested as {last['batch']}, then reverted ({last.get('reason')}); it is not landed again"
        if last["rows_ingested"] >= rows:
            return f"{name} was ingested as {last['batch']} with {last['rows_ingested']:,} rows; the window has no more labelled rows since"
        return None
    if (config.dataset.archive_dir / name).exists():
        return f"{name} is in the archive {config.dataset.archive_dir}: it was ingested"
    return None


def land_labelled(config: ProjectConfig, start: datetime, end: datetime) -> Record:
    """Land the labelled rows served in ``[start, end)`` as the training batch
    ``production-<start>-<end>.parquet`` in ``dataset.landing_dir`` (columns: ``as_batch``),
    written as ``.partial`` then renamed (``pipelines.data.ingest.land_file``), so ingestion
    never reads half of it. Returns ``batch`` (its name), ``rows``, ``landed`` (bool),
    ``reason`` where nothing landed, and ``not_row_ids``: labelled rows left out because their
    key cannot be a row id of the raw data (``as_batch``; they still count for performance).

    Idempotent: the same window again gives the same name, and replaces the copy in landing
    while it waits there. Once ingested it is not landed again unless the window got more
    labels since (then the new copy replaces the older rows by id); one held for review, or
    taken back (``revert``), is left as it is. No labelled rows in the window: no file.
    ``ValueError`` when ``end`` is not after ``start``."""
    from pipelines.data.ingest import land_file
    from pipelines.feedback.labels import read_labelled

    start, end = _utc(start), _utc(end)
    if end <= start:
        raise ValueError(f"project {config.name}: the window [{start.isoformat()}, {end.isoformat()}) is empty: end must be after start")
    name = batch_name(start, end)
    labelled = read_labelled(config, start, end)
    if labelled.empty:
        empty = f"no labelled rows served in [{start.isoformat()}, {end.isoformat()}) in {config.feedback.labelled_dir}"
        log.info("%s: %s", name, empty)
        return {"batch": name, "rows": 0, "landed": False, "reason": empty}
    integer_ids = _integer_ids(config)
    batch = as_batch(config, labelled, integer_ids)
    left_out = int(not_row_ids(labelled["request_id"]).sum()) if integer_ids else 0
    if left_out:
        log.warning(
            "%s: %d labelled rows left out: their request ids (e.g. %s) are not whole numbers like the ids of %s; "
            "a client that sends a row's own id as the request id, one row a request, makes its rows trainable",
            name, left_out, labelled["request_id"][not_row_ids(labelled["request_id"])].head(3).tolist(), config.dataset.raw_path,
        )
    if batch.empty:
        return {"batch": name, "rows": 0, "landed": False, "reason": f"none of the {len(labelled)} labelled rows has a request id that can be a row id", "not_row_ids": left_out}
    reason = _reason_not_to_land(config, name, len(batch))
    if reason is not None:
        log.info("%s: not landed: %s", name, reason)
        return {"batch": name, "rows": len(batch), "landed": False, "reason": reason, "not_row_ids": left_out}
    with tempfile.TemporaryDirectory(prefix="flywheel-production-") as scratch:
        written = Path(scratch) / name
        batch.to_parquet(written, index=False)
        landed = land_file(config.dataset, written)
    log.info("%s: %d labelled production rows landed in %s", name, len(batch), landed.parent)
    return {"batch": name, "rows": len(batch), "landed": True, "reason": None, "not_row_ids": left_out}
