"""The DVC ``split`` stage: cut the raw dataset into train/val/test, in bounded memory.

With a time column the cut is by time, not at random: every test row is later than every
training row, as it is for the model in service, so the test score is not flattered by
leakage from the future. Without one the split is a seeded hash of each row's id: stable (a
row keeps its part as the data grows) but with no guarantee against time leakage, since
rows of the same period land on both sides. With ``split.window`` ("12 months") only the rows
that recent, back from the newest time in the raw data, are split: the rest are in no part, so
a nightly retrain costs the same however long the history grows.

The raw data's parquet parts (``pipelines.data.raw``) are never read whole into memory. DuckDB
(its memory limit ``raw.MEMORY_LIMIT``, spilling to disk past it) counts the rows, finds the two
cut times, and streams each part ordered by (time, id) in record batches into one parquet file
per part (row groups of ``raw.ROW_GROUP_ROWS``); the hash split hashes the ids batch by batch,
writes each row to its part, then orders each part by id out of core. The parts hold exactly the
rows and column types the old in-memory split gave (``bench/inmemory.py``: pandas' concat of the
parts, the ``BATCH`` column dropped, timestamps in ns UTC). With ``data.engine: spark`` Spark SQL
writes the same files (``pipelines.data.spark``). Run by ``dvc repro`` (see ``dvc.yaml``) as
``python -m pipelines.data.split --home <home> --project <name>`` in the project's DVC repository.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import BATCH, DataConfig, DataEngine, DatasetConfig, SplitConfig, load_config
from pipelines.data import raw
from pipelines.errors import NotRetryable
from pipelines.lineage import Record, write_json

PARTS = ("train", "val", "test")
# A time bound is handed to DuckDB as ISO text cast to its nanosecond type: a Python datetime
# parameter would drop the nanoseconds, and the cut must be exact.
TIME_PARAMETER = "CAST(? AS TIMESTAMPTZ_NS)"


class LabelCoverageError(NotRetryable, ValueError):
    """A class label the model would be evaluated on without ever training on it, or a training
    split with fewer than two labels: no retry changes the data, so training does not start."""


def label_counts(path: Path, label: str) -> Counter[str]:
    """Rows of each class label (as text) in the parquet file ``path``, read a row group at a
    time, the label column only; rows without a label are not counted."""
    import pyarrow.compute as pc

    counts: Counter[str] = Counter()
    file = pq.ParquetFile(path)
    for group in range(file.num_row_groups):
        for entry in pc.value_counts(file.read_row_group(group, columns=[label]).column(0).drop_null()).to_pylist():
            counts[str(entry["values"])] += entry["counts"]
    return counts


def check_label_coverage(counts: Mapping[str, Counter[str]], what: str) -> None:
    """``counts``: the records of each class label (as text), by split (train, val, test), of
    ``what`` (a dataset's name). ``LabelCoverageError`` naming every label without training
    records and its count per split, or when training would see fewer than two labels."""
    every = sorted(set().union(*counts.values()))
    unseen = [label for label in every if not counts.get("train", Counter())[label]]
    problems = [
        f"label {label!r} has no training records ({', '.join(f'{part} {counts[part][label]}' for part in counts)})" for label in unseen
    ]
    if len(every) - len(unseen) < 2:
        problems.append(f"the train split holds {len(every) - len(unseen)} label(s); a classifier needs at least two")
    if problems:
        raise LabelCoverageError(f"{what}: {'; '.join(problems)}. Land more records of each label (or drop the rare one) and run again")


def split_paths(output_dir: Path) -> dict[str, Path]:
    """The parquet file of each part (train, val, test) in a split's ``output_dir``."""
    return {part: output_dir / f"{part}.parquet" for part in PARTS}


def quoted(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def window_start(newest: pd.Timestamp, window: tuple[int, str]) -> pd.Timestamp:
    """The oldest time ``split.window`` keeps: ``newest`` minus (count, unit) as pandas'
    ``DateOffset`` counts it in UTC (calendar months and years: 31 March less one month is
    28 February)."""
    count, unit = window
    start: pd.Timestamp = newest.tz_convert("UTC") - pd.DateOffset(**{unit: count})
    return start


def hash_buckets(keys: pd.Series, seed: int) -> np.ndarray:
    """Each key's place in [0, 1): pandas' ``hash_pandas_object`` of the row (key, ``seed``) over
    2**64. Per row, so batches of keys get what the whole column gets; stable across runs (the
    seed is hashed as a second column: a hash_key would not reach integer keys)."""
    hashed = pd.util.hash_pandas_object(pd.DataFrame({"key": keys.to_numpy(), "seed": seed}), index=False)
    buckets: np.ndarray = hashed.to_numpy(np.uint64) / np.float64(2**64)
    return buckets


def stable_schema(schema: pa.Schema) -> pa.Schema:
    """The schema the parts are written with: DuckDB's, timestamps as pandas writes them (ns, UTC)."""
    for i, field in enumerate(schema):
        if pa.types.is_timestamp(field.type):
            schema = schema.set(i, field.with_type(pa.timestamp("ns", tz="UTC" if field.type.tz else None)))
    return schema


def row_groups(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.Table]:
    """``batches`` (DuckDB's are of approximate size) regrouped as tables of ``raw.ROW_GROUP_ROWS``
    rows (the last one shorter), cast to ``schema``."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        while held >= raw.ROW_GROUP_ROWS:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, raw.ROW_GROUP_ROWS).cast(schema)
            rest = table.slice(raw.ROW_GROUP_ROWS)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending).cast(schema)


def write_query(con: duckdb.DuckDBPyConnection, query: str, params: list[object], path: Path) -> None:
    """Stream ``query``'s rows into the parquet file ``path``: written as ``.<name>.partial``
    and renamed, so a crash leaves the previous file or none, never half of one."""
    reader = con.sql(query, params=params).to_arrow_reader(raw.ROW_GROUP_ROWS)
    schema = stable_schema(reader.schema)
    partial = path.with_name(f".{path.name}.partial")
    with pq.ParquetWriter(partial, schema) as writer:
        for table in row_groups(reader, schema):
            writer.write_table(table, row_group_size=raw.ROW_GROUP_ROWS)
    os.replace(partial, path)


def kept_columns(con: duckdb.DuckDBPyConnection, relation: str) -> str:
    """The select list of the raw data's columns but ``BATCH`` (where a row came from is the raw
    data's business; parts written before rows carried it lack it)."""
    return ", ".join(quoted(c) for c in con.sql(f"SELECT * FROM {relation}").columns if c != BATCH)


def split_by_time(con: duckdb.DuckDBPyConnection, dataset: DatasetConfig, split: SplitConfig, files: list[Path], paths: dict[str, Path]) -> None:
    """Cut at two moments so that train < val < test in time; rows of one moment stay together.
    Ordered by (time, id), the cuts are the times at positions ``int(n * train)`` and
    ``min(int(n * (train + val)), n - 1)`` of the ``n`` rows (in the window); rows without a
    time are counted but in no part. ``ValueError`` when a part would be empty."""
    assert dataset.time_column is not None
    time, key, relation = quoted(dataset.time_column), quoted(dataset.key), raw.relation(files)
    window, window_params = "TRUE", []
    if split.window_length is not None:
        newest = newest_time(files, dataset.time_column)
        if newest is None:  # a row group without statistics: read the column
            newest = con.sql(f"SELECT max({time}) FROM {relation}").to_arrow_table().column(0).to_pandas().iloc[0]
        window = f"{time} >= {TIME_PARAMETER}"
        window_params = [None if pd.isna(newest) else window_start(newest, split.window_length).isoformat()]
    ((rows, distinct),) = con.sql(f"SELECT count(*), count(DISTINCT {time}) FROM {relation} WHERE {window}", params=window_params).fetchall()
    train_end, val_end = times_at(
        con, f"SELECT {time} FROM {relation} WHERE {window}", window_params, [int(rows * split.train), min(int(rows * (split.train + split.val)), rows - 1)]
    )
    cuts = {
        "train": (f"{time} < {TIME_PARAMETER}", [train_end]),
        "val": (f"{time} >= {TIME_PARAMETER} AND {time} < {TIME_PARAMETER}", [train_end, val_end]),
        "test": (f"{time} >= {TIME_PARAMETER}", [val_end]),
    }
    counted = ", ".join(f"count(*) FILTER (WHERE {condition})" for condition, _ in cuts.values())
    # The markers in the order the text holds them: the cuts' (in the select list), then the window's.
    sizes = con.sql(f"SELECT {counted} FROM {relation} WHERE {window}", params=[*(p for _, ps in cuts.values() for p in ps), *window_params]).fetchall()[0]
    empty = [name for name, size in zip(PARTS, sizes) if not size]
    if empty:
        within = f" of split.window {split.window!r}" if split.window else ""
        raise ValueError(
            f"cannot cut {rows} rows{within} spanning {distinct} distinct {dataset.time_column} values by time: "
            f"the {'/'.join(empty)} split is empty; land more batches"
        )
    columns = kept_columns(con, relation)
    for name, (condition, params) in cuts.items():
        query = f"SELECT {columns} FROM {relation} WHERE {window} AND {condition} ORDER BY {time}, {key}"
        write_query(con, query, [*window_params, *params], paths[name])


def newest_time(files: list[Path], column: str) -> pd.Timestamp | None:
    """The newest ``column`` value of the parquet ``files`` from their footers' row-group
    statistics, no row read (with it as a bound, DuckDB skips the row groups older than the
    window by the same statistics, so the split reads the window, not the history). None when a
    row group holding the column has no min/max statistics."""
    newest: pd.Timestamp | None = None
    for path in files:
        meta = pq.ParquetFile(path).metadata
        if column not in meta.schema.names:
            continue  # a part without the column: its times are missing
        index = meta.schema.names.index(column)
        for group in range(meta.num_row_groups):
            chunk = meta.row_group(group).column(index)
            stats = chunk.statistics
            if stats is not None and stats.null_count == chunk.num_values:
                continue  # every time of the group is missing
            if stats is None or not stats.has_min_max:
                return None
            value = pd.Timestamp(stats.max)
            newest = value if newest is None or value > newest else newest
    return newest


def times_at(con: duckdb.DuckDBPyConnection, query: str, params: list[object], positions: list[int]) -> list[str | None]:
    """The time at each 0-based position of the first column of ``query`` in time order (missing
    times last), as ISO text for ``TIME_PARAMETER``; None for a missing time or past the end.
    Walks the distinct times and their counts in order (DuckDB sorts them out of core): exact,
    and no more than the distinct times pass through memory, one batch at a time."""
    found: dict[int, str | None] = {}
    seen = 0
    grouped = f"SELECT t, count(*) AS n FROM ({query}) AS rows (t) GROUP BY t ORDER BY t NULLS LAST"
    for batch in con.sql(grouped, params=params).to_arrow_reader(raw.ROW_GROUP_ROWS):
        ends = seen + np.cumsum(batch.column("n").to_numpy())
        for position in positions:
            at = int(np.searchsorted(ends, position, side="right"))
            if position not in found and at < len(ends):
                value = batch.column("t").slice(at, 1).to_pandas().iloc[0]
                found[position] = None if pd.isna(value) else value.isoformat()
        if len(found) == len(positions):
            break
        seen = int(ends[-1]) if len(ends) else seen
    return [found.get(position) for position in positions]


def split_by_hash(con: duckdb.DuckDBPyConnection, dataset: DatasetConfig, split: SplitConfig, files: list[Path], paths: dict[str, Path]) -> None:
    """Each row to train, val or test by a seeded hash of its id (``hash_buckets``): the same
    row always lands in the same part, whatever else the data holds; each part ordered by id.
    Batches of rows are written to the part of each row, then each part is ordered out of core.
    ``ValueError`` when a part would be empty."""
    relation, key = raw.relation(files), dataset.key
    reader = con.sql(f"SELECT {kept_columns(con, relation)} FROM {relation}").to_arrow_reader(raw.ROW_GROUP_ROWS)
    schema = stable_schema(reader.schema)
    sizes = dict.fromkeys(PARTS, 0)
    with tempfile.TemporaryDirectory(prefix=".hashed-", dir=paths["train"].parent) as scratch:
        unordered = {name: Path(scratch) / f"{name}.parquet" for name in PARTS}
        writers = {name: pq.ParquetWriter(path, schema) for name, path in unordered.items()}
        try:
            for table in row_groups(reader, schema):
                bucket = hash_buckets(table.column(key).to_pandas(), split.seed)
                masks = {
                    "train": bucket < split.train,
                    "val": (bucket >= split.train) & (bucket < split.train + split.val),
                    "test": bucket >= split.train + split.val,
                }
                for name, mask in masks.items():
                    writers[name].write_table(table.filter(pa.array(mask)))
                    sizes[name] += int(mask.sum())
        finally:
            for writer in writers.values():
                writer.close()
        empty = [name for name, size in sizes.items() if not size]
        if empty:
            raise ValueError(f"cannot split {sum(sizes.values())} rows by hash: the {'/'.join(empty)} split is empty; land more rows")
        for name, path in unordered.items():
            write_query(con, f"SELECT * FROM {raw.relation([path])} ORDER BY {quoted(key)} NULLS LAST", [], paths[name])


def summarise(con: duckdb.DuckDBPyConnection, paths: dict[str, Path], time_column: str | None, label: str) -> Record:
    """Rows, time span (``from``/``to``, as pandas prints a UTC timestamp) and label mean of each
    written part, read by DuckDB from the files."""
    summary: Record = {}
    for name, path in paths.items():
        span = f", min({quoted(time_column)}), max({quoted(time_column)})" if time_column else ""
        stats = con.sql(f"SELECT count(*), avg({quoted(label)}){span} FROM {raw.relation([path])}").to_arrow_table()
        rows, mean, *times = (stats.column(i).to_pandas().iloc[0] for i in range(stats.num_columns))
        summary[name] = {
            "rows": int(rows),
            **({"from": str(times[0]), "to": str(times[1])} if time_column else {}),
            "label_mean": round(float(mean), 6),
        }
    return summary


def run(dataset: DatasetConfig, split: SplitConfig, data: DataConfig | None = None) -> Record:
    """Split the raw data (the parts in ``dataset.raw_path``) with ``data.engine`` (Spark: on
    ``data.spark_master``) and write the parts (``split_paths``) and ``summary.json`` (DVC's metric:
    rows, time span, label mean of each part, read from the written files) into
    ``split.output_dir``. ``FileNotFoundError`` naming the raw data's place without
    raw data; ``ValueError`` when a part would be empty."""
    data = data or DataConfig()
    files = raw.require(dataset)
    paths = split_paths(split.output_dir)
    split.output_dir.mkdir(parents=True, exist_ok=True)
    with raw.connect(dataset) as con:
        if data.engine is DataEngine.spark:
            from pipelines.data import spark

            spark.split(dataset, split, files, paths, data.spark_master)
        elif dataset.time_column:
            split_by_time(con, dataset, split, files, paths)
        else:
            split_by_hash(con, dataset, split, files, paths)
        summary = summarise(con, paths, dataset.time_column, dataset.label.column)
    write_json(split.output_dir / "summary.json", summary)
    return summary


if __name__ == "__main__":
    # DVC runs this in the project's repository; the stage names the home relative to it.
    parser = argparse.ArgumentParser(description="the split stage of one project (run by dvc repro)")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--project", required=True)
    args = parser.parse_args()
    config = load_config(args.project, args.home)
    run(config.dataset, config.split, config.data)
