"""What the on-call pages show, shaped from the project's own files.

Pure functions turn one record (a drift summary, a version's lineage, a line of the serving
history) into the plain dicts the pages and the JSON endpoints return; the ``load_*``
functions read the project in ``$FLYWHEEL_HOME`` through ``pipelines`` and call them.

``pipelines`` modules are imported inside the loaders: Airflow imports every plugin in every
process it starts (each task included), and they pull in pandas and numpy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The name of a report folder: the window's end, as ``pipelines.monitoring.check.FOLDER_TIME``
# writes it. The only thing a URL may name; never a path.
REPORT_FOLDER = re.compile(r"\d{8}T\d{6}Z")


class NotFound(LookupError):
    """No such report, or a name that is not a report folder's."""


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
    """Challenger against champion, metric by metric, the one the gate decides on first."""
    challenger = gate.get("challenger") or {}
    champion = gate.get("champion") or {}
    deciding = gate.get("metric")
    names = sorted(set(challenger) | set(champion), key=lambda name: (name != deciding, name))
    return [
        {"metric": name, "challenger": challenger.get(name), "champion": champion.get(name), "deciding": name == deciding}
        for name in names
    ]


def version_row(version: int, lineage: dict, served: int | None) -> dict[str, Any]:
    """One version of the model repository with the gate decision that let it in and where it came from."""
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
        "champion_version": gate.get("champion_version"),
        "data_version": dict(lineage.get("data_version") or {}),
        "code_version": lineage.get("code_version"),
        "dag_id": airflow.get("dag_id"),
        "run_id": airflow.get("run_id"),
        "run_type": airflow.get("run_type"),
        "trigger": (airflow.get("trigger") or {}).get("kind"),
        "candidate": lineage.get("candidate"),
    }


def run_row(record: dict) -> dict[str, Any]:
    """One retrain run's publish record: its gate decision, and the version it made, if any."""
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
        "champion_version": gate.get("champion_version"),
        "version": record.get("version"),
        "live": (record.get("live") or {}).get("event"),
    }


def history_rows(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The serving history (publish, rollback, rejected), newest first.

    A line that is not JSON (a write cut short) is shown as such rather than hiding the rest.
    """
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = {"event": "unreadable", "reason": f"line {number} of the history is not JSON"}
        events.append(
            {
                "time": entry.get("time"),
                "event": entry.get("event"),
                "version": entry.get("version"),
                "previous": entry.get("previous"),
                "run_id": entry.get("run_id"),
                "reason": entry.get("reason"),
                "switch_seconds": entry.get("switch_seconds"),
            }
        )
    return events[::-1]


def load_drift(config, limit: int) -> dict[str, Any]:
    """The Drift page: the latest checked windows of the model, newest first."""
    from pipelines.monitoring.check import recent_reports, reports_root
    from pipelines.serving import repository

    return {
        "model": config.model.name,
        "served_version": repository.served_version(config.model_dir),
        "drift_share": config.monitoring.drift_share,
        "reports_dir": str(reports_root(config)),
        "reports": [drift_row(s) for s in recent_reports(config, limit)],
    }


def load_report(config, folder: str) -> dict[str, Any]:
    """One report's summary with its per-column table; ``NotFound`` for anything else."""
    from pipelines.lineage import read_json
    from pipelines.monitoring.check import SUMMARY_FILE, reports_root

    summary_file = report_dir(reports_root(config), folder) / SUMMARY_FILE
    if not summary_file.is_file():
        raise NotFound(f"drift report {folder} has no {SUMMARY_FILE}")
    summary = read_json(summary_file)
    return {**drift_row(summary), "report": folder, "columns": column_rows(summary), "summary": summary}


def report_html(config, folder: str) -> Path:
    """Evidently's HTML of one report; ``NotFound`` for anything else."""
    from pipelines.monitoring.check import REPORT_FILE, reports_root

    path = report_dir(reports_root(config), folder) / REPORT_FILE
    if not path.is_file():
        raise NotFound(f"drift report {folder} has no {REPORT_FILE}")
    return path


def load_models(config, runs_limit: int = 20) -> dict[str, Any]:
    """The Models page: the versions (newest first), the serving history, the latest retrain runs."""
    from pipelines.lineage import read_json
    from pipelines.serving import live, repository
    from pipelines.serving.publish import runs_dir

    model_dir = config.model_dir
    served = repository.served_version(model_dir)
    versions = [version_row(v, repository.lineage_of(model_dir, v), served) for v in reversed(repository.versions(model_dir))]
    history_file = live.history_path(config)
    history = history_rows(history_file.read_text().splitlines()) if history_file.is_file() else []
    records = [read_json(p) for p in runs_dir(config).glob("*.json")]  # every retrain run, promoted or not
    runs = sorted((run_row(r) for r in records), key=lambda r: r["created_at"] or "", reverse=True)
    return {
        "model": config.model.name,
        "served_version": served,
        "gate": {"metric": config.gate.metric, "min_improvement": config.gate.min_improvement, "floor": config.gate.floor},
        "versions": versions,
        "history": history,
        "runs": runs[:runs_limit],
    }
