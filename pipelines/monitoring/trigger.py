"""Whether a drift check should start a retrain (by emitting the ``drift_detected`` Asset).

Drift persists: every hourly window after the shift drifts too. Without a brake, each one
would queue another retrain on data that has not changed yet. So: no trigger while a
retrain is queued or running, at most one per ``monitoring.cooldown_hours``, and none from a
backfill (re-checking the past writes reports; it does not retrain today's model).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pipelines.lineage import Record


def decide(
    summary: Record,
    *,
    last_trigger_at: datetime | None,
    retrains_active: int,
    run_type: str,
    now: datetime,
    cooldown_hours: float,
) -> Record:
    """``{"trigger": bool, "reason": str}`` for the check ``summary`` of one window."""
    def verdict(trigger: bool, reason: str) -> Record:
        return {"trigger": trigger, "reason": reason}

    if summary.get("status") != "checked":
        return verdict(False, f"no verdict: {summary.get('reason')}")
    if not summary["dataset_drift"]:
        return verdict(False, f"no drift: share {summary['share']:.2f} below {summary['drift_share']:.2f}")
    drifted = f"drift: {', '.join(summary['drifted_columns'])} (share {summary['share']:.2f})"
    if run_type == "backfill":
        return verdict(False, f"{drifted}; a backfill reports, it does not retrain")
    if retrains_active:
        return verdict(False, f"{drifted}; a retrain is already queued or running")
    if last_trigger_at is not None and now - last_trigger_at < timedelta(hours=cooldown_hours):
        return verdict(False, f"{drifted}; the last drift-triggered retrain was at {last_trigger_at.isoformat()}, within the {cooldown_hours:g} h cooldown")
    return verdict(True, drifted)
