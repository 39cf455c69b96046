"""How well the served version does on production traffic, one window at a time.

For the window ``[start, end)`` of served time, ``evaluate_window`` reads the rows the inference
log holds (``pipelines.monitoring.check.read_window``) and those of them whose ground truth came
back (the labelled rows, ``pipelines.feedback.labels``), and writes::

    <performance.reports_dir>/<model>/<end as YYYYmmddTHHMMSSZ>/summary.json

(written beside and renamed, so a re-run of the window replaces it whole). One version is
judged: the one with most of the window's labelled rows, else the one that served most of its rows (the window of a promotion holds two);
rows of other versions are left out and ``versions_seen`` lists them all.

* **Realized**, on the labelled rows: the gate metric (``gate.metric``, at the version's served
  threshold for f1, precision and recall) with its normal bootstrap interval
  (``pipelines.evaluation.bootstrap``: ``performance.resamples`` resamples of the labelled rows,
  seeded by ``performance.seed``) at two-sided level ``1 - 2 * false_alarm_rate``, so its bounds
  are one-sided at the false-alarm rate; the expected calibration error (10 equal-width bins;
  classifiers); the prediction bias (mean prediction against the observed positive rate or mean
  target); the label coverage (labelled / served rows). None of these with fewer than
  ``performance.min_labels`` labelled rows: the window has no verdict and says why.
* **Estimated**, on all the served rows, labelled or not: the gate metric by CBPE (classifiers)
  or DLE (regressors), ``pipelines.feedback.estimate``.
* **Test**: the version's metric on its own test split and its bootstrap standard error, from
  its ``performance_reference.parquet``; a version published before that file has the gate's
  recorded metric from its lineage with standard error 0 (the summary says so), and no estimate.
* **Degraded**: a one-sided test of a drop. With ``d`` = realized - test (negated where lower is
  better, as ``bootstrap.improvement``: negative is worse) and ``se = sqrt(se_window^2 +
  se_test^2)`` (independent rows), the window is degraded when the upper bound ``d + z(1 -
  false_alarm_rate) * se`` is below ``-performance.min_drop``; the p-value is ``Phi((d +
  min_drop) / se)``, below the false-alarm rate exactly when degraded. Seed noise is not added:
  the same trained model is compared with itself.

Metrics go to Prometheus (``flywheel_performance_*``); ``decide`` says whether a degraded window
starts a retrain (the brakes of ``pipelines.monitoring.trigger``).
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from pipelines.artifacts import OUTPUT, PERFORMANCE_REFERENCE_FILE, SUMMARY_FILE
from pipelines.config import ProjectConfig, Task
from pipelines.evaluation import bootstrap
from pipelines.evaluation.gate import threshold_of
from pipelines.feedback import reference as performance_reference
from pipelines.feedback.estimate import estimate, expected_calibration_error
from pipelines.lineage import Record, write_json
from pipelines.metrics import Sample, emit
from pipelines.monitoring.check import FOLDER_TIME, read_window
from pipelines.monitoring.trigger import brake
from pipelines.serving import repository
from pipelines.serving.client import log_dir

log = logging.getLogger(__name__)
CHECKED, NO_VERDICT = "checked", "no_verdict"


def report_folder(config: ProjectConfig, end: datetime) -> Path:
    """The folder of the window of the served model that ends at ``end``."""
    return config.performance.reports_dir / config.served_model / end.astimezone(timezone.utc).strftime(FOLDER_TIME)


def resampled(metric: str, truth: np.ndarray, predicted: np.ndarray, threshold: float, resamples: int, seed: int) -> np.ndarray:
    """``metric`` on ``resamples`` bootstrap resamples of the rows (``truth`` and ``predicted`` of
    shape (rows,)), seeded: shape (resamples,), nan where a resample leaves it undefined. The
    weights matrix is built in chunks of at most ``bootstrap.CHUNK_CELLS`` cells."""
    out = np.empty(resamples)
    for first, weights in bootstrap.weight_chunks(seed, len(truth), resamples):
        out[first : first + len(weights)] = bootstrap.weighted(metric, truth, predicted, weights, threshold)
    return out


def _value(metric: str, truth: np.ndarray, predicted: np.ndarray, threshold: float) -> float:
    return float(bootstrap.weighted(metric, truth, predicted, np.ones((1, len(truth))), threshold)[0])


def _se(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.std(ddof=1)) if finite.size >= 2 else float("nan")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _version(served: pd.DataFrame, labelled: pd.DataFrame, config: ProjectConfig) -> int | None:
    """The version judged: the one with most of the window's labelled rows (the realized metric
    is the verdict), else the one that served most of its rows, else the one in service."""
    for rows in (labelled, served):
        if not rows.empty and "model_version" in rows:
            return int(rows["model_version"].value_counts().sort_index().idxmax())
    return repository.served_version(config.served_model_dir)


def own_test_metric(metric: str, reference: pd.DataFrame | None, lineage: Record, label: str, threshold: float, resamples: int, seed: int) -> Record:
    """The version's ``metric`` on its own test split: ``value``, ``se`` (bootstrap) and ``rows``
    from its performance ``reference``; without one, the gate's ``challenger`` value from its
    ``lineage`` with ``se`` 0 (``value`` None when the lineage has none). ``source`` says which."""
    if reference is not None:
        truth, predicted = reference[label].to_numpy(np.float64), reference[OUTPUT].to_numpy(np.float64)
        return {
            "value": _finite(_value(metric, truth, predicted, threshold)),
            "se": _finite(_se(resampled(metric, truth, predicted, threshold, resamples, seed))),
            "rows": len(reference),
            "source": PERFORMANCE_REFERENCE_FILE,
        }
    recorded = ((lineage.get("gate") or {}).get("challenger") or {}).get(metric)
    return {
        "value": float(recorded) if isinstance(recorded, int | float) else None,
        "se": 0.0,
        "rows": None,
        "source": f"the lineage's gate metric, standard error taken as 0: no {PERFORMANCE_REFERENCE_FILE}",
    }


def realized_metrics(config: ProjectConfig, labelled: pd.DataFrame, threshold: float) -> Record:
    """The realized metrics of the ``labelled`` rows (at least two): the gate metric's ``value``,
    ``se`` and ``interval`` (``confidence`` = 1 - 2 * false_alarm_rate), the ``calibration_error``
    (classifiers; else None) and the ``prediction_bias``. ``value`` None where the rows leave the
    metric undefined (one class for ROC AUC)."""
    performance, metric = config.performance, config.gate.metric
    truth = labelled[config.dataset.label.column].to_numpy(np.float64)
    predicted = labelled[OUTPUT].to_numpy(np.float64)
    value = _value(metric, truth, predicted, threshold)
    confidence = 1 - 2 * performance.false_alarm_rate
    values = resampled(metric, truth, predicted, threshold, performance.resamples, performance.seed)
    low, high = bootstrap.normal_interval(value, values, confidence)
    mean_prediction, observed = float(predicted.mean()), float(truth.mean())
    classifier = config.dataset.label.task == Task.classification
    return {
        "value": _finite(value),
        "se": _finite(_se(values)),
        "interval": [_finite(low), _finite(high)] if math.isfinite(value) else None,
        "confidence": confidence,
        "calibration_error": expected_calibration_error(truth, predicted) if classifier else None,
        "prediction_bias": {"mean_prediction": mean_prediction, "observed": observed, "difference": mean_prediction - observed},
    }


def drop_test(metric: str, realized: float, se_window: float, test: float, se_test: float, false_alarm_rate: float, min_drop: float) -> Record:
    """The one-sided test of a drop from the ``test`` metric to the ``realized`` one: ``value``
    (realized - test, negated where lower is better), its ``se``, the ``upper`` bound at
    ``1 - false_alarm_rate``, the ``p_value`` of "no drop beyond ``min_drop``", ``degraded``
    (upper < -min_drop)."""
    difference = float(bootstrap.improvement(metric, realized, test))
    se = math.hypot(se_window, se_test)
    upper = difference + NormalDist().inv_cdf(1 - false_alarm_rate) * se
    shortfall = difference + min_drop
    p_value = NormalDist().cdf(shortfall / se) if se > 0 else float(shortfall >= 0)
    return {
        "value": difference,
        "se": se,
        "upper": upper,
        "p_value": p_value,
        "false_alarm_rate": false_alarm_rate,
        "min_drop": min_drop,
        "degraded": upper < -min_drop,
    }


def evaluate_window(config: ProjectConfig, start: datetime, end: datetime) -> Record:
    """The performance summary of the window ``[start, end)``; written to ``report_folder``
    (``summary.json``) and emitted to Prometheus, except with no version to judge (nothing
    served, nothing in service: status ``no_verdict``, nothing written). The summary's fields are
    those of the shared spec: status ``checked``, or ``no_verdict`` with the ``reason`` (too few
    labelled rows, a metric the labels leave undefined, no test metric to compare with); the
    estimate is reported either way."""
    performance, label, metric = config.performance, config.dataset.label, config.gate.metric
    summary: Record = {"project": config.name, "model": config.served_model, "version": None, "start": start.isoformat(), "end": end.isoformat()}
    from pipelines.feedback.labels import read_labelled  # the feedback join's modules: only when a window is checked

    served = read_window(log_dir(config.serving, config.served_model), start, end)
    labelled = read_labelled(config, start, end)  # the log's columns and the truth in the label column
    version = _version(served, labelled, config)
    checked_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if version is None:
        return {**summary, "status": NO_VERDICT, "reason": "no version serves yet", "checked_at": checked_at}
    seen = sorted({int(v) for rows in (served, labelled) if "model_version" in rows for v in rows["model_version"].unique()})
    served = served[served["model_version"] == version] if not served.empty else served
    if not labelled.empty:
        labelled = labelled[(labelled["model_version"] == version) & labelled[label.column].notna()]

    version_dir = config.served_model_dir / str(version)
    try:
        lineage = repository.lineage_of(config.served_model_dir, version)
    except FileNotFoundError:
        lineage = {}
    threshold, _ = threshold_of(lineage.get("export"))
    reference = performance_reference.read_reference(version_dir, config.dataset)
    test = own_test_metric(metric, reference, lineage, label.column, threshold, performance.resamples, performance.seed)
    if reference is None:
        estimated: Record = {"value": None, "reason": performance_reference.missing(version)}
    else:
        estimated = estimate(config.dataset, metric, reference, served, threshold, performance.seed)

    folder = report_folder(config, end)
    summary |= {
        "version": version,
        "versions_seen": seen,
        "status": CHECKED,
        "reason": None,
        "rows": len(served),
        "labelled": len(labelled),
        "label_coverage": len(labelled) / len(served) if len(served) else None,
        "metric": metric,
        "threshold": threshold if label.task == Task.classification else None,
        "realized": None,
        "estimated": estimated,
        "test": test,
        "difference": None,
        "degraded": False,
        "calibration_error": None,
        "prediction_bias": None,
        "checked_at": checked_at,
        "report": str(folder / SUMMARY_FILE),
    }
    if len(labelled) < performance.min_labels:
        summary |= {"status": NO_VERDICT, "reason": f"{len(labelled)} labelled rows in the window, fewer than performance.min_labels={performance.min_labels}"}
    else:
        realized = realized_metrics(config, labelled, threshold)
        summary |= {
            "realized": {"value": realized["value"], "interval": realized["interval"], "confidence": realized["confidence"], "se": realized["se"]},
            "calibration_error": realized["calibration_error"],
            "prediction_bias": realized["prediction_bias"],
        }
        if realized["value"] is None or realized["se"] is None:
            classes = np.unique(labelled[label.column])
            only = f"only class {classes[0]:g} among the {len(labelled)} labelled rows: " if classes.size == 1 else ""
            summary |= {"status": NO_VERDICT, "reason": f"{only}{metric} is undefined"}
        elif test["value"] is None:
            summary |= {"status": NO_VERDICT, "reason": f"version {version} has no test {metric} to compare with (no {PERFORMANCE_REFERENCE_FILE}, none in its lineage)"}
        else:
            tested = drop_test(metric, realized["value"], realized["se"], test["value"], test["se"] or 0.0, performance.false_alarm_rate, performance.min_drop)
            summary |= {"difference": {k: v for k, v in tested.items() if k != "degraded"}, "degraded": tested["degraded"]}
    write_json(folder / SUMMARY_FILE, summary)  # atomic: written beside, then renamed
    log.info("%s version %d, %s to %s: %s", config.served_model, version, summary["start"], summary["end"], verdict(summary))
    emit(config.metrics, config.identity, "performance", performance_samples(summary))
    return summary


def verdict(summary: Record) -> str:
    """The window's verdict in one sentence."""
    if summary["status"] != CHECKED:
        return f"no verdict: {summary['reason']}"
    realized, test, difference, metric = summary["realized"], summary["test"], summary["difference"], summary["metric"]
    low, high = realized["interval"]
    said = (
        f"{metric} {realized['value']:.4f} [{low:.4f}, {high:.4f}] on {summary['labelled']} labelled rows against the test's "
        f"{test['value']:.4f} (se {test['se']:.4f}): difference {difference['value']:+.4f}, upper bound {difference['upper']:+.4f}, "
        f"p {difference['p_value']:.2g}"
    )
    if summary["degraded"]:
        return f"degraded: {said} (below -min_drop {difference['min_drop']:g} at false-alarm rate {difference['false_alarm_rate']:g})"
    return f"no significant drop: {said}"


def performance_samples(summary: Record) -> list[Sample]:
    """The Prometheus samples of a window's ``summary``; a value the window does not have is left out."""
    metric = {"metric": summary["metric"]}
    values: list[tuple[str, str, float | None, dict[str, str]]] = [
        ("flywheel_performance_window_rows", "Rows the served version answered in the latest performance window.", summary["rows"], {}),
        ("flywheel_performance_labelled_rows", "Of them, rows whose ground truth came back.", summary["labelled"], {}),
        ("flywheel_performance_label_coverage", "Labelled rows / served rows of the latest window.", summary["label_coverage"], {}),
        ("flywheel_performance_degraded", "1 if the latest window's realized metric is below the version's test metric beyond noise.", float(summary["degraded"]), {}),
        ("flywheel_performance_test", "The served version's metric on its own test split.", summary["test"]["value"], metric),
        ("flywheel_performance_calibration_error", "Expected calibration error (10 bins) of the latest window's labelled rows.", summary["calibration_error"], {}),
        ("flywheel_performance_window_end_timestamp_seconds", "End of the latest performance window.", datetime.fromisoformat(summary["end"]).timestamp(), {}),
    ]
    if summary["realized"]:
        low, high = summary["realized"]["interval"] or (None, None)
        values += [
            ("flywheel_performance_realized", "The gate metric on the latest window's labelled rows.", summary["realized"]["value"], metric),
            ("flywheel_performance_realized_lower", "Lower bound of its bootstrap interval.", low, metric),
            ("flywheel_performance_realized_upper", "Upper bound of its bootstrap interval.", high, metric),
        ]
    if summary["prediction_bias"]:
        values.append(("flywheel_performance_prediction_bias", "Mean prediction minus the observed rate (or mean target) on the labelled rows.", summary["prediction_bias"]["difference"], {}))
    if summary["difference"]:
        values.append(("flywheel_performance_p_value", "P-value of no drop below the test metric (one-sided).", summary["difference"]["p_value"], metric))
    estimated = summary["estimated"]
    if estimated.get("value") is not None:
        values.append(("flywheel_performance_estimated", "The gate metric estimated from the served scores (CBPE or DLE).", estimated["value"], {**metric, "method": estimated["method"]}))
    return [Sample(name, text, float(value), labels) for name, text, value, labels in values if value is not None]


def decide(config: ProjectConfig, summary: Record, last_trigger_at: datetime | None, retrains_active: int, run_type: str, now: datetime) -> Record:
    """Whether a window's ``summary`` starts a retrain (by emitting ``performance_degraded``):
    ``{"trigger", "reason", "extra"}``. Only a degraded window does, and then with the brakes of
    drift (``trigger.brake``): not from a backfill, not while a retrain is queued or running
    (``retrains_active``), at most once per ``monitoring.cooldown_hours`` since
    ``last_trigger_at``. ``extra`` (the Asset event's) names the project, model, version, window,
    metric, realized value and interval, test value, p-value and report; None without a verdict."""
    if summary.get("status") != CHECKED:
        return {"trigger": False, "reason": f"no verdict: {summary.get('reason')}", "extra": None}
    said = verdict(summary)
    extra = {
        "project": summary["project"],
        "model": summary["model"],
        "version": summary["version"],
        "window": {"start": summary["start"], "end": summary["end"]},
        "metric": summary["metric"],
        "realized": summary["realized"]["value"],
        "interval": summary["realized"]["interval"],
        "test": summary["test"]["value"],
        "p_value": summary["difference"]["p_value"],
        "report": summary["report"],
    }
    if not summary["degraded"]:
        return {"trigger": False, "reason": said, "extra": extra}
    decision = brake(said, "performance", last_trigger_at=last_trigger_at, retrains_active=retrains_active, run_type=run_type, now=now, cooldown_hours=config.monitoring.cooldown_hours)
    return {**decision, "extra": extra}
