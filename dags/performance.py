"""
### performance__<project>

One DAG per tabular project: how well the served model does on production traffic, per window
of `performance.window_hours` (aligned to UTC midnight).

* At the end of each window (its data interval), and whenever `feedback__<project>` joins labels
  (the Asset `flywheel://<project>/labels_joined`, for every window that got labels), `check`
  writes `reports/performance/<model>/<window end>/summary.json`: the realized gate metric on
  the labelled rows with its bootstrap interval, calibration error, prediction bias and label
  coverage, and the metric estimated from the served scores alone (CBPE; DLE for regression)
  for the rows whose labels have not come back; metrics for Prometheus.
* `trigger_retrain` emits the Asset `flywheel://<project>/performance_degraded` when the
  realized metric is below the version's own test metric beyond noise (a one-sided test at
  `performance.false_alarm_rate`), which starts `retrain__<project>`. Not while a retrain is
  queued or running, at most once per `monitoring.cooldown_hours`, never from a backfill.
* The Models page charts realized and estimated performance per window; `docs/oncall.md`
  says what to do when `FlywheelPerformanceDegraded` pages.

All logic is in `pipelines.steps`; this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task

from pipelines.config import PerformanceConfig, ProjectKind, parsed_config, project_kinds, task_defaults
from pipelines.steps import LABELS_JOINED, PERFORMANCE_DEGRADED, project_asset


def performance_dag(project: str, window_hours: int):
    joined = Asset(project_asset(project, LABELS_JOINED))
    degraded = Asset(project_asset(project, PERFORMANCE_DEGRADED))

    @dag(
        dag_id=f"performance__{project}",
        schedule=AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(f"0 */{window_hours} * * *", timezone="UTC", interval=timedelta(hours=window_hours)),
            assets=[joined],
        ),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=task_defaults(max_retry_delay=timedelta(minutes=10)),
        tags=["flywheel", "monitoring", f"project:{project}"],
        doc_md=__doc__,
    )
    def performance():
        from pipelines import steps

        @task
        def check(data_interval_start=None, data_interval_end=None, dag_run=None, triggering_asset_events=None):
            events = [e.extra for events in (triggering_asset_events or {}).values() for e in events]
            start, end = data_interval_start, data_interval_end or dag_run.run_after
            return steps.run(steps.performance_check, project, start and start.isoformat(), end.isoformat(), events)

        @task(inlets=[degraded], outlets=[degraded])
        def trigger_retrain(summaries, ti=None, dag_run=None, inlet_events=None, outlet_events=None):
            from airflow.exceptions import AirflowSkipException

            latest = list(inlet_events[degraded].ascending(False).limit(1))
            decision = steps.run(
                steps.performance_decide,
                project,
                summaries,
                latest[0].timestamp.isoformat() if latest else None,
                ti.get_dr_count(f"retrain__{project}", states=["queued", "running"]),
                getattr(dag_run.run_type, "value", dag_run.run_type),
            )
            if not decision["trigger"]:
                raise AirflowSkipException(decision["reason"])  # no Asset event from a skipped task
            outlet_events[degraded].extra = decision["extra"]
            return decision

        trigger_retrain(check())

    return performance()


for name, kind in project_kinds().items():
    if kind == ProjectKind.tabular:
        parsed = parsed_config(name)
        performance_dag(name, (parsed.performance if parsed else PerformanceConfig()).window_hours)
