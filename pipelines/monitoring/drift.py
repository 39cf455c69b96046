"""Has what the served model sees moved away from what it learned from? (Evidently 0.7)

One Evidently ``ValueDrift`` metric a monitored column, with the method and threshold that
``monitoring.tests`` gives the column's type, in one ``Report`` whose HTML is what on-call
reads. Not ``DataDriftPreset``: it computes every column's test three times (the drifted
count, the per-column values, the table it renders) and, with no method given, spends a large
share of its time choosing one; at 1M rows a side that costs several times the tests
themselves (``bench/drift_check.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.config import DriftTests
from pipelines.errors import NotRetryable
from pipelines.lineage import Record

if TYPE_CHECKING:
    from evidently.core.report import Snapshot  # untyped: Any to mypy


class ColumnKind(str, Enum):
    numeric = "numeric"
    categorical = "categorical"
    text = "text"


class DriftCheckError(NotRetryable, ValueError):
    """The drift check cannot run on these inputs; says which column or setting, and why."""


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    kind: str
    method: str
    score: float
    threshold: float
    drifted: bool


@dataclass
class DriftResult:
    columns: list[ColumnDrift]
    drift_share: float  # the configured share of drifted columns that is dataset drift
    snapshot: Snapshot  # for the HTML report

    @property
    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    @property
    def share(self) -> float:
        return len(self.drifted_columns) / len(self.columns)

    @property
    def dataset_drift(self) -> bool:
        return self.share >= self.drift_share

    def summary(self) -> Record:
        """The verdict, the drifted share and each column's test, JSON-able."""
        return {
            "dataset_drift": self.dataset_drift,
            "share": round(self.share, 6),
            "drift_share": self.drift_share,
            "drifted_columns": self.drifted_columns,
            "columns": [asdict(c) for c in self.columns],
        }


def check_methods(tests: DriftTests) -> None:
    """Every configured method is an Evidently stattest for its column type."""
    from evidently.legacy.calculations.stattests.registry import _registered_stat_tests

    evidently_type = {ColumnKind.numeric: "num", ColumnKind.categorical: "cat", ColumnKind.text: "text"}
    for kind in ColumnKind:
        method = getattr(tests, kind.value).method
        known = sorted(name for name, types in _registered_stat_tests.items() if any(t.value == evidently_type[kind] for t in types))
        if method not in known:
            raise DriftCheckError(f"monitoring.tests.{kind.value}.method {method!r} is not an Evidently test for {kind.value} columns; use one of {known}")


def prepare(reference: pd.DataFrame, current: pd.DataFrame, columns: dict[str, ColumnKind]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The monitored columns of both frames, checked, in the dtypes that keep Evidently cheap:
    categories hashed once into one shared ``category`` dtype (its tests then count codes, not
    strings), and integers in the smallest type that holds both sides (Evidently copies the
    whole frame once per numeric column). Both are lossless: scores do not change."""
    for name, frame in (("reference", reference), ("current", current)):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DriftCheckError(f"the {name} data has no column {missing}; expected the monitored columns {sorted(columns)}")
        if frame.empty:
            raise DriftCheckError(f"the {name} data has no rows")
    prepared: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    for column, kind in columns.items():
        sides = (reference[column], current[column])
        for name, values in zip(("reference", "current"), sides):
            if values.isna().all():
                raise DriftCheckError(f"column {column!r} of the {name} data has no values (all missing)")
        if kind == ColumnKind.numeric:
            for name, values in zip(("reference", "current"), sides):
                if not pd.api.types.is_numeric_dtype(values):
                    raise DriftCheckError(f"column {column!r} of the {name} data is {values.dtype}, expected numbers")
            if all(v.dtype.kind in "iu" for v in sides):  # plain numpy integers, never nullable ones
                low, high = min(v.min() for v in sides), max(v.max() for v in sides)
                # the span fits too, so no difference of two values can overflow
                smallest = next(t for t in ("int8", "int16", "int32", "int64") if np.iinfo(t).min <= low and max(high, high - low) <= np.iinfo(t).max)
                sides = tuple(v.astype(smallest) for v in sides)
        elif kind == ColumnKind.categorical:
            codes, categories = pd.factorize(pd.concat(sides, ignore_index=True))
            dtype = pd.CategoricalDtype(categories)
            split = len(sides[0])
            sides = (pd.Categorical.from_codes(codes[:split], dtype=dtype), pd.Categorical.from_codes(codes[split:], dtype=dtype))
        for out, values in zip(prepared, sides):
            out[column] = values.to_numpy() if isinstance(values, pd.Series) else values
    return pd.DataFrame(prepared[0]), pd.DataFrame(prepared[1])


def compare(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: dict[str, ColumnKind],
    tests: DriftTests,
    drift_share: float,
) -> DriftResult:
    """Test each of ``columns`` of ``current`` against ``reference``; one Evidently report."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.tests.base_test import TestStatus
    from evidently.metrics import ValueDrift

    if not columns:
        raise DriftCheckError("no columns to monitor; check dataset.features and monitoring.exclude_columns")
    check_methods(tests)
    reference, current = prepare(reference, current, columns)
    of_kind = {kind: [c for c, k in columns.items() if k == kind] for kind in ColumnKind}
    definition = DataDefinition(
        numerical_columns=of_kind[ColumnKind.numeric],
        categorical_columns=of_kind[ColumnKind.categorical],
        text_columns=of_kind[ColumnKind.text],
    )
    metrics = [
        ValueDrift(column=c, method=getattr(tests, k.value).method, threshold=getattr(tests, k.value).threshold)
        for c, k in columns.items()
    ]
    snapshot = Report(metrics, include_tests=True).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    result = snapshot.dict()
    scores = {m["config"]["column"]: float(m["value"]) for m in result["metrics"]}
    verdicts = {t["metric_config"]["params"]["column"]: t["status"] == TestStatus.FAIL for t in result["tests"]}
    return DriftResult(
        columns=[
            ColumnDrift(
                column=c,
                kind=k.value,
                method=getattr(tests, k.value).method,
                score=scores[c],
                threshold=getattr(tests, k.value).threshold,
                drifted=verdicts[c],
            )
            for c, k in columns.items()
        ],
        drift_share=drift_share,
        snapshot=snapshot,
    )
