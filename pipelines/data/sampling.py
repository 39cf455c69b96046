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

SAMPLE_BLOCK = 1 << 20  # positions per block when drawing a sample (see sample_positions)


def sample_positions(population: int, size: int, seed: int) -> npt.NDArray[np.int64]:
    """``size`` distinct positions of ``range(population)``, uniformly without replacement,
    seeded, sorted ascending: int64, shape (size,). Memory is O(size + SAMPLE_BLOCK), not
    O(population): ``Generator.choice(population, size, replace=False)`` permutes the whole
    population once ``size`` exceeds a fiftieth of it (800 MB at 100M). The positions are drawn
    block by block: how many fall in a block is hypergeometric given the rest, which ones is a
    uniform choice inside it. ``ValueError`` when ``size`` exceeds ``population``, or from
    numpy past 10⁹ positions."""
    if not 0 <= size <= population:
        raise ValueError(f"cannot draw {size} distinct positions out of {population}")
    rng = np.random.default_rng(seed)
    picked, done = np.empty(size, "int64"), 0
    for start in range(0, population, SAMPLE_BLOCK):
        block = min(SAMPLE_BLOCK, population - start)
        rest, left = population - start - block, size - done
        take = int(rng.hypergeometric(block, rest, left)) if rest and left else left
        picked[done : done + take] = start + np.sort(rng.choice(block, take, replace=False))
        done += take
    return picked


def positions(rows: int, at_most: int, seed: int) -> npt.NDArray[np.int64] | None:
    """``sample_positions(rows, at_most, seed)``, or None when ``rows <= at_most`` (every row)."""
    return None if rows <= at_most else sample_positions(rows, at_most, seed)


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
