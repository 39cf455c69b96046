"""The steps of the drift DAG, one function a task, each with plain arguments and a small
JSON-able result. The project is the one in ``$FLYWHEEL_HOME`` (see ``pipelines.config``).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from pipelines.config import load_config

# The Airflow Asset the drift DAG emits and the retrain DAG is scheduled on.
DRIFT_DETECTED = "drift_detected"


def check(start: str | None, end: str) -> dict:
    """Check the requests served in the window ``[start, end)`` (ISO times) for drift; with no
    start (a run triggered without a logical date has no data interval), the hour before ``end``."""
    from pipelines.monitoring.check import check_window

    until = datetime.fromisoformat(end)
    since = datetime.fromisoformat(start) if start else until - timedelta(hours=1)
    return check_window(load_config(), since, until)


def decide(summary: dict, last_trigger_at: str | None, retrains_active: int, run_type: str) -> dict:
    """Whether this window's drift should start a retrain; the event's extra when it should."""
    from pipelines.monitoring.trigger import decide as verdict

    config = load_config()
    decision = verdict(
        summary,
        last_trigger_at=datetime.fromisoformat(last_trigger_at) if last_trigger_at else None,
        retrains_active=retrains_active,
        run_type=run_type,
        now=datetime.now(timezone.utc),
        cooldown_hours=config.monitoring.cooldown_hours,
    )
    if decision["trigger"]:
        decision["extra"] = {
            "model": summary["model"],
            "version": summary["version"],
            "window_end": summary["window"]["end"],
            "report": summary["report"],
            "share": summary["share"],
            "columns": summary["drifted_columns"],
        }
    return decision
