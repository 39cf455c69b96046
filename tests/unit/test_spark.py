"""``data.engine: spark``: the split (Spark SQL) and the validation (Great Expectations' Spark
execution engine) give what the default engine gives on the same real flights data. One local
Spark session serves the whole module (a JVM start costs seconds)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from pipelines.config import DataConfig, DataEngine
from pipelines.data import raw
from pipelines.data.ingest import append_to_raw
from pipelines.data.replay import corrupt, month_batch
from pipelines.data.schema import as_csv, typed
from pipelines.data.split import run, split_paths
from pipelines.data.validation import BatchValidator
from tests.conftest import make_project

MASTER = "local[2]"
MONTHS = ("2013-01", "2013-02", "2013-03")

if shutil.which("java") is None:
    pytest.skip("no Java runtime: pyspark needs one (make install installs openjdk-17-jre-headless)", allow_module_level=True)


@pytest.fixture(scope="module")
def spark():
    from pipelines.data.spark import session

    started = session(MASTER)
    yield started
    started.stop()


def land(config, months=MONTHS, rows=1500):
    """Real flights months as ingestion writes them: typed, one raw part per batch."""
    for month in months:
        batch, problems = typed(month_batch(month, rows=rows)[config.dataset.columns], config.dataset)
        assert not problems
        append_to_raw(config.dataset, batch, f"{month}.csv")
    return config


def split_with(config, engine):
    """The parts and summary one engine writes."""
    summary = run(config.dataset, config.split, DataConfig(engine=engine, spark_master=MASTER))
    return {part: pd.read_parquet(path) for part, path in split_paths(config.split.output_dir).items()}, summary


def assert_same_split(config):
    default, default_summary = split_with(config, DataEngine.duckdb)
    on_spark, spark_summary = split_with(config, DataEngine.spark)

    for part in default:
        assert len(default[part]) > 0, part
        pd.testing.assert_frame_equal(on_spark[part], default[part], check_exact=True)
    assert spark_summary == default_summary
    return default


@pytest.mark.parametrize("window", [None, "1 months"], ids=["all", "window"])
def test_time_split_is_the_default_engines(spark, tmp_path, window):
    config = land(make_project(tmp_path, {"split": {"window": window}}))

    parts = assert_same_split(config)

    assert str(parts["train"]["time_hour"].dtype) == "datetime64[ns, UTC]"
    rows = sum(len(p) for p in parts.values())
    assert rows == raw.rows(config.dataset) if window is None else rows < raw.rows(config.dataset)


def test_hash_split_without_time_or_id_is_the_default_engines(spark, tmp_path):
    config = land(make_project(tmp_path, {"dataset": {"time_column": None, "id_column": None}}), MONTHS[:2])

    parts = assert_same_split(config)

    assert config.dataset.key == "row_id" and parts["train"]["row_id"].is_monotonic_increasing


def test_a_split_that_cannot_be_cut_fails_with_the_default_engines_message(spark, tmp_path):
    config = make_project(tmp_path)
    batch, _ = typed(month_batch("2013-05", rows=300).assign(time_hour="2013-05-01T12:00:00Z")[config.dataset.columns], config.dataset)
    append_to_raw(config.dataset, batch, "2013-05.csv")

    with pytest.raises(ValueError) as default:
        run(config.dataset, config.split)
    with pytest.raises(ValueError) as on_spark:
        run(config.dataset, config.split, DataConfig(engine=DataEngine.spark, spark_master=MASTER))

    assert str(on_spark.value) == str(default.value) and "the train/val split is empty" in str(default.value)


def test_validation_on_spark_passes_and_fails_the_same_expectations(spark, tmp_path):
    config = make_project(tmp_path)
    good = as_csv(month_batch("2013-02", rows=300))
    bad = as_csv(corrupt(month_batch("2013-02", rows=300)))
    on_pandas = BatchValidator(config.dataset, config.home)
    on_spark = BatchValidator(config.dataset, config.home, DataConfig(engine=DataEngine.spark, spark_master=MASTER))

    def failed(outcome):
        return sorted((r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column")) for r in outcome.result["results"] if not r["success"])

    for frame, passes in ((good, True), (bad, False)):
        expected, seen = on_pandas.validate(frame, "2013-02"), on_spark.validate(frame, "2013-02")
        assert expected.success is seen.success is passes
        assert failed(seen) == failed(expected)
        assert seen.failures == expected.failures
    assert failed(expected) == [
        ("expect_column_values_to_be_between", "distance"),
        ("expect_column_values_to_be_in_set", "origin"),
        ("expect_column_values_to_not_be_null", "carrier"),
    ]


def test_great_expectations_imports_in_a_python_c_with_pyspark_installed():
    # pyspark.sql.connect, which Great Expectations imports, used to sys.exit(0) from a `python -c`
    # without grpcio-status: the command did nothing and "succeeded" (the spark extra is pyspark[connect])
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import great_expectations; print('imported')"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr[-2000:]
