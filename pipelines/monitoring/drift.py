"""Has what the served model sees moved away from what it learned from?

Each monitored numeric or categorical column gets two tests, each a one-sided p-value:

- its distribution: the normed Wasserstein distance (numeric) or the Jensen-Shannon distance
  (categorical) of the window's finite values to the reference's, equal to scipy's (as
  Evidently computes them), judged against the version's calibrated null at this window's
  size (``pipelines.monitoring.calibration``): the threshold moves with the window's size;
- its missing and non-finite values: a rise of their share over the reference's, Fisher's
  exact test. A window where a column arrives empty or all ``inf`` is a drifted column, named,
  not an error.

A column drifts when the smaller of its two p-values, doubled (Bonferroni over its two tests),
is at most ``monitoring.false_alarm_rate``: so a column of a window with no drift is flagged
with at most that chance. The dataset verdict must not fire more often than that either,
whatever the dependence between columns: with k columns and ``m = ceil(drift_share * k)``, the
dataset drifts when the m-th smallest column p-value is at most ``m * rate / k`` (Rüger 1978;
the bound holds under any dependence), which also means at least ``drift_share`` of the columns
drifted.

A text column is told apart by Evidently's domain classifier (``abs_text_content_drift``): a
classifier trained on half of reference and window, its ROC AUC measured on the other half.
Under no drift that held-out AUC is the Mann-Whitney statistic of exchangeable scores, so its
p-value is the normal one of mean 1/2 and variance ``(n0 + n1 + 1) / (12 n0 n1)`` for the
``n0`` reference and ``n1`` window texts of the held-out half (Hanley & McNeil 1982): the
threshold moves with the window's size too, no calibration needed.

Evidently renders the report (``ValueDrift`` a column), with these statistics and verdicts
(``_reported``) and the distributions of a seeded sample of at most ``REPORT_ROWS`` rows a side,
so the report costs the same at any window size; ``bench/drift_check.py`` measures it.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import asdict, dataclass
from enum import Enum
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.config import DRIFT_METHODS, DriftTests
from pipelines.errors import NotRetryable
from pipelines.lineage import Record
from pipelines.monitoring import calibration
from pipelines.monitoring.calibration import NullDistribution

if TYPE_CHECKING:
    from collections.abc import Mapping

    from evidently.core.report import Snapshot  # untyped: Any to mypy

REPORT_ROWS = 50_000  # rows a side whose distributions the HTML report draws


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
    score: float | None  # the distance of the window's finite values; None when it has none
    threshold: float | None  # the score above which the distribution test alone drifts at this window's size
    score_p_value: float | None
    missing_share: float  # missing or non-finite values of the window
    reference_missing_share: float
    missing_p_value: float
    p_value: float  # the column's: Bonferroni over its two tests (text: its one test)
    drifted: bool
    reason: str | None = None  # why it drifted, in words


def _auc_spread(negatives: float, positives: float) -> float:
    """The standard deviation of a ROC AUC on ``negatives`` and ``positives`` rows of exchangeable
    scores (no signal): ``sqrt((n0 + n1 + 1) / (12 n0 n1))``, the Mann-Whitney null."""
    return math.sqrt((negatives + positives + 1) / (12 * negatives * positives))


def needed_columns(columns: int, drift_share: float) -> int:
    """Drifted columns that make dataset drift: ``ceil(drift_share * columns)``, at least one."""
    return max(1, math.ceil(drift_share * columns - 1e-9))


def dataset_verdict(p_values: list[float], drift_share: float, false_alarm_rate: float) -> bool:
    """Dataset drift from the columns' p-values: the m-th smallest at most ``m * rate / k``, with
    k columns and ``m = needed_columns(k, drift_share)`` (Rüger 1978): under no drift in any
    column it fires with chance at most ``false_alarm_rate``, whatever their dependence."""
    m = needed_columns(len(p_values), drift_share)
    return sorted(p_values)[m - 1] <= m * false_alarm_rate / len(p_values)


@dataclass
class DriftResult:
    columns: list[ColumnDrift]
    drift_share: float  # the configured share of drifted columns that is dataset drift
    false_alarm_rate: float
    snapshot: Snapshot  # for the HTML report
    report_rows: dict[str, int]  # rows a side the report's distributions were drawn from

    @property
    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    @property
    def share(self) -> float:
        return len(self.drifted_columns) / len(self.columns)

    @property
    def needed(self) -> int:
        return needed_columns(len(self.columns), self.drift_share)

    @property
    def dataset_level(self) -> float:
        return self.needed * self.false_alarm_rate / len(self.columns)

    @property
    def dataset_drift(self) -> bool:
        return dataset_verdict([c.p_value for c in self.columns], self.drift_share, self.false_alarm_rate)

    def summary(self) -> Record:
        """The verdict, the drifted share, the dataset test and each column's tests, JSON-able."""
        return {
            "dataset_drift": self.dataset_drift,
            "share": round(self.share, 6),
            "drift_share": self.drift_share,
            "false_alarm_rate": self.false_alarm_rate,
            "dataset_test": {
                "method": "Rüger: the m-th smallest column p-value at most m * false_alarm_rate / columns",
                "m": self.needed,
                "level": self.dataset_level,
            },
            "drifted_columns": self.drifted_columns,
            "columns": [asdict(c) for c in self.columns],
            "report_rows": self.report_rows,
        }


def _check_frames(reference: pd.DataFrame, current: pd.DataFrame, columns: Mapping[str, ColumnKind]) -> None:
    for name, frame in (("reference", reference), ("current", current)):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DriftCheckError(f"the {name} data has no column {missing}; expected the monitored columns {sorted(columns)}")
        if frame.empty:
            raise DriftCheckError(f"the {name} data has no rows")
        for column, kind in columns.items():
            if kind == ColumnKind.numeric and not pd.api.types.is_numeric_dtype(frame[column]):
                raise DriftCheckError(f"column {column!r} of the {name} data is {frame[column].dtype}, expected numbers")


def _usable(values: pd.Series, kind: ColumnKind) -> tuple[np.ndarray, np.ndarray]:
    """(values as an array, mask of the usable ones: present, and finite for a number)."""
    if kind == ColumnKind.numeric:
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        return numbers, np.isfinite(numbers)
    return values.to_numpy(dtype=object), values.notna().to_numpy()


def draws_from_pool(reference_rows: int, pool_rows: int) -> bool:
    """Whether ``calibrate`` draws its windows from the pool: one smaller than the reference would
    add more noise of its own than it removes, and the reference is bootstrapped instead."""
    return pool_rows >= reference_rows


def calibrate(reference: pd.DataFrame, pool: pd.DataFrame, columns: Mapping[str, ColumnKind], smallest: int, draws: int, seed: int) -> dict[str, NullDistribution]:
    """The null of each numeric and categorical column of ``columns``: ``draws`` windows a size,
    from ``smallest`` rows doubling to 16 times the reference's, drawn from ``pool`` (rows of the
    same data beside the reference: the rest of the training split) and scored against
    ``reference``, so the rate holds for this very reference. A pool smaller than the reference
    would add more noise of its own than it removes: then the windows are bootstrapped from the
    reference itself (``calibration``), which holds the rate on average over references, not for
    each one. ``DriftCheckError`` for a column without usable reference values."""
    rng = np.random.default_rng(seed)
    bootstrap = not draws_from_pool(len(reference), len(pool))
    nulls = {}
    for column, kind in columns.items():
        if kind == ColumnKind.text:
            continue
        ours, ours_ok = _usable(reference[column], kind)
        if not ours_ok.any():
            raise DriftCheckError(f"column {column!r} of the reference data has no values (all missing or non-finite)")
        ours = ours[ours_ok]
        values, values_ok = _usable(pool[column], kind)
        theirs = None if bootstrap or not values_ok.any() else values[values_ok]
        sizes = calibration.ladder(smallest, 16 * len(ours))
        if kind == ColumnKind.numeric:
            nulls[column] = calibration.numeric_null(ours, theirs, sizes, draws, rng)
        else:
            counts, pool_counts = _category_counts(ours, ours if theirs is None else theirs)
            nulls[column] = calibration.categorical_null(counts, None if theirs is None else pool_counts, sizes, draws, rng)
    return nulls


def _category_counts(first: np.ndarray, second: np.ndarray) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """How often each category occurs in ``first`` and in ``second``, over the categories of both."""
    codes, categories = pd.factorize(np.concatenate([first, second]))
    return (np.bincount(codes[: len(first)], minlength=len(categories)).astype(np.float64), np.bincount(codes[len(first) :], minlength=len(categories)).astype(np.float64))


def _test_column(column: str, kind: ColumnKind, reference: pd.Series, current: pd.Series, null: NullDistribution, rate: float) -> ColumnDrift:
    """Both tests of one numeric or categorical column (see the module's docstring)."""
    from scipy.stats import fisher_exact

    (ours, ours_ok), (theirs, theirs_ok) = _usable(reference, kind), _usable(current, kind)
    if not ours_ok.any():
        raise DriftCheckError(f"column {column!r} of the reference data has no values (all missing or non-finite)")
    ours, theirs = ours[ours_ok], theirs[theirs_ok]
    rows, reference_rows = len(theirs), len(ours)
    bad, reference_bad = len(current) - rows, len(reference) - reference_rows
    missing_p = float(fisher_exact([[bad, rows], [reference_bad, reference_rows]], alternative="greater").pvalue) if bad else 1.0
    score = score_p = None
    if rows:
        if kind == ColumnKind.numeric:
            score = calibration.wasserstein_normed(ours, theirs)
        else:
            score = calibration.jensen_shannon(*_category_counts(ours, theirs))
        score_p = null.p_value(score, rows, reference_rows)
    threshold = null.threshold(rate / 2, rows, reference_rows) if rows else None
    p_value = min(1.0, 2 * min(score_p if score_p is not None else 1.0, missing_p))
    drifted = p_value <= rate
    reasons = []
    if score_p is not None and 2 * score_p <= rate:
        reasons.append(f"{DRIFT_METHODS[kind.value]} {score:.4g} above {threshold:.4g}, the threshold at {rows} rows ({_p(score_p)})")
    if 2 * missing_p <= rate:
        reasons.append(f"{bad / len(current):.1%} missing or non-finite against {reference_bad / len(reference):.1%} in the reference ({_p(missing_p)})")
    return ColumnDrift(
        column=column,
        kind=kind.value,
        method=DRIFT_METHODS[kind.value],
        score=score,
        threshold=threshold,
        score_p_value=score_p,
        missing_share=bad / len(current),
        reference_missing_share=reference_bad / len(reference),
        missing_p_value=missing_p,
        p_value=p_value,
        drifted=drifted,
        reason="; ".join(reasons) if drifted else None,
    )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _p(value: float) -> str:
    return f"p={value:.2g}" if value >= 1e-16 else "p<1e-16"  # Fisher's exact p underflows to 0


def judge(reference: pd.DataFrame, current: pd.DataFrame, columns: Mapping[str, ColumnKind], false_alarm_rate: float, nulls: Mapping[str, NullDistribution]) -> dict[str, ColumnDrift]:
    """Both tests of each numeric and categorical column of ``columns`` (text is left out), no
    report: what ``compare`` decides on."""
    return {c: _test_column(c, k, reference[c], current[c], nulls[c], false_alarm_rate) for c, k in columns.items() if k != ColumnKind.text}


# The column verdicts the report shows, by column, while Evidently renders it (see _reported).
_VERDICTS: contextvars.ContextVar[dict[str, tuple[float, bool]]] = contextvars.ContextVar("drift_verdicts")


def _reported(reference: pd.Series, current: pd.Series, column_type: Any, threshold: float) -> tuple[float, bool]:
    """An Evidently stattest that returns the score and verdict this module computed on all rows."""
    return _VERDICTS.get()[str(reference.name)]


def _register_reported_tests() -> None:
    from evidently.legacy.calculations.stattests.registry import StatTest, _registered_stat_tests, register_stattest
    from evidently.legacy.core import ColumnType

    names = {"numeric": ("Wasserstein distance (normed), calibrated threshold", ColumnType.Numerical), "categorical": ("Jensen-Shannon distance, calibrated threshold", ColumnType.Categorical)}
    for kind, (title, column_type) in names.items():
        if f"flywheel_{kind}" not in _registered_stat_tests:
            register_stattest(StatTest(name=f"flywheel_{kind}", display_name=title, allowed_feature_types=[column_type]), default_impl=_reported)


def compare(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: Mapping[str, ColumnKind],
    tests: DriftTests,
    drift_share: float,
    false_alarm_rate: float,
    nulls: Mapping[str, NullDistribution],
) -> DriftResult:
    """Test each of ``columns`` of ``current`` against ``reference``: numeric and categorical
    columns on their calibrated ``nulls`` (``calibrate``) at ``false_alarm_rate``, text with
    Evidently; one Evidently report. ``DriftCheckError`` names a missing column, a wrong type,
    an empty frame, a reference column without values or a column without calibration."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    if not columns:
        raise DriftCheckError("no columns to monitor; check dataset.features and monitoring.exclude_columns")
    _check_frames(reference, current, columns)
    uncalibrated = [c for c, k in columns.items() if k != ColumnKind.text and c not in nulls]
    if uncalibrated:
        raise DriftCheckError(f"no calibrated null for columns {uncalibrated}; calibrate them against this reference first")
    verdicts = judge(reference, current, columns, false_alarm_rate, nulls)

    # Evidently draws the distributions of a sample; a column with no usable value has none to draw.
    shown = [c for c in columns if c not in verdicts or verdicts[c].score is not None]
    report_reference, report_current = (frame[shown].sample(n=min(len(frame), REPORT_ROWS), random_state=0) for frame in (reference, current))
    of_kind = {kind: [c for c in shown if columns[c] == kind] for kind in ColumnKind}
    definition = DataDefinition(numerical_columns=of_kind[ColumnKind.numeric], categorical_columns=of_kind[ColumnKind.categorical], text_columns=of_kind[ColumnKind.text])
    _register_reported_tests()
    # a text column's held-out halves (Evidently splits the texts it keeps in two at random)
    halves = {c: (report_reference[c].notna().sum() / 2, report_current[c].notna().sum() / 2) for c in of_kind[ColumnKind.text]}
    text_thresholds = {c: 0.5 + NormalDist().inv_cdf(1 - false_alarm_rate) * _auc_spread(*halves[c]) for c in halves}
    metrics = [
        ValueDrift(column=c, method=tests.text.method, threshold=text_thresholds[c])
        if columns[c] == ColumnKind.text
        else ValueDrift(column=c, method=f"flywheel_{columns[c].value}", threshold=_finite(verdicts[c].threshold))
        for c in shown
    ]
    token = _VERDICTS.set({c: (float(v.score), v.drifted) for c, v in verdicts.items() if v.score is not None})
    try:
        snapshot = Report(metrics, include_tests=True).run(Dataset.from_pandas(report_current, data_definition=definition), Dataset.from_pandas(report_reference, data_definition=definition))
    finally:
        _VERDICTS.reset(token)
    scores = {m["config"]["column"]: float(m["value"]) for m in snapshot.dict()["metrics"]}
    for c in of_kind[ColumnKind.text]:
        p_value = 1 - NormalDist().cdf((scores[c] - 0.5) / _auc_spread(*halves[c]))
        verdicts[c] = ColumnDrift(
            column=c,
            kind=ColumnKind.text.value,
            method=tests.text.method,
            score=scores[c],
            threshold=text_thresholds[c],
            score_p_value=p_value,
            missing_share=0.0,
            reference_missing_share=0.0,
            missing_p_value=1.0,
            p_value=p_value,
            drifted=p_value <= false_alarm_rate,
            reason=f"domain classifier's ROC AUC {scores[c]:.3f} above {text_thresholds[c]:.3f}, the threshold at {len(report_current)} texts ({_p(p_value)})"
            if p_value <= false_alarm_rate
            else None,
        )
    return DriftResult(
        columns=[verdicts[c] for c in columns],
        drift_share=drift_share,
        false_alarm_rate=false_alarm_rate,
        snapshot=snapshot,
        report_rows={"reference": len(report_reference), "current": len(report_current)},
    )
