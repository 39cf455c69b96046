"""Whether a monitoring finding should start a retrain (by emitting its Asset: ``drift_detected``,
``performance_degraded``).

Drift persists, and so does a drop in performance: every window after the shift finds it too.
Without a brake, each one would queue another retrain on data that has not changed yet. So
(``brake``): no trigger while a retrain is queued or running, at most one per
``monitoring.cooldown_hours`` for each kind of finding, and none from a backfill (re-checking the
past writes reports; it does not retrain today's model).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pipelines.lineage import Record


def brake(
    finding: str,
    kind: str,
    *,
    last_trigger_at: datetime | None,
    retrains_active: int,
    run_type: str,
    now: datetime,
    cooldown_hours: float,
) -> Record:
    """``{"trigger": bool, "reason": str}`` for a ``finding`` (a sentence) that calls for a retrain:
    True unless the run is a backfill, a retrain is queued or running, or the last retrain this
    ``kind`` of finding (``drift``, ``performance``) started, at ``last_trigger_at``, is within the
    cooldown."""
    if run_type == "backfill":
        return {"trigger": False, "reason": f"{finding}; a backfill reports, it does not retrain"}
    if retrains_active:
        return {"trigger": False, "reason": f"{finding}; a retrain is already queued or running"}
    if last_trigger_at is not None and now - last_trigger_at < timedelta(hours=cooldown_hours):
        return {
            "trigger": False,
            "reason": f"{finding}; the last {kind}-triggered retrain was at {last_trigger_at.isoformat()}, within the {cooldown_hours:g} h cooldown",
        }
    return {"trigger": True, "reason": finding}


def decide(
    summary: Record,
    *,
    last_trigger_at: datetime | None,
    retrains_active: int,
    run_type: str,
    now: datetime,
    cooldown_hours: float,
) -> Record:
    """``{"trigger": bool, "reason": str}`` for the drift check ``summary`` of one window."""
    if summary.get("status") != "checked":
        return {"trigger": False, "reason": f"no verdict: {summary.get('reason')}"}
    if not summary["dataset_drift"]:
        return {"trigger": False, "reason": f"no drift: share {summary['share']:.2f} below {summary['drift_share']:.2f}"}
    drifted = f"drift: {', '.join(summary['drifted_columns'])} (share {summary['share']:.2f})"
    return brake(drifted, "drift", last_trigger_at=last_trigger_at, retrains_active=retrains_active, run_type=run_type, now=now, cooldown_hours=cooldown_hours)
