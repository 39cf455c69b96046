"""What the on-call pages show, shaped from the files of the deployment's projects.

Pure functions turn one record (a drift summary, a version's lineage, a line of the serving
history, a project's summary) into the plain dicts the pages and the JSON endpoints return;
the ``load_*`` functions read one project of the deployment in ``$FLYWHEEL_HOME`` (its
``AnyProject`` config, tabular or text) through ``pipelines`` and call them.

``pipelines`` modules are imported inside the loaders: Airflow imports every plugin in every
process it starts (each task included), and they pull in pandas and numpy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

TABULAR, TEXT = "tabular", "text"  # pipelines.config.ProjectKind's values (a str enum: equal to these)

# The name of a report folder: the window's end, as ``pipelines.monitoring.check.FOLDER_TIME``
# writes it. The only thing a URL may name; never a path.
REPORT_FOLDER = re.compile(r"\d{8}T\d{6}Z")
SLICES_SHOWN = 5  # slices a gate decision shows at once; the others fold away
PERFORMANCE_WINDOWS = 90  # the latest performance windows the Models page charts (90 days of daily ones)


class NotFound(LookupError):
    """No such report, or a name that is not a report folder's."""


def kind_name(kind) -> str:
    """``tabular`` or ``text``, from a ``ProjectKind`` or its value."""
    return str(getattr(kind, "value", kind))


def dag_ids(project: str, kind) -> dict[str, str]:
    """The DAGs whose read permission guards a project's pages: ``models`` (the DAG that
    publishes its versions: ``retrain__<project>``, or ``finetune__<project>`` for a text
    project) and ``drift`` (``drift__<project>``, for either kind)."""
    return {"models": f"{'finetune' if kind_name(kind) == TEXT else 'retrain'}__{project}", "drift": f"drift__{project}"}


def latest_drift(summary: dict | None) -> dict[str, Any] | None:
    """The newest checked window of a project as its index row shows it; None without one."""
    if not summary:
        return None
    return {
        "report": report_name(summary),
        "window_end": (summary.get("window") or {}).get("end"),
        "dataset_drift": bool(summary.get("dataset_drift")),
        "share": summary.get("share"),
        "drift_share": summary.get("drift_share"),
    }


def project_row(
    name: str,
    kind,
    *,
    models: bool,
    drift: bool,
    served_model: str | None = None,
    served_version: int | None = None,
    latest: dict | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """One project of the index. ``models``/``drift``: whether the caller may read that page;
    what they may not read is left out (None), so the row never says more than the pages would.
    ``latest``: the newest drift summary; ``error``: why the project could not be read."""
    kind = kind_name(kind)
    return {
        "name": name,
        "kind": kind,
        "dags": dag_ids(name, kind),
        "models": models,
        "drift": drift,
        "served_model": served_model,
        "served_version": served_version if models else None,
        "latest_drift": latest_drift(latest) if drift else None,
        "error": error,
    }


def report_dir(reports_root: Path, folder: str) -> Path:
    """The folder of one drift report of a model, given only its name.

    Refuses anything that is not a ``YYYYmmddTHHMMSSZ`` folder directly inside
    ``reports_root`` (``..``, slashes, absolute paths, a symlink leading elsewhere).
    """
    if not REPORT_FOLDER.fullmatch(folder):
        raise NotFound(f"{folder!r} is not a drift report name (YYYYmmddTHHMMSSZ)")
    root = reports_root.resolve()
    path = (root / folder).resolve()
    if path.parent != root or not path.is_dir():
        raise NotFound(f"no drift report {folder} under {root}")
    return path


def report_name(summary: dict) -> str | None:
    """The report folder a summary was written to (its ``report`` file's folder), if it is one."""
    report = summary.get("report")
    name = Path(report).parent.name if report else ""
    return name if REPORT_FOLDER.fullmatch(name) else None


def drift_row(summary: dict) -> dict[str, Any]:
    """One checked window as the Drift page lists it."""
    rows = summary.get("rows") or {}
    return {
        "report": report_name(summary),
        "model": summary.get("model"),
        "window_start": summary["window"]["start"],
        "window_end": summary["window"]["end"],
        "checked_at": summary.get("checked_at"),
        "dataset_drift": bool(summary.get("dataset_drift")),
        "share": summary.get("share"),
        "drift_share": summary.get("drift_share"),
        "drifted_columns": list(summary.get("drifted_columns") or []),
        "columns_checked": len(summary.get("columns") or []),
        "version": summary.get("version"),
        "versions_seen": list(summary.get("versions_seen") or []),
        "rows_current": rows.get("current"),
        "rows_reference": rows.get("reference"),
    }


def column_rows(summary: dict) -> list[dict[str, Any]]:
    """The per-column tests of a window, drifted columns first, otherwise in the checked order."""
    columns = summary.get("columns") or []
    return sorted(columns, key=lambda c: not c.get("drifted"))


def gate_metrics(gate: dict) -> list[dict[str, Any]]:
    """Challenger against champion (and, for a text project, against the untuned ``base`` with a
    linear head), metric by metric, the one the gate decides on first. A classifier's
    ``threshold`` is a row like the metrics; its ``threshold_source`` (text) is not."""
    challenger = gate.get("challenger") or {}
    champion = gate.get("champion") or {}
    base = gate.get("base") or {}
    deciding = gate.get("metric")
    named = {name for record in (challenger, champion, base) for name, value in record.items() if not isinstance(value, str)}
    names = sorted(named, key=lambda name: (name != deciding, name))
    return [
        {
            "metric": name,
            "challenger": challenger.get(name),
            "champion": champion.get(name),
            "base": base.get(name),
            "deciding": name == deciding,
        }
        for name in names
    ]


def threshold_sources(gate: dict) -> dict[str, str]:
    """Where each model's decision threshold came from (``export``, or ``default``: 0.5 for a
    model exported before thresholds were chosen), by role; empty for a regression or text gate."""
    roles = ((role, gate.get(role)) for role in ("challenger", "champion"))
    return {role: metrics["threshold_source"] for role, metrics in roles if isinstance(metrics, dict) and "threshold_source" in metrics}


def slice_row(entry: dict) -> dict[str, Any]:
    """One slice of a gate's comparison: both models' metric on its rows, the difference
    (positive: the challenger is better) with its interval, refused or not, or why it was skipped."""
    interval = entry.get("interval") or {}
    return {
        "slice": entry.get("slice"),
        "rows": entry.get("rows"),
        "challenger": entry.get("challenger"),
        "champion": entry.get("champion"),
        "difference": entry.get("difference"),
        "low": interval.get("low"),
        "high": interval.get("high"),
        "refused": bool(entry.get("refused")),
        "skipped": entry.get("skipped"),
    }


def gate_comparison(gate: dict) -> dict[str, Any] | None:
    """The paired comparison a tabular gate made (``pipelines.evaluation.gate.compare``): the
    difference in the deciding metric (positive: the challenger is better) with its interval,
    and the slices: refused first, then by the upper bound of their interval (the nearest to a
    refusal first), the skipped last. ``shown``: what a version shows at once (every refused
    slice, at least ``SLICES_SHOWN``); ``more``: the rest. None for a gate without an interval
    (no champion, a text project's, one recorded before the gate tested significance)."""
    interval = gate.get("interval")
    if not isinstance(interval, dict):
        return None
    entries = [entry for entry in gate.get("slices") or [] if isinstance(entry, dict)]
    scored = sorted((e for e in entries if not e.get("skipped")), key=lambda e: (not e.get("refused"), (e.get("interval") or {}).get("high", math.inf)))
    skipped = [e for e in entries if e.get("skipped")]
    refused = sum(bool(e.get("refused")) for e in scored)
    rows = [slice_row(e) for e in scored + skipped]
    shown = max(refused, SLICES_SHOWN)
    return {
        "difference": gate.get("difference"),
        "low": interval.get("low"),
        "high": interval.get("high"),
        "confidence": gate.get("confidence"),
        "resamples": gate.get("resamples"),
        "method": gate.get("method"),
        "slice_confidence": gate.get("slice_confidence"),
        "slices": len(entries),
        "refused": refused,
        "skipped": len(skipped),
        "shown": rows[:shown],
        "more": rows[shown:],
    }


def _finite(value: Any) -> float | None:
    """A number of a summary as a float; None for null, NaN, infinity or anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def performance_window(summary: dict) -> dict[str, Any]:
    """One performance window as the Models page charts it, from the ``summary.json``
    ``pipelines.feedback.performance.evaluate_window`` writes: the realized gate metric with its
    interval (None below ``performance.min_labels`` labels), the estimated one (None, with the
    reason, where it could not be), the version's test metric, the verdict, label coverage.

    ``KeyError`` without ``start``, ``end`` or ``metric``; ``ValueError`` if a time is not ISO 8601.
    """
    for key in ("start", "end"):
        datetime.fromisoformat(summary[key])
    realized = summary.get("realized") or {}
    interval = realized.get("interval") or [None, None]
    estimated = summary.get("estimated") or {}
    difference = summary.get("difference") or {}
    bias = summary.get("prediction_bias") or {}
    return {
        "start": summary["start"],
        "end": summary["end"],
        "metric": summary["metric"],
        "version": summary.get("version"),
        "status": summary.get("status"),
        "reason": summary.get("reason"),
        "rows": summary.get("rows"),
        "labelled": summary.get("labelled"),
        "label_coverage": _finite(summary.get("label_coverage")),
        "realized": _finite(realized.get("value")),
        "realized_low": _finite(interval[0]) if len(interval) == 2 else None,
        "realized_high": _finite(interval[1]) if len(interval) == 2 else None,
        "confidence": _finite(realized.get("confidence")),
        "estimated": _finite(estimated.get("value")),
        "estimated_method": estimated.get("method"),
        "estimated_reason": estimated.get("reason"),
        "test": _finite((summary.get("test") or {}).get("value")),
        "degraded": bool(summary.get("degraded")),
        "p_value": _finite(difference.get("p_value")),
        "calibration_error": _finite(summary.get("calibration_error")),
        "prediction_bias": _finite(bias.get("difference")),
        "checked_at": summary.get("checked_at"),
    }


def base_model_name(base: dict | str | None) -> str | None:
    """The checkpoint a text project's version was fine-tuned from: its lineage's ``base_model``
    is ``{"name", "sha256"}`` (``pipelines.finetune.train``); None for a tabular version."""
    return base.get("name") if isinstance(base, dict) else base


# pipelines.tracking's statuses of a run: on the MLflow server, in a store inside the candidate
# folder (the server did not answer), not tracked
LOGGED, LOCAL, OFF = "logged", "local", "off"


def tracking_link(tracking: dict | None) -> dict[str, Any] | None:
    """Where a training run's MLflow run is, from the ``tracking`` record of its lineage (or run
    record): ``{"status", "url", "run_id", "experiment_id", "detail"}``, ``url`` the MLflow UI's
    page of the run. ``url`` is None unless the run was ``logged`` to the server and its URL is
    an ``http(s)`` one (a page never links anything else); None without a record (a version
    published before tracking) or for tracking ``off``. Any other status is kept as written,
    without a link, so the page shows it rather than hiding it."""
    if not isinstance(tracking, dict) or tracking.get("status") in (None, OFF):
        return None
    status = str(tracking["status"])
    url = tracking.get("url")
    linked = status == LOGGED and isinstance(url, str) and url.startswith(("http://", "https://"))
    return {
        "status": status,
        "url": url if linked else None,
        "run_id": tracking.get("run_id"),
        "experiment_id": tracking.get("experiment_id"),
        "detail": str(tracking.get("detail") or ""),
    }


def version_row(version: int, lineage: dict, served: int | None) -> dict[str, Any]:
    """One version of the model repository with the gate decision that let it in, where it came
    from, and ``tracking``: its training run in MLflow (``tracking_link``; None if not tracked)."""
    gate = lineage.get("gate") or {}
    airflow = lineage.get("airflow") or {}
    return {
        "version": version,
        "serving": version == served,
        "status": lineage.get("status", "published"),
        "rejected_reason": lineage.get("rejected_reason"),
        "created_at": lineage.get("created_at"),
        "decision": gate.get("decision"),
        "reason": gate.get("reason"),
        "forced": bool(gate.get("forced")),
        "metric": gate.get("metric"),
        "metrics": gate_metrics(gate),
        "threshold_sources": threshold_sources(gate),
        "comparison": gate_comparison(gate),
        "champion_version": gate.get("champion_version"),
        "data_version": dict(lineage.get("data_version") or {}),
        "code_version": lineage.get("code_version"),
        "dag_id": airflow.get("dag_id"),
        "run_id": airflow.get("run_id"),
        "run_type": airflow.get("run_type"),
        "trigger": (airflow.get("trigger") or {}).get("kind"),
        "candidate": lineage.get("candidate"),
        "base_model": base_model_name(lineage.get("base_model")),
        "tracking": tracking_link(lineage.get("tracking")),
    }


def run_row(record: dict) -> dict[str, Any]:
    """One training run's record (retrain or finetune): its gate decision, the version it made, if
    any, and its MLflow run (``tracking_link``): a refused challenger's curves are there."""
    gate = record.get("gate") or {}
    airflow = record.get("airflow") or {}
    return {
        "created_at": record.get("created_at"),
        "run_id": airflow.get("run_id"),
        "trigger": (airflow.get("trigger") or {}).get("kind"),
        "decision": gate.get("decision"),
        "reason": gate.get("reason"),
        "forced": bool(gate.get("forced")),
        "metrics": gate_metrics(gate),
        "threshold_sources": threshold_sources(gate),
        "comparison": gate_comparison(gate),
        "champion_version": gate.get("champion_version"),
        "version": record.get("version"),
        "live": (record.get("live") or {}).get("event"),
        "tracking": tracking_link(record.get("tracking")),
    }


def history_rows(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The serving history (publish, rollback, rejected), newest first.

    A line that is not a JSON object (a write cut short) is shown as such rather than hiding the
    rest (``history_entries``).
    """
    keys = ("time", "event", "version", "previous", "run_id", "reason", "switch_seconds")
    return [{key: entry.get(key) for key in keys} for entry in reversed(history_entries(lines))]


# --- loaders: the deployment's projects ---------------------------------------------------------


def load_index(home: Path, may_read: Callable[[str], bool]) -> dict[str, Any]:
    """The index: every project of the deployment in ``home`` whose models or drift DAG
    ``may_read`` allows (by DAG id), by name, each with what the caller may see of it.

    A project that cannot be read (an invalid params.yaml, an unreadable file) keeps its row,
    with the error instead of its data: one broken project does not hide the others.
    """
    from pipelines.config import PROJECTS_DIR, load_project, project_kinds

    rows = []
    for name, kind in project_kinds(home).items():
        dags = dag_ids(name, kind)
        models, drift = may_read(dags["models"]), may_read(dags["drift"])
        if not (models or drift):
            continue
        try:
            rows.append(load_project_row(load_project(name, home), models=models, drift=drift))
        except Exception as error:  # noqa: BLE001 - shown in its row, with its type
            rows.append(project_row(name, kind, models=models, drift=drift, error=f"{type(error).__name__}: {error}"))
    return {"home": str(home), "projects_dir": str(Path(home) / PROJECTS_DIR), "projects": rows}


# --- loaders: one project of the deployment ----------------------------------------------------


def reports_root(config) -> Path:
    """Where the drift reports of a project's served model are, one folder a window."""
    from pipelines.monitoring.check import reports_root as root

    return root(config.monitoring, config.served_model)


def recent_summaries(config, limit: int) -> list[dict]:
    """The summaries of the project's latest ``limit`` checked windows, newest first."""
    from pipelines.monitoring.check import recent_reports

    return recent_reports(config.monitoring, config.served_model, limit)


def _project(config) -> dict[str, Any]:
    kind = kind_name(config.kind)
    return {"project": config.name, "kind": kind, "dags": dag_ids(config.name, kind), "model": config.served_model}


def load_project_row(config, *, models: bool, drift: bool) -> dict[str, Any]:
    """A project's row of the index: its served version (if the caller may read its models) and
    newest drift verdict (if the caller may read its drift), read from the project's files."""
    from pipelines.serving import repository

    return project_row(
        config.name,
        config.kind,
        models=models,
        drift=drift,
        served_model=config.served_model,
        served_version=repository.served_version(config.served_model_dir) if models else None,
        latest=next(iter(recent_summaries(config, 1)), None) if drift else None,
    )


def load_drift(config, limit: int) -> dict[str, Any]:
    """The Drift page of a project: the latest checked windows of its served model, newest first.
    A project of a kind without a drift check (text, for now) shows none rather than failing."""
    from pipelines.serving import repository

    return {
        **_project(config),
        "served_version": repository.served_version(config.served_model_dir),
        "drift_share": config.monitoring.drift_share,
        "reports_dir": str(reports_root(config)),
        "reports": [drift_row(s) for s in recent_summaries(config, limit)],
    }


def load_report(config, folder: str) -> dict[str, Any]:
    """One report's summary with its per-column table; ``NotFound`` for anything else."""
    from pipelines.artifacts import SUMMARY_FILE
    from pipelines.lineage import read_json

    summary_file = report_dir(reports_root(config), folder) / SUMMARY_FILE
    if not summary_file.is_file():
        raise NotFound(f"drift report {folder} has no {SUMMARY_FILE}")
    summary = read_json(summary_file)
    return {**_project(config), **drift_row(summary), "report": folder, "columns": column_rows(summary), "summary": summary}


def report_html(config, folder: str) -> Path:
    """Evidently's HTML of one report; ``NotFound`` for anything else."""
    from pipelines.artifacts import REPORT_FILE

    path = report_dir(reports_root(config), folder) / REPORT_FILE
    if not path.is_file():
        raise NotFound(f"drift report {folder} has no {REPORT_FILE}")
    return path


def card_html(config, version: int) -> Path:
    """The model card (HTML) written beside ``version`` of a project's served model
    (``pipelines.serving.model_card``); ``NotFound`` saying why when there is none."""
    from pipelines.serving import repository
    from pipelines.serving.model_card import CARD_HTML

    model_dir = config.served_model_dir
    versions = repository.versions(model_dir)
    if version not in versions:
        raise NotFound(f"{config.name} has no version {version} of {config.served_model}; its versions are {versions}")
    path = model_dir / str(version) / CARD_HTML
    if not path.is_file():
        raise NotFound(f"version {version} of {config.served_model} has no model card yet: the rollout DAG writes one ({CARD_HTML}) before it asks for an approval")
    return path


def performance_root(config) -> Path:
    """Where the performance summaries of a tabular project's served model are, one folder a
    window (``pipelines.feedback.performance.report_folder``'s parent)."""
    return Path(config.performance.reports_dir) / config.served_model


def load_performance(config, limit: int = PERFORMANCE_WINDOWS) -> dict[str, Any]:
    """The latest ``limit`` performance windows of a tabular project's served model, oldest
    first (``performance_window``), from ``performance_root``'s ``<window end>/summary.json``.
    A summary that cannot be read is named in ``unreadable`` with why, not charted: one torn
    file does not hide the others."""
    from pipelines.artifacts import SUMMARY_FILE
    from pipelines.lineage import read_json

    root = performance_root(config)
    folders = sorted(p for p in root.iterdir() if REPORT_FOLDER.fullmatch(p.name) and (p / SUMMARY_FILE).is_file()) if root.is_dir() else []
    windows, unreadable = [], []
    for folder in folders[-limit:]:
        try:
            windows.append(performance_window(read_json(folder / SUMMARY_FILE)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            unreadable.append(f"{folder.name}/{SUMMARY_FILE}: {type(error).__name__}: {error}")
    return {
        "reports_dir": str(root),
        "window_hours": config.performance.window_hours,
        "min_labels": config.performance.min_labels,
        "false_alarm_rate": config.performance.false_alarm_rate,
        "windows": windows,
        "unreadable": unreadable,
    }


def promotion_rule(config) -> dict[str, Any]:
    """What a candidate must pass to become a version: ``{"gate": ...}``, a tabular project's
    gate settings (the metric, the least improvement at the lower bound of the interval and the
    interval's level, the largest regression on a slice, the floor), or ``{"finetune": ...}``, a
    text project's margins (over the untuned base with a linear head, over the champion; the
    metric is in each version's gate record)."""
    if kind_name(config.kind) == TEXT:
        settings = config.finetune
        return {"finetune": {"min_gain_over_base": settings.min_gain_over_base, "min_improvement": settings.min_improvement}}
    gate = config.gate
    return {
        "gate": {
            "metric": gate.metric,
            "min_improvement": gate.min_improvement,
            "floor": gate.floor,
            "confidence": gate.confidence,
            "max_slice_regression": gate.max_slice_regression,
        }
    }


def load_models(config, runs_limit: int = 20) -> dict[str, Any]:
    """The Models page of a project: the versions of its served model (newest first, each with
    ``card``: whether a model card was written beside it), the serving history, the latest
    training runs (retrain or finetune), promoted or not, and a tabular project's performance
    windows (``load_performance``; None for a text project)."""
    from pipelines.lineage import read_json
    from pipelines.serving import live, repository
    from pipelines.serving.model_card import CARD_HTML
    from pipelines.serving.publish import runs_dir

    model_dir = config.served_model_dir
    served = repository.served_version(model_dir)
    versions = [{**version_row(v, repository.lineage_of(model_dir, v), served), "card": (model_dir / str(v) / CARD_HTML).is_file()} for v in reversed(repository.versions(model_dir))]
    history_file = live.history_path(config.artifacts_dir, config.served_model)
    history = history_rows(history_file.read_text().splitlines()) if history_file.is_file() else []
    records = [read_json(p) for p in runs_dir(config.artifacts_dir).glob("*.json")]  # every training run, promoted or not
    runs = sorted((run_row(r) for r in records), key=lambda r: r["created_at"] or "", reverse=True)
    return {
        **_project(config),
        "served_version": served,
        **promotion_rule(config),
        "performance": None if kind_name(config.kind) == TEXT else load_performance(config),
        "versions": versions,
        "history": history,
        "runs": runs[:runs_limit],
    }


# --- the timeline of a project ------------------------------------------------------------------

TIMELINE_DAYS = 7  # the default range: the last week
TIMELINE_MAX_DAYS = 90
DRIFT_WINDOW = timedelta(hours=1)  # the drift DAG's window (hourly): the band of a window without a report
# Serving-history events that leave the served version unchanged: a rejected version never served,
# a line that could not be read says nothing.
NOT_SERVING = ("rejected", "unreadable")


def utc(value: str | datetime, name: str = "time") -> datetime:
    """``value`` (ISO 8601, or a datetime) as an aware UTC datetime; without an offset it is UTC.

    ``ValueError`` naming ``name`` and the expected form if it is not ISO 8601.
    """
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            raise ValueError(f"{name} {value!r} is not an ISO 8601 time (e.g. 2026-03-02T10:00:00+00:00)") from None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def folder_time(folder: str) -> datetime:
    """The window end a report folder names (``YYYYmmddTHHMMSSZ``), UTC; ``NotFound`` for any other name."""
    if not REPORT_FOLDER.fullmatch(folder):
        raise NotFound(f"{folder!r} is not a drift report name (YYYYmmddTHHMMSSZ, the window's end in UTC)")
    try:
        return datetime.strptime(folder, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise NotFound(f"{folder!r} is not a drift report name (YYYYmmddTHHMMSSZ, the window's end in UTC)") from None


def timeline_range(
    now: datetime, days: int | None = None, since: str | None = None, until: str | None = None, window: str | None = None
) -> tuple[datetime, datetime]:
    """The range a timeline shows, UTC: ``since``/``until`` (ISO 8601) where given, else the
    ``days`` (1 to ``TIMELINE_MAX_DAYS``, default ``TIMELINE_DAYS``) ending at ``until`` or ``now``
    (only ``since``: up to ``now``). With a ``window`` (a report folder) and neither ``since``
    nor ``until``, the range still ends ``now``, unless the window ended more than half the range
    ago: then the range is centred on it (an old window's link shows its neighbourhood, not months
    squeezed into one chart). ``ValueError`` naming the parameter for a time that is not ISO 8601,
    a ``days`` out of range, or a ``since`` not before ``until``; ``NotFound`` for a ``window``
    that is not a report folder's name."""
    days = TIMELINE_DAYS if days is None else days
    if not 1 <= days <= TIMELINE_MAX_DAYS:
        raise ValueError(f"days {days} is out of range: a timeline shows 1 to {TIMELINE_MAX_DAYS} days")
    if window is not None and not since and not until:
        now = min(utc(now), folder_time(window) + timedelta(days=days) / 2)
    end = utc(until, "until") if until else utc(now)
    start = utc(since, "since") if since else end - timedelta(days=days)
    if start >= end:
        raise ValueError(f"since {start.isoformat()} is not before until {end.isoformat()}")
    return start, end


def drift_window(summary: dict) -> dict[str, Any]:
    """One checked window as the timeline shows it: its Drift page row, each column's test
    (score, threshold, p-value, drifted, why) in the checked order, and ``run``: None, the
    retrain run it started, once something attaches it ({dag_id, run_id, url, state, outcome})."""
    columns = [
        {
            "column": c.get("column"),
            "score": _finite(c.get("score")),
            "threshold": _finite(c.get("threshold")),
            "p_value": _finite(c.get("p_value")),
            "drifted": bool(c.get("drifted")),
            "reason": c.get("reason"),
        }
        for c in summary.get("columns") or []
        if isinstance(c, dict)
    ]
    return {**drift_row(summary), "columns": columns, "run": None}


def history_entries(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Every entry of a serving history, oldest first, as written (with a rollout's challenger,
    mode and share); a line that is not JSON is an ``unreadable`` entry naming its line."""
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            entry = {"event": "unreadable", "reason": f"line {number} of the history is not a JSON object"}
        entries.append(entry)
    return entries


def _short(reason: str | None, limit: int = 40) -> str:
    reason = " ".join(str(reason or "").split())
    if len(reason) <= limit:
        return reason
    cut = reason[:limit]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut[: limit - 1]).rstrip(" ,;:") + "…"  # at a word's end


def event_label(entry: dict) -> str:
    """What the timeline writes beside a serving event: ``v3 promoted``, ``rollback to v2``,
    ``v4 rejected: smoke test``, ``v4 rolled out``, ``shadow v4``, ``canary v4 (10%)``, ``abort``.

    A rejection in the serving history is the smoke test's (``live.mark_rejected``): its reason,
    a long sentence, is shortened to ``smoke test`` where it names Triton, else cut to 40 characters.
    """
    event, version = entry.get("event"), entry.get("version")
    challenger = entry.get("challenger")
    if event == "publish":
        return f"v{version} promoted"
    if event == "rollback":
        return f"rollback to v{version}"
    if event == "rollout":
        return f"v{version} rolled out"
    if event == "rejected":
        reason = entry.get("reason") or ""
        return f"v{version} rejected: " + ("smoke test" if "Triton" in reason else _short(reason) or "no reason recorded")
    if event == "shadow":
        return f"shadow v{challenger}"
    if event == "canary":
        share = entry.get("share")
        return f"canary v{challenger}" + (f" ({100 * share:.0f}%)" if isinstance(share, int | float) else "")
    if event == "abort":
        return "rollout aborted" + (f", v{version} serves" if version is not None else "")
    if event == "unreadable":
        return "unreadable history line"
    return f"{event} v{version}"


def serving_event(entry: dict) -> dict[str, Any]:
    """One serving-history entry as the timeline marks it: time, event, versions, run, reason, label."""
    return {
        "time": entry.get("time"),
        "event": entry.get("event"),
        "version": entry.get("version"),
        "previous": entry.get("previous"),
        "challenger": entry.get("challenger"),
        "run_id": entry.get("run_id"),
        "reason": entry.get("reason"),
        "label": event_label(entry),
    }


def _when(entry: dict) -> datetime | None:
    try:
        return utc(entry["time"])
    except (KeyError, TypeError, ValueError):
        return None


def served_steps(entries: list[dict], since: datetime, until: datetime) -> list[dict[str, Any]]:
    """The served version over ``[since, until]`` as steps ``{"start", "end", "version"}`` (ISO
    times), from the serving history's entries (oldest first): the version the last serving event
    before ``since`` left, then one step per change. Rejected versions never serve; before the
    first serving event nothing is known to serve, so no step."""
    steps: list[dict[str, Any]] = []
    current: int | None = None
    start = since
    for entry in entries:
        moment, version = _when(entry), entry.get("version")
        if entry.get("event") in NOT_SERVING or moment is None or not isinstance(version, int):
            continue
        if moment > until:
            break
        if moment <= since:
            current = version
            continue
        if version != current:
            if current is not None:
                steps.append({"start": start.isoformat(), "end": moment.isoformat(), "version": current})
            current, start = version, moment
    if current is not None:
        steps.append({"start": start.isoformat(), "end": until.isoformat(), "version": current})
    return steps


def version_created(version: int, lineage: dict) -> dict[str, Any]:
    """A version's creation as the timeline marks it: when, the gate's decision and why, its run."""
    gate = lineage.get("gate") or {}
    airflow = lineage.get("airflow") or {}
    return {
        "version": version,
        "created_at": lineage.get("created_at"),
        "status": lineage.get("status", "published"),
        "decision": gate.get("decision"),
        "reason": gate.get("reason"),
        "forced": bool(gate.get("forced")),
        "dag_id": airflow.get("dag_id"),
        "run_id": airflow.get("run_id"),
    }


def _between(moment: str | None, since: datetime, until: datetime) -> bool:
    try:
        return moment is not None and since <= utc(moment) <= until
    except ValueError:
        return False


def _folders(root: Path, since: datetime, until: datetime) -> list[Path]:
    """The report folders under ``root`` whose window ends in ``[since, until]``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if REPORT_FOLDER.fullmatch(p.name) and since <= folder_time(p.name) <= until)


def _summaries(root: Path, since: datetime, until: datetime, shape: Callable[[dict], dict]) -> tuple[list[dict], list[str]]:
    """``shape`` of each summary under ``root`` in range, oldest first, and the ones that could
    not be read (``<folder>/summary.json: <error>``), named rather than hidden."""
    from pipelines.artifacts import SUMMARY_FILE
    from pipelines.lineage import read_json

    rows, unreadable = [], []
    for folder in _folders(root, since, until):
        path = folder / SUMMARY_FILE
        if not path.is_file():
            continue  # a window without a verdict writes no summary
        try:
            rows.append(shape(read_json(path)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            unreadable.append(f"{root.name}/{folder.name}/{SUMMARY_FILE}: {type(error).__name__}: {error}")
    return rows, unreadable


def highlight(folder: str, drift: list[dict], performance: list[dict]) -> dict[str, Any]:
    """The window ``folder`` names, to highlight: its start and end from the drift or performance
    window that ends then (``found``), else the drift DAG's hour ending then (``found`` False)."""
    end = folder_time(folder)
    # A folder is named by its window's end to the second; a manual run's window ends at a
    # fraction of one (its run_after), so the time is compared to the second.
    for kind, rows, start_key, end_key in (("drift", drift, "window_start", "window_end"), ("performance", performance, "start", "end")):
        for row in rows:
            if utc(row[end_key]).replace(microsecond=0) == end:
                return {"report": folder, "kind": kind, "start": utc(row[start_key]).isoformat(), "end": utc(row[end_key]).isoformat(), "found": True}
    return {"report": folder, "kind": None, "start": (end - DRIFT_WINDOW).isoformat(), "end": end.isoformat(), "found": False}


def load_timeline(config, since: datetime, until: datetime, window: str | None = None) -> dict[str, Any]:
    """A project's timeline over ``[since, until]`` (aware datetimes): its checked drift windows
    (``drift_window``, oldest first), the serving events (``serving_event``, oldest first), the
    served version as steps (``served_steps``), the versions created (``version_created``), and a
    tabular project's performance windows (``performance_window``; None for a text project).

    ``window``: a report folder name to highlight; the range widens to include it (``highlight``
    says whether a drift or performance window ends then). ``NotFound`` for a name that is not a
    report folder's. Summaries or history lines that cannot be read are listed in ``unreadable``.
    """
    from pipelines.serving import live, repository

    since, until = utc(since), utc(until)
    if window is not None:
        end = folder_time(window)
        since, until = min(since, end - DRIFT_WINDOW), max(until, end + timedelta(seconds=1))  # the folder's end drops fractions of a second
    drift, unreadable = _summaries(reports_root(config), since, until, drift_window)
    performance = None
    if kind_name(config.kind) != TEXT:
        windows, torn = _summaries(performance_root(config), since, until, performance_window)
        performance = {"windows": windows, "metric": windows[-1]["metric"] if windows else None}
        unreadable += torn
    marked = None
    if window is not None:  # a performance window may start earlier than the hour before its end
        marked = highlight(window, drift, performance["windows"] if performance else [])
        since = min(since, utc(marked["start"]))
    history_file = live.history_path(config.artifacts_dir, config.served_model)
    entries = history_entries(history_file.read_text().splitlines()) if history_file.is_file() else []
    unreadable += [e["reason"] for e in entries if e.get("event") == "unreadable"]
    events = [serving_event(e) for e in entries if e.get("event") != "unreadable" and _between(e.get("time"), since, until)]
    model_dir = config.served_model_dir
    created = []
    for version in repository.versions(model_dir):
        try:
            row = version_created(version, repository.lineage_of(model_dir, version))
        except (OSError, ValueError) as error:
            unreadable.append(f"version {version}'s lineage: {type(error).__name__}: {error}")
            continue
        if _between(row["created_at"], since, until):
            created.append(row)
    try:
        events += refused_challengers(config, since, until)
    except (OSError, ValueError) as error:  # a torn run record: the rest still shows
        unreadable.append(f"the training runs' records: {type(error).__name__}: {error}")
    events.sort(key=lambda e: e["time"] or "")
    return {
        **_project(config),
        "served_version": repository.served_version(model_dir),
        "drift_share": config.monitoring.drift_share,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "window": marked,
        "windows": drift,
        "columns": list(dict.fromkeys(c["column"] for w in drift for c in w["columns"])),
        "events": events,
        "served": served_steps(entries, since, until),
        "versions": sorted(created, key=lambda v: v["created_at"] or ""),
        "performance": performance,
        "unreadable": unreadable,
    }


def refused_challengers(config, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """The training runs in ``[since, until]`` whose challenger the gate did not promote (no
    version was made: they are not in the serving history), as timeline events ``not_promoted``
    at the champion that kept serving, labelled with the gate's reason."""
    from pipelines.evaluation.gate import NOT_PROMOTED
    from pipelines.serving.publish import run_records

    refused = []
    for record in run_records(config.artifacts_dir):
        gate = record.get("gate") or {}
        if gate.get("decision") == NOT_PROMOTED and _between(record.get("created_at"), since, until):
            refused.append(
                {
                    "time": record["created_at"], "event": "not_promoted", "version": gate.get("champion_version"), "previous": None,
                    "challenger": None, "run_id": (record.get("airflow") or {}).get("run_id"), "reason": gate.get("reason"),
                    "label": "challenger not promoted",
                }
            )
    return refused


def rollback_target(config) -> dict[str, Any] | None:
    """What "Roll back" on a project's timeline offers: ``{"served", "previous"}``, the version
    rows (``version_row``) of the serving version and of the one served before it (the serving
    history's, ``pipelines.serving.rollback.previous_served``); None when there is none to go back to."""
    from pipelines.serving import repository
    from pipelines.serving.rollback import RollbackRefused, previous_served

    model_dir = config.served_model_dir
    served = repository.served_version(model_dir)
    try:
        previous = previous_served(config)
    except RollbackRefused:
        return None
    if served is None or previous not in repository.versions(model_dir):
        return None
    return {v: version_row(n, repository.lineage_of(model_dir, n), served) for v, n in (("served", served), ("previous", previous))}
