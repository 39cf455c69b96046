"""The data steps on Spark (``data.engine: spark``): the split in Spark SQL over the raw parts.

The outputs are the default engine's, row for row and type for type (``pipelines.data.split``
writes the same three files): the same time cut at the same positions, the same window, the
same hash buckets (pandas' ``hash_pandas_object``, computed on the executors through Arrow),
each part ordered the same way, timestamps in nanoseconds UTC. Spark reads the parts where they
lie and writes its sorted output to a hidden folder beside the split; the driver then streams
that output, in order, into one parquet file per part in row groups of ``ROW_GROUP_ROWS``, so
neither the driver nor an executor holds a part in memory.

On a cluster (``data.spark_master: spark://host:7077``) every executor must see the project
home at the same path as the driver (the compose file's ``spark`` profile mounts it), and run
the driver's Python with pandas and pyarrow (the hash split's function runs there).

Needs the ``spark`` extra (``pyspark``) and a Java runtime; ``make install`` installs both.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import BATCH, DatasetConfig, SplitConfig
from pipelines.data.raw import ROW_GROUP_ROWS
from pipelines.data.split import hash_buckets, window_start

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

APP_NAME = "flywheel"
DRIVER_MEMORY = "1g"  # the driver JVM's heap: it only plans and collects a few numbers
EXECUTOR_MEMORY = "1g"  # each executor's heap on a cluster; beyond it Spark spills to disk
LOG_LEVEL = "ERROR"
PART_COLUMN = "_part"
BUCKET_COLUMN = "_bucket"
LOCAL = re.compile(r"^local(?:\[(\d+|\*)(?:,\d+)?\])?$")


def session(master: str) -> SparkSession:
    """The process's Spark session on ``master`` (``local[N]``, ``local[*]`` or ``spark://host:7077``),
    created on first use: quiet logs, UTC, the JVM's heap bounded, parquet nanosecond timestamps
    read as their integer value (Spark cannot read them otherwise), few shuffle partitions on a
    local master. A session on another master is stopped first. ``RuntimeError`` naming the
    install step when pyspark is not installed."""
    try:
        from pyspark.sql import SparkSession
    except ModuleNotFoundError as exc:
        raise RuntimeError("data.engine spark needs pyspark and a Java runtime: run `make install` (the `spark` extra and openjdk-17-jre-headless)") from exc

    active = SparkSession.getActiveSession()
    if active is not None:
        if active.sparkContext.master == master:
            return active
        active.stop()
    builder = (
        SparkSession.builder.master(master)
        .appName(APP_NAME)
        .config("spark.driver.memory", DRIVER_MEMORY)
        .config("spark.executor.memory", EXECUTOR_MEMORY)
        .config("spark.log.level", LOG_LEVEL)
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.legacy.parquet.nanosAsLong", "true")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.pyspark.fallback.enabled", "false")
    )
    local = LOCAL.match(master)
    if local:
        cores = local[1] or "1"
        builder = builder.config("spark.sql.shuffle.partitions", str(os.cpu_count() or 1) if cores == "*" else cores).config("spark.ui.enabled", "false")
        # the Python workers (the hash split's function): this interpreter, with pandas and pyarrow
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(LOG_LEVEL)
    return spark


def target_schema(files: list[Path]) -> pa.Schema:
    """The columns of the split (``BATCH`` left out) and their types, from the parts' footers:
    a column some parts lack is kept, a column typed differently across parts widened as
    pandas' concat (and DuckDB's ``union_by_name``) widens it (an integer beside a float is a float)."""
    schema = pa.unify_schemas([pq.read_schema(f).remove_metadata() for f in files], promote_options="permissive")
    if BATCH in schema.names:
        schema = schema.remove(schema.get_field_index(BATCH))
    return schema


def _spark_type(field: pa.Field) -> str:
    """The Spark SQL type a column is read as: timestamps as their nanoseconds since the epoch
    (``bigint``; turned back into timestamps when the parts are written)."""
    from pyspark.sql.pandas.types import from_arrow_type

    if pa.types.is_timestamp(field.type) or pa.types.is_null(field.type):
        return "bigint" if pa.types.is_timestamp(field.type) else "string"
    return str(from_arrow_type(field.type).simpleString())


def read_parts(spark: SparkSession, files: list[Path], schema: pa.Schema) -> DataFrame:
    """The raw ``files`` as one Spark frame of ``schema``'s columns: parts that share a schema
    are read together, each group cast to the wide types (a missing column is NULL), then unioned."""
    from pyspark.sql import functions as F

    groups: dict[pa.Schema, list[str]] = {}
    for path in files:
        groups.setdefault(pq.read_schema(path).remove_metadata(), []).append(str(path))
    frames = []
    for own, paths in groups.items():
        frame = spark.read.parquet(*paths)
        columns = [
            (F.col(f"`{field.name}`") if field.name in own.names else F.lit(None)).cast(_spark_type(field)).alias(field.name)
            for field in schema
        ]
        frames.append(frame.select(columns))
    union = frames[0]
    for frame in frames[1:]:
        union = union.unionByName(frame)
    return union


def by_time(frame: DataFrame, time: str, split: SplitConfig) -> tuple[DataFrame, int, int]:
    """``frame`` (``split.window`` applied) with each row's part in ``PART_COLUMN`` (NULL times: in
    no part), its row count and its count of distinct times. The cut times are the times at
    positions ``int(n * train)`` and ``min(int(n * (train + val)), n - 1)`` of the order by time
    (nulls last), found from one row per distinct time and a running total of their counts."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    t = F.col(f"`{time}`")
    window = split.window_length
    if window is not None:
        latest = frame.agg(F.max(t)).first()
        newest = None if latest is None else latest[0]
        if newest is None:
            frame = frame.where(F.lit(False))
        else:
            start = window_start(pd.Timestamp(int(newest), unit="ns", tz="UTC"), window)
            frame = frame.where(t >= F.lit(int(start.value)))
    counts = frame.groupBy(t.alias("t")).count().cache()
    try:
        totals = counts.agg(F.sum("count"), F.count("t")).first()
        assert totals is not None
        n, distinct = int(totals[0] or 0), int(totals[1])
        if n == 0:
            return frame.withColumn(PART_COLUMN, F.lit(None).cast("string")), n, distinct
        train_at, val_at = int(n * split.train), min(int(n * (split.train + split.val)), n - 1)
        through = F.sum("count").over(Window.orderBy(F.asc_nulls_last("t")).rowsBetween(Window.unboundedPreceding, 0))
        running = counts.select("t", through.alias("through"))
        # the first time whose running count passes the position; None when only NULL times do
        cuts = running.agg(*(F.min(F.when(F.col("through") > at, F.col("t"))) for at in (train_at, val_at))).first()
        assert cuts is not None
    finally:
        counts.unpersist()
    train_end, val_end = (F.lit(cut).cast("bigint") for cut in cuts)  # NULL compares with nothing, as pandas' NaT
    return frame.withColumn(PART_COLUMN, F.when(t < train_end, "train").when(t < val_end, "val").when(t >= val_end, "test")), n, distinct


def by_hash(frame: DataFrame, key: str, split: SplitConfig) -> DataFrame:
    """``frame`` with each row's part in ``PART_COLUMN`` by the bucket in [0, 1) of its ``key``:
    pandas' ``hash_pandas_object`` of {key, seed} as ``uint64 / 2**64``, the default engine's
    computation on the same values, run on the executors over Arrow batches (``mapInArrow``:
    no round trip of the other columns through pandas)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, StructField, StructType

    seed = split.seed

    def add_bucket(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            bucket = hash_buckets(pd.Series(batch.column(batch.schema.get_field_index(key)).to_numpy(zero_copy_only=False)), seed)
            yield batch.append_column(BUCKET_COLUMN, pa.array(bucket, pa.float64()))

    schema = StructType([*frame.schema.fields, StructField(BUCKET_COLUMN, DoubleType(), False)])
    bucket = F.col(BUCKET_COLUMN)
    train, val = split.train, split.train + split.val
    part = F.when(bucket < train, "train").when(bucket < val, "val").otherwise("test")
    return frame.mapInArrow(add_bucket, schema).withColumn(PART_COLUMN, part).drop(BUCKET_COLUMN)


def split(dataset: DatasetConfig, split: SplitConfig, files: list[Path], paths: dict[str, Path], master: str = "local[2]") -> None:
    """Split the raw parts ``files`` on Spark (the session of ``master``) and write each part at
    ``paths[part]`` (train, val, test; the rows, order and types of the default engine): by time
    with a time column (within ``split.window`` if set), ordered by (time, key), else by a seeded
    hash of ``dataset.key``, ordered by key. ``ValueError`` with the default engine's message when
    a part would be empty; nothing is written then.

    Spark sorts and writes the parts under ``.spark-<id>/`` beside ``paths["train"]`` (its files in
    order of the sort); each part is then streamed into its one file, written as
    ``.<name>.partial`` and renamed, so a crash leaves the earlier outputs in place."""
    from pyspark.sql import functions as F

    spark = session(master)
    schema = target_schema(files)
    frame = read_parts(spark, files, schema)
    time, key = dataset.time_column, dataset.key
    if time:
        frame, n, distinct = by_time(frame, time, split)
        order = [time, key]
    else:
        frame, n, distinct = by_hash(frame, key, split), sum(pq.ParquetFile(f).metadata.num_rows for f in files), 0
        order = [key]
    staging = paths["train"].parent / f".spark-{uuid.uuid4().hex}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        written = frame.where(F.col(PART_COLUMN).isNotNull()).orderBy(PART_COLUMN, *(F.col(f"`{c}`") for c in order))
        written.write.partitionBy(PART_COLUMN).parquet(str(staging))
        outputs = {part: sorted((staging / f"{PART_COLUMN}={part}").glob("*.parquet")) for part in paths}
        empty = [part for part in paths if not sum(pq.ParquetFile(f).metadata.num_rows for f in outputs[part])]
        if empty and time:
            within = f" of split.window {split.window!r}" if split.window else ""
            raise ValueError(f"cannot cut {n} rows{within} spanning {distinct} distinct {time} values by time: the {'/'.join(empty)} split is empty; land more batches")
        if empty:
            raise ValueError(f"cannot split {n} rows by hash: the {'/'.join(empty)} split is empty; land more rows")
        for part in paths:
            combine(outputs[part], schema, paths[part])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def combine(files: list[Path], schema: pa.Schema, path: Path) -> None:
    """Stream Spark's output ``files`` of one part, in order, into one parquet file at ``path`` of
    ``schema`` (integer nanoseconds back to UTC timestamps), in row groups of ``ROW_GROUP_ROWS``."""
    partial = path.with_name(f".{path.name}.partial")
    with pq.ParquetWriter(partial, schema) as writer:
        pending: list[pa.RecordBatch] = []
        rows = 0
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=ROW_GROUP_ROWS, columns=schema.names):
                pending.append(_typed(batch, schema))
                rows += batch.num_rows
                if rows >= ROW_GROUP_ROWS:
                    writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP_ROWS)
                    pending, rows = [], 0
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP_ROWS)
    os.replace(partial, path)


def _typed(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    columns = [
        pa.nulls(batch.num_rows, field.type) if pa.types.is_null(field.type) else batch.column(field.name).cast(field.type)
        for field in schema
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)
