"""The raw data of a tabular project: a directory of parquet parts, one per accepted batch.

``dataset.raw_path`` (``data/<project>/raw/``) holds ``<batch>.parquet`` for every batch in the
raw data, ``<batch>`` being its archived file name (the ``BATCH`` column of every row says the
same). DVC tracks the directory as the split stage's input, so a data version is still the
directory's hash. Nothing reads the whole history into memory:

* ingesting a batch writes its part, then finds the ids it re-sends with an anti-join that reads
  only the id column of the other parts (DuckDB, which reads parquet column by column and spills
  to disk past ``MEMORY_LIMIT``), and rewrites only the parts that held them, without those rows:
  a re-sent row replaces the older copy;
* taking a batch back deletes its part; counting rows reads the parts' footers only.

DuckDB rather than Polars: it is already the engine of the feedback join, its SQL states the
anti-join and the split plainly, and its memory limit holds across joins, sorts and window cuts.

Raw data written by older versions as one ``raw.parquet`` file is cut into parts the first time
it is used (``migrate_legacy``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import BATCH, ROW_ID, DatasetConfig, FeatureType
from pipelines.data.schema import typed
from pipelines.errors import NotRetryable

PART_SUFFIX = ".parquet"
UNBATCHED = "unbatched"  # legacy rows ingested before rows carried their batch
MEMORY_LIMIT = "1GB"  # DuckDB's working memory in a data step; beyond it, it spills to disk
ROW_GROUP_ROWS = 100_000  # rows per parquet row group written by the data steps


def row_ids(rows: pd.DataFrame) -> pd.Series:
    """A stable id per row for a dataset without an id column: a hash of the row's values
    (pandas' ``hash_pandas_object``), so an identical row sent again replaces itself."""
    return pd.Series(pd.util.hash_pandas_object(rows, index=False).to_numpy().view("int64"), index=rows.index, name=ROW_ID)


def part_path(dataset: DatasetConfig, batch: str) -> Path:
    """The part holding the rows of ``batch`` (its archived file name)."""
    return dataset.raw_path / f"{batch}{PART_SUFFIX}"


def parts(dataset: DatasetConfig) -> list[Path]:
    """Every part of the raw data, by name; files being written (``.<name>.partial``) are not parts."""
    folder = dataset.raw_path
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(PART_SUFFIX) and not p.name.startswith("."))


def rows(dataset: DatasetConfig) -> int:
    """Rows of the raw data, from the parts' footers; 0 before the first batch."""
    return sum(batch_rows(dataset).values())


def batch_rows(dataset: DatasetConfig) -> dict[str, int]:
    """Rows in the raw data of each batch (its archived name), from the parts' footers."""
    return {p.name.removesuffix(PART_SUFFIX): int(pq.ParquetFile(p).metadata.num_rows) for p in parts(dataset)}


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def relation(files: list[Path]) -> str:
    """DuckDB's table expression over parquet ``files``: columns matched by name, a column a
    part lacks read as NULL, a column typed differently across parts (an integer label beside a
    part with blanks, typed float) widened as pandas' concat widens it."""
    listed = ", ".join(sql_literal(str(f)) for f in files)
    return f"read_parquet([{listed}], union_by_name = true)"


@contextmanager
def connect(dataset: DatasetConfig) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB in UTC (timestamps come back as the raw data holds them), limited to
    ``MEMORY_LIMIT``, spilling into ``<data_dir>/.duckdb/``
    (outside the raw data and the split, so DVC never sees it)."""
    spill = dataset.raw_path.parent / ".duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "temp_directory": str(spill), "preserve_insertion_order": False})
    con.sql("SET TimeZone = 'UTC'")
    try:
        yield con
    finally:
        con.close()


def read(dataset: DatasetConfig, columns: list[str] | None = None) -> pd.DataFrame:
    """The raw data (or ``columns`` of it) as one frame, ordered by time (if any) and id. For
    small data and tests: the data steps stream instead."""
    files = parts(dataset)
    if not files:
        return pd.DataFrame(columns=columns or [])
    with connect(dataset) as con:
        order = ", ".join(f'"{c}"' for c in (dataset.time_column, dataset.key) if c and (columns is None or c in columns))
        chosen = ", ".join(f'"{c}"' for c in columns) if columns else "*"
        table = con.sql(f"SELECT {chosen} FROM {relation(files)}{f' ORDER BY {order}' if order else ''}").to_arrow_table()
    return as_frame(table)


def as_frame(table: pa.Table) -> pd.DataFrame:
    """A DuckDB result as the raw data's pandas types (nanosecond UTC timestamps, as ingestion writes them)."""
    frame = table.to_pandas()
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.DatetimeTZDtype):
            frame[column] = frame[column].dt.as_unit("ns").dt.tz_convert("UTC")
    return frame


def schema_of(frame: pd.DataFrame, dataset: DatasetConfig) -> pa.Schema:
    """The arrow schema a part is written with: pandas' own, except that a categorical column
    is text even when a batch holds no value of it (pandas would write a null-typed column)."""
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    text = {*dataset.columns_of(FeatureType.categorical), BATCH}
    for i, field in enumerate(schema):
        if field.name in text and pa.types.is_null(field.type):
            schema = schema.set(i, pa.field(field.name, pa.string()))
    return schema


def write_part(path: Path, frame: pd.DataFrame, dataset: DatasetConfig) -> None:
    """Write ``frame`` as the part at ``path`` atomically (``.<name>.partial`` then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    table = pa.Table.from_pandas(frame, schema=schema_of(frame, dataset), preserve_index=False)
    pq.write_table(table, partial, row_group_size=ROW_GROUP_ROWS)
    os.replace(partial, path)


def append(dataset: DatasetConfig, frame: pd.DataFrame, batch: str) -> int:
    """Add a typed batch (``schema.typed``, with ``BATCH`` and, without an id column, ``ROW_ID``)
    as the part of ``batch``; the ids it re-sends leave the parts that held them (newer copies
    win, and within the batch its last copy). Returns the raw data's rows.

    Crash-safe in this order: the new part is written first, then the older copies removed; a
    rerun of the same batch (it is still in landing) rewrites its part and finishes the removal."""
    key = dataset.key
    order = [c for c in (dataset.time_column, key) if c]
    frame = frame.drop_duplicates(subset=[key], keep="last").sort_values(order, kind="stable").reset_index(drop=True)
    target = part_path(dataset, batch)
    write_part(target, frame, dataset)
    others = [p for p in parts(dataset) if p != target]
    if others:
        with connect(dataset) as con:
            con.register("batch_ids", pa.table({"id": pa.array(frame[key])}))
            # Only the id column of history is read: the parts that hold an id this batch re-sends.
            holders = con.sql(
                f'SELECT DISTINCT filename FROM read_parquet([{", ".join(sql_literal(str(f)) for f in others)}], '
                f'filename = true, union_by_name = true) AS raw SEMI JOIN batch_ids ON raw."{key}" = batch_ids.id'
            ).fetchall()
        resent = set(frame[key])
        for (filename,) in holders:
            part = Path(filename)
            kept = pd.read_parquet(part)
            kept = kept[~kept[key].isin(resent)]
            if kept.empty:
                part.unlink()
            else:
                write_part(part, kept, dataset)
    return rows(dataset)


def remove(dataset: DatasetConfig, batch: str) -> int:
    """Take ``batch``'s rows out of the raw data (its part); returns how many there were (0: none)."""
    path = part_path(dataset, batch)
    if not path.exists():
        return 0
    count = int(pq.ParquetFile(path).metadata.num_rows)
    path.unlink()
    return count


def legacy_file(dataset: DatasetConfig) -> Path | None:
    """Raw data in the single-file layout of older versions: ``raw_path`` itself, or the old
    default ``raw.parquet`` beside the ``raw/`` directory; None when there is none."""
    path = dataset.raw_path
    # The hidden copy: a crash came between setting the file aside and swapping the parts in.
    for candidate in (path, path.with_name(path.name + PART_SUFFIX), path.with_name(f".{path.name}.legacy")):
        if candidate.is_file():
            return candidate
    return None


def migrate_legacy(dataset: DatasetConfig) -> None:
    """Cut a legacy single-file raw dataset into one part per batch (rows ingested before rows
    carried their batch go to ``unbatched.parquet``), typed as ingestion types rows now; the
    parts are written beside, then swapped in, so a crash leaves the legacy file in place. Run
    by the writers of the raw data (ingestion, the split, a revert), holding the data lock."""
    legacy = legacy_file(dataset)
    if legacy is None:
        return
    if legacy != dataset.raw_path and dataset.raw_path.is_dir():  # swapped in before a crash: only the unlink was left
        legacy.unlink()
        return
    raw = _typed_legacy(pd.read_parquet(legacy), dataset)
    staging = dataset.raw_path.with_name(f".{dataset.raw_path.name}.migrating")
    shutil.rmtree(staging, ignore_errors=True)
    batches = raw[BATCH].fillna(UNBATCHED) if BATCH in raw.columns else pd.Series(UNBATCHED, index=raw.index)
    for name, rows_of in raw.groupby(batches, sort=True):
        write_part(staging / f"{name}{PART_SUFFIX}", rows_of.assign(**{BATCH: None if name == UNBATCHED else name}), dataset)
    if legacy == dataset.raw_path:
        legacy = legacy.rename(legacy.with_name(f".{legacy.name}.legacy"))
    os.replace(staging, dataset.raw_path)
    legacy.unlink()


def _typed_legacy(raw: pd.DataFrame, dataset: DatasetConfig) -> pd.DataFrame:
    """Legacy raw data as ``schema.typed`` types rows now: unchanged if it already is, else typed
    once (derived row ids hashed again from the typed values, as a re-sent row's will be)."""
    time, numeric = dataset.time_column, dataset.columns_of(FeatureType.numeric)
    if (time is None or isinstance(raw[time].dtype, pd.DatetimeTZDtype)) and all(raw[c].dtype == "float64" for c in numeric):
        return raw
    rows, problems = typed(raw[dataset.columns], dataset)
    if problems:
        raise NotRetryable(f"{dataset.raw_path}: the raw data holds values that do not parse: {'; '.join(problems)}")
    if dataset.id_column is None:
        rows = rows.assign(**{ROW_ID: row_ids(rows)})
    return rows.assign(**{BATCH: raw[BATCH] if BATCH in raw.columns else None})


def require(dataset: DatasetConfig) -> list[Path]:
    """The parts; ``FileNotFoundError`` naming the raw data's place when nothing was ingested yet."""
    found = parts(dataset)
    if not found:
        raise FileNotFoundError(f"{dataset.raw_path}: no raw dataset yet; land a batch and let the validate task ingest it")
    return found

