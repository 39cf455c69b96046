"""Seeded samples of parquet data too large to read whole: which rows (``positions``), then only
those rows, read a row group or record batch at a time (``take``, ``read_sample``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def positions(rows: int, at_most: int, seed: int) -> npt.NDArray[np.int64] | None:
    """``at_most`` distinct row positions of ``rows``, ascending, drawn uniformly with ``seed``
    (numpy ``Generator.choice`` without replacement); None when ``rows <= at_most`` (every row)."""
    if rows <= at_most:
        return None
    return np.sort(np.random.default_rng(seed).choice(rows, size=at_most, replace=False)).astype(np.int64)


def take(batches: Iterable[pa.RecordBatch], keep: npt.NDArray[np.int64] | None) -> pa.Table | None:
    """The rows at positions ``keep`` (ascending; None: all) of the stream ``batches``, holding
    one batch at a time beside what is kept. None for an empty stream."""
    kept: list[pa.RecordBatch] = []
    start = 0
    for batch in batches:
        if keep is None:
            kept.append(batch)
        else:
            lo, hi = np.searchsorted(keep, [start, start + batch.num_rows])
            if hi > lo:
                kept.append(batch.take(pa.array(keep[lo:hi] - start)))
        start += batch.num_rows
    return pa.Table.from_batches(kept) if kept else None


def read_sample(path: Path, columns: list[str], at_most: int, seed: int) -> pd.DataFrame:
    """``columns`` of the parquet file ``path``: every row when it has at most ``at_most``,
    else a seeded uniform sample of ``at_most`` rows in file order (``positions``)."""
    file = pq.ParquetFile(path)
    keep = positions(file.metadata.num_rows, at_most, seed)
    table = take(file.iter_batches(columns=columns), keep)
    return table.to_pandas() if table is not None else pd.read_parquet(path, columns=columns)
