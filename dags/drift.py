"""
### drift__<project>

One DAG per project, hourly: test the requests the project's served model answered in the
last hour (the inference log) against the reference sample of the data that version was
trained on (Evidently; a text project's texts with its text drift test), write the report
under `reports/drift/<model>/`, and push the drift metrics.

* In a tabular project, when the share of drifted columns passes `monitoring.drift_share`, `trigger_retrain` emits
  the project's Asset `flywheel://<project>/drift_detected` (extra: model, version, report,
  share, columns), which starts that project's `retrain__<project>` and no other. Not while
  a retrain is queued or running, at most once per `monitoring.cooldown_hours`, and never
  from a backfill; the task is skipped with the reason.
* Fewer than `monitoring.min_rows` requests in the window give no verdict and no report.
* Backfill re-checks past windows, one report each:
  `airflow backfill create --dag-id drift__<project> --from-date ... --to-date ...`.
* The Drift page of the Airflow UI lists the reports; `docs/oncall.md` says what to do.

All logic is in `pipelines.steps`; this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, CronTriggerTimetable, dag, task

from pipelines.config import ProjectKind, project_kinds, task_defaults
from pipelines.steps import drift_asset


def drift_dag(project: str, kind: ProjectKind):
    drift_detected = Asset(drift_asset(project))

    @dag(
        dag_id=f"drift__{project}",
        # The run at hh:00 checks [hh-1:00, hh:00): the interval makes the window its data interval.
        schedule=CronTriggerTimetable("0 * * * *", timezone="UTC", interval=timedelta(hours=1)),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=4,
        default_args=task_defaults(max_retry_delay=timedelta(minutes=10)),  # an hourly check must finish within its hour
        tags=["flywheel", "monitoring", f"project:{project}"],
        doc_md=__doc__,
    )
    def drift():
        from pipelines import steps

        @task
        def check(data_interval_start=None, data_interval_end=None, dag_run=None):
            end = data_interval_end or dag_run.run_after  # a run triggered without a logical date has no interval
            return steps.run(steps.drift_check, project, data_interval_start and data_interval_start.isoformat(), end.isoformat())

        @task(inlets=[drift_detected], outlets=[drift_detected])
        def trigger_retrain(summary, ti=None, dag_run=None, inlet_events=None, outlet_events=None):
            from airflow.exceptions import AirflowSkipException

            latest = list(inlet_events[drift_detected].ascending(False).limit(1))
            decision = steps.run(
                steps.drift_decide,
                project,
                summary,
                latest[0].timestamp.isoformat() if latest else None,
                ti.get_dr_count(f"retrain__{project}", states=["queued", "running"]),
                getattr(dag_run.run_type, "value", dag_run.run_type),
            )
            if not decision["trigger"]:
                raise AirflowSkipException(decision["reason"])  # no Asset event from a skipped task
            outlet_events[drift_detected].extra = decision["extra"]
            return decision

        checked = check()
        if kind == ProjectKind.tabular:  # a text project's fine-tune is started by a person, not by drift
            trigger_retrain(checked)

    return drift()


for name, kind in project_kinds().items():
    drift_dag(name, kind)
