"""Great Expectations 1.x: validate one landing batch against the dataset's suite.

The suite is a JSON file in ``expectations/``, reviewed like code. It is loaded into a File
Data Context in ``<home>/gx`` on every run, so an edited suite takes effect the next night.
Each validation is kept by GE (validation store, Data Docs site); a failing one is also
described in a few readable lines for the task's error.

With ``data.engine: spark`` the same suite runs on GE's Spark execution engine, over the batch
as a Spark DataFrame on ``data.spark_master``: the same expectations pass and fail. Suites name
column types as pandas does (``int64``, ``str``), so the type checks are given Spark's name of
the same type (``SPARK_TYPES``: a batch's int64 column is a Spark ``LongType`` column).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipelines.config import DataConfig, DataEngine, DatasetConfig
from pipelines.errors import NotRetryable
from pipelines.lineage import Record

if TYPE_CHECKING:
    from great_expectations import ExpectationSuite
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult
    from great_expectations.datasource.fluent.pandas_datasource import PandasDatasource
    from great_expectations.datasource.fluent.spark_datasource import SparkDatasource

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no phoning home from a nightly job

SAMPLE_VALUES = 5
SPARK_SOURCE = "landing_spark"  # GE's Spark data source; the pandas one is "landing"
SPARK_SUFFIX = ".spark"  # of the Spark engine's suite, validation definition and checkpoint
# A suite's pandas type name -> the pyspark.sql.types class of a Spark column of the same
# values (pandas -> Spark through Arrow); names not listed are Spark's own and pass unchanged.
SPARK_TYPES = {
    "int64": "LongType",
    "int32": "IntegerType",
    "int16": "ShortType",
    "int8": "ByteType",
    "float64": "DoubleType",
    "float32": "FloatType",
    "str": "StringType",
    "string": "StringType",
    "object": "StringType",
    "bool": "BooleanType",
    "datetime64[ns, UTC]": "TimestampType",
    "datetime64[ns]": "TimestampNTZType",
}
TYPE_EXPECTATIONS = {"expect_column_values_to_be_of_type": "type_", "expect_column_values_to_be_in_type_list": "type_list"}


class SuiteError(NotRetryable, ValueError):
    """The expectation suite is missing or invalid: the project is broken, not the data."""


@dataclass(frozen=True)
class Outcome:
    success: bool
    result: Record  # GE's validation result, JSON-able
    failures: list[str] = field(default_factory=list)  # one readable line per failed expectation
    docs_page: Path | None = None  # the Data Docs page of this validation


def load_suite(path: Path) -> ExpectationSuite:
    """The suite in ``path`` as a GE ``ExpectationSuite``; ``SuiteError`` names the file and the problem."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    try:
        spec = json.loads(path.read_text())
        expectations = [
            ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], notes=e.get("notes"), meta=e.get("meta")).to_domain_obj()
            for e in spec["expectations"]
        ]
        return gx.ExpectationSuite(name=spec["name"], expectations=expectations, meta=spec.get("meta"))
    except FileNotFoundError:
        raise SuiteError(f"{path}: expectation suite file not found") from None
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{path}: not valid JSON ({exc})") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise SuiteError(
            f"{path}: not a valid expectation suite ({type(exc).__name__}: {exc}); "
            "expected {'name': ..., 'expectations': [{'type': ..., 'kwargs': {...}}, ...]}"
        ) from exc


def for_spark(suite: ExpectationSuite, name: str) -> ExpectationSuite:
    """``suite`` as ``name``, its column type checks naming Spark's types (``SPARK_TYPES``) instead of pandas'."""
    import great_expectations as gx

    expectations = []
    for expectation in suite.expectations:
        config = expectation.configuration
        argument = TYPE_EXPECTATIONS.get(config.type)
        if argument is not None and config.kwargs.get(argument) is not None:
            named = config.kwargs[argument]
            spark = [SPARK_TYPES.get(n, n) for n in named] if isinstance(named, list) else SPARK_TYPES.get(named, named)
            config = config.__class__(type=config.type, kwargs={**config.kwargs, argument: spark}, notes=config.notes, meta=config.meta)
        expectations.append(config.to_domain_obj())
    return gx.ExpectationSuite(name=name, expectations=expectations, meta=suite.meta)


def describe(result: ExpectationValidationResult) -> str:
    """One line for a failed expectation: which one, on which column, and what was seen."""
    config = result.expectation_config
    assert config is not None  # GE sets it on every result of a suite's run
    column = config.kwargs.get("column")
    name = f"{config.type}({column})" if column else config.type
    if result.exception_info and result.exception_info.get("raised_exception"):
        return f"{name}: could not run ({result.exception_info.get('exception_message')})"
    seen = result.result or {}
    if "unexpected_count" in seen:
        rows = f"{seen['unexpected_count']} of {seen['element_count']} rows"
        if config.type == "expect_column_values_to_not_be_null":
            return f"{name}: {rows} are null"
        values = [_clip(entry["value"]) for entry in seen.get("partial_unexpected_counts", [])][:SAMPLE_VALUES]
        return f"{name}: {rows}, e.g. {values!r}"
    observed = (seen.get("details") or {}).get("mismatched") or seen.get("observed_value")
    if observed is None:  # GE computed nothing: the values are not of the type the check reads
        return f"{name}: could not be checked on these values (not of the column's type)"
    return f"{name}: observed {observed!r}"


def _clip(value: object, limit: int = 60) -> object:
    """A sample value short enough for a log line (a whole review is not)."""
    if isinstance(value, tuple):
        return tuple(_clip(v, limit) for v in value)
    return value[: limit - 3] + "..." if isinstance(value, str) and len(value) > limit else value


class BatchValidator:
    """A checkpoint over in-memory batches: validation results stored, Data Docs updated."""

    def __init__(self, dataset: DatasetConfig, home: Path, data: DataConfig | None = None) -> None:
        """The dataset's suite (``SuiteError`` if broken) in the File Data Context in ``home/gx``,
        run by pandas or, with ``data.engine`` spark, by Spark on ``data.spark_master``."""
        suite = load_suite(dataset.expectation_suite)  # before any GE state is touched
        self.data = data or DataConfig()
        spark = self.data.engine is DataEngine.spark
        # The Spark engine's suite, validation and checkpoint have names of their own: GE's
        # stores keep both engines' histories, and one engine's objects never go stale under the other.
        name = f"{dataset.name}{SPARK_SUFFIX}" if spark else dataset.name
        if spark:
            suite = for_spark(suite, f"{suite.name}{SPARK_SUFFIX}")
        import great_expectations as gx
        from great_expectations.checkpoint.actions import UpdateDataDocsAction
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.context = gx.get_context(mode="file", project_root_dir=str(home))
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        suite = self.context.suites.add_or_update(suite)
        source: PandasDatasource | SparkDatasource
        if spark:
            from pipelines.data.spark import session

            session(self.data.spark_master)  # GE's Spark engine takes the active session
            source = self.context.data_sources.add_or_update_spark(SPARK_SOURCE)
        else:
            source = self.context.data_sources.add_or_update_pandas("landing")
        asset = next((a for a in source.assets if a.name == dataset.name), None) or source.add_dataframe_asset(dataset.name)
        batches = next((b for b in asset.batch_definitions if b.name == "batch"), None) or (
            asset.add_batch_definition_whole_dataframe("batch")
        )
        definition = self.context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=name, data=batches, suite=suite)
        )
        self.checkpoint = self.context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=name,
                validation_definitions=[definition],
                actions=[UpdateDataDocsAction(name="update_data_docs")],
                result_format="SUMMARY",
            )
        )

    def validate(self, frame: pd.DataFrame, batch_name: str) -> Outcome:
        """Validate one batch (its ``batch_name`` names the run); the result is stored, Data Docs updated."""
        from great_expectations.core.run_identifier import RunIdentifier

        run_id = RunIdentifier(run_name=batch_name, run_time=datetime.now(timezone.utc))
        if self.data.engine is DataEngine.spark:
            from pipelines.data.spark import session

            batch = session(self.data.spark_master).createDataFrame(frame)
            try:
                checkpoint_result = self.checkpoint.run(batch_parameters={"dataframe": batch}, run_id=run_id)
            finally:
                batch.unpersist()  # GE caches the batch for its metrics
        else:
            checkpoint_result = self.checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
        ((identifier, result),) = checkpoint_result.run_results.items()
        page = None
        for site in self.context.get_docs_sites_urls(resource_identifier=identifier):
            url = site.get("site_url") or ""
            if url.startswith("file://"):
                page = Path(url.removeprefix("file://"))
        failures = [describe(r) for r in result.results if not r.success and not _on_missing_column(r, frame)]
        # GE leaves ExpectationSuiteValidationResult.to_json_dict unannotated
        return Outcome(result.success, result.to_json_dict(), failures, page)  # type: ignore[no-untyped-call]


def _on_missing_column(result: ExpectationValidationResult, frame: pd.DataFrame) -> bool:
    """A column expectation that could not run because the column is absent: the table-level
    check already says which columns are missing, so this adds only noise."""
    config = result.expectation_config
    assert config is not None  # GE sets it on every result of a suite's run
    column = config.kwargs.get("column")
    return column is not None and column not in frame.columns
