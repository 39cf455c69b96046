"""Labelled production rows land as a training batch: the project's columns, the request ids as
ids, the serving times as times, numbers typed as the suite wants them; the batch passes the
flights suite and joins the raw data; landing a window again is idempotent. The labelled rows
are written here in the layout of ``pipelines.feedback.labels``, from real flights."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import BATCH, FeatureType, ProjectConfig
from pipelines.data.batches import record
from pipelines.data.ingest import ingest_landing
from pipelines.data.replay import month_batch
from pipelines.feedback.production import as_batch, batch_name, land_labelled

DAY = datetime(2026, 7, 1, tzinfo=timezone.utc)
NEXT = DAY + timedelta(days=1)


def label_rows(config: ProjectConfig, flights: pd.DataFrame, served_at: pd.Series, part: str = "part-0", ids: list[str] | None = None) -> None:
    """Write ``flights`` as labelled production rows (``feedback.labelled_dir/date=.../<part>.parquet``):
    the features as Triton received them (numbers float32), the served answer, the request id
    (the flight's id), the serving time, and the ground truth (float64) in the label column."""
    dataset = config.dataset
    columns: dict[str, pa.Array] = {}
    for feature in dataset.features:
        values = flights[feature.name]
        columns[feature.name] = pa.array(values.astype(str) if feature.type == FeatureType.categorical else values.astype("float32"))
    prediction = np.random.default_rng(len(flights)).uniform(0, 1, len(flights)).astype("float32")
    columns |= {
        "prediction": pa.array(prediction),
        "label": pa.array((prediction > 0.3).astype("int32")),
        "request_id": pa.array(ids if ids is not None else flights["flight_id"].astype(str), pa.string()),
        "model": pa.array([config.served_model] * len(flights)),
        "model_version": pa.array(np.ones(len(flights), dtype="int64")),
        "served_at": pa.array(served_at, pa.timestamp("us", tz="UTC")),
        "latency_ms": pa.array(np.full(len(flights), 1.5)),
        dataset.label.column: pa.array(flights[dataset.label.column].astype("float64")),
        "observed_at": pa.array(served_at + pd.Timedelta(hours=30), pa.timestamp("us", tz="UTC")),
        "feedback_file": pa.array(["labels.csv"] * len(flights)),
    }
    table = pa.table(columns)
    days = served_at.dt.strftime("%Y-%m-%d").to_numpy()
    for day in sorted(set(days)):
        folder = config.feedback.labelled_dir / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(pa.array(days == day)), folder / f"{part}.parquet")


def served_over(flights: pd.DataFrame, start: datetime, hours: float) -> pd.Series:
    """Serving times spread evenly over ``hours`` from ``start``, with microseconds."""
    seconds = np.linspace(0, hours * 3600 - 1, len(flights)).astype("int64")
    offsets = pd.to_timedelta(seconds, unit="s") + pd.Timedelta(microseconds=123)
    return pd.Series(pd.Timestamp(start) + offsets, index=flights.index)


@pytest.fixture
def july(project):
    """300 July flights served on July 1st (2026) and 100 on the 2nd, all labelled."""
    first, second = month_batch("2013-07", rows=300, seed=1), month_batch("2013-08", rows=100, seed=1)
    label_rows(project, first, served_over(first, DAY, 24), "part-a")
    label_rows(project, second, served_over(second, NEXT, 24), "part-b")
    return project, first, second


def test_a_window_lands_with_the_projects_columns_and_passes_the_suite_into_the_raw_data(july):
    config, first, _ = july

    # When the window of July 1st is landed
    result = land_labelled(config, DAY, NEXT)

    # Then one parquet batch named after the window holds that day's rows, the project's columns only
    name = "production-20260701T0000Z-20260702T0000Z.parquet"
    assert result == {"batch": name, "rows": 300, "landed": True, "reason": None, "not_row_ids": 0}
    assert sorted(p.name for p in config.dataset.landing_dir.iterdir()) == [name]  # no .partial left
    batch = pd.read_parquet(config.dataset.landing_dir / name)
    assert list(batch.columns) == config.dataset.columns
    # ids are the request ids, times the serving times as ISO 8601 UTC text
    assert sorted(batch["flight_id"].astype(int)) == sorted(first["flight_id"])
    assert batch["time_hour"].iloc[0] == "2026-07-01T00:00:00.000123Z"
    assert (pd.to_datetime(batch["time_hour"]) >= DAY).all() and (pd.to_datetime(batch["time_hour"]) < NEXT).all()
    # numbers Triton got as FP32 come back whole where they are, as the suite types them; the label too
    for column in ("month", "day", "hour", "minute", "sched_dep_time", "sched_arr_time", "distance", "arr_delayed"):
        assert batch[column].dtype == "int64", column
    by_id = batch.set_index(batch["flight_id"].astype(int)).sort_index()
    expected = first.set_index("flight_id").sort_index()
    assert (by_id["distance"] == expected["distance"]).all() and (by_id["arr_delayed"] == expected["arr_delayed"]).all()
    assert (by_id["carrier"] == expected["carrier"]).all()

    # When the retrain's validate ingests it: it passes the flights suite and joins the raw data with its ids
    summary = ingest_landing(config)

    assert summary["passed"] == [name] and summary["rows_ingested"] == 300
    raw = pd.read_parquet(config.dataset.raw_path).set_index("flight_id").sort_index()
    assert list(raw.index) == sorted(first["flight_id"]) and raw[BATCH].eq(name).all()
    assert (raw["arr_delayed"] == expected["arr_delayed"]).all()
    assert str(raw["time_hour"].dtype) == "datetime64[ns, UTC]" and raw["time_hour"].min() == pd.Timestamp(DAY) + pd.Timedelta(microseconds=123)


def test_keys_that_cannot_be_row_ids_are_left_out_where_the_ids_are_integers(july):
    config, _, second = july
    land_labelled(config, DAY, NEXT)
    ingest_landing(config)  # the raw data's flight_id is int64 now
    # Given, beside the 100 flights keyed by their ids, three answered to clients that sent no
    # usable row id (a curl request's own id, row 0 of a batched request, a key Triton made)
    strays = month_batch("2013-09", rows=3, seed=2)
    label_rows(config, strays, served_over(strays, NEXT, 1), "part-c", ids=["curl-1", "svc-7/0", "9f2c4e0a5b6d4c3e8f1a2b3c4d5e6f70"])

    # When the window of July 2nd lands
    result = land_labelled(config, NEXT, NEXT + timedelta(days=1))

    # Then the three are left out (counted), the rest land with integer ids and pass the suite
    assert (result["rows"], result["not_row_ids"], result["landed"]) == (100, 3, True)
    batch = pd.read_parquet(config.dataset.landing_dir / result["batch"])
    assert batch["flight_id"].dtype == "int64" and sorted(batch["flight_id"]) == sorted(second["flight_id"])
    assert ingest_landing(config)["passed"] == [result["batch"]]


def test_numbers_with_decimals_stay_float64_as_they_were_sent(project):
    flights = month_batch("2013-07", rows=5)
    labelled = flights.assign(
        request_id=flights["flight_id"].astype(str),
        served_at=pd.Timestamp(DAY),
        distance=np.array([0.1, 1400, 2.5, 17, 1], dtype="float32"),  # one decimal makes the column float64
        hour=np.array([5, 6, np.nan, 8, 9], dtype="float32"),  # a blank too
    )

    batch = as_batch(project, labelled)

    assert batch["distance"].dtype == "float64" and batch["distance"].tolist() == [0.1, 1400, 2.5, 17, 1]  # 0.1f is 0.1, not 0.10000000149
    assert batch["hour"].dtype == "float64" and batch["hour"].isna().sum() == 1
    assert batch["minute"].dtype == "int64" and batch["arr_delayed"].dtype == "int64"


def test_landing_a_window_again_is_idempotent_and_more_labels_land_again(july):
    config, first, _ = july
    name = batch_name(DAY, NEXT)

    # The same window twice before ingestion: the same file, replaced
    assert land_labelled(config, DAY, NEXT)["landed"] and land_labelled(config, DAY, NEXT)["landed"]
    assert sorted(p.name for p in config.dataset.landing_dir.iterdir()) == [name]

    # Once ingested, the same window again lands nothing and says why
    ingest_landing(config)
    again = land_labelled(config, DAY, NEXT)
    assert again == {
        "batch": name, "rows": 300, "landed": False, "reason": f"{name} was ingested as {name} with 300 rows; the window has no more labelled rows since", "not_row_ids": 0,
    }
    assert list(config.dataset.landing_dir.iterdir()) == []

    # Labels that come later for the same window land it again; the raw data keeps each flight once
    late = month_batch("2013-09", rows=50, seed=2)
    label_rows(config, late, served_over(late, DAY + timedelta(hours=1), 2), "part-late")
    assert land_labelled(config, DAY, NEXT) == {"batch": name, "rows": 350, "landed": True, "reason": None, "not_row_ids": 0}
    ingest_landing(config)
    raw = pd.read_parquet(config.dataset.raw_path)
    assert len(raw) == 350 and raw["flight_id"].is_unique and set(raw[BATCH]) == {f"{name.removesuffix('.parquet')}.2.parquet"}


def test_a_window_held_for_review_is_not_landed_again(july):
    config, *_ = july
    name = batch_name(DAY, NEXT)
    record(config, "held", batch=name, rows=300, quarantine="quarantine/flights/production-x", label_check={"status": "held"})

    result = land_labelled(config, DAY, NEXT)

    assert not result["landed"] and result["reason"].startswith(f"{name} is held for review in quarantine/flights/production-x")
    assert not config.dataset.landing_dir.exists() or list(config.dataset.landing_dir.iterdir()) == []


def test_a_window_without_labelled_rows_lands_no_file(project):
    result = land_labelled(project, DAY, NEXT)

    assert result["rows"] == 0 and not result["landed"] and result["reason"].startswith("no labelled rows served in [2026-07-01T00:00:00+00:00")
    assert not project.dataset.landing_dir.exists()


def test_an_empty_window_is_refused(project):
    with pytest.raises(ValueError, match="the window .* is empty: end must be after start"):
        land_labelled(project, NEXT, DAY)
