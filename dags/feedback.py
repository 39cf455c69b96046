"""
### feedback__<project>

One DAG per tabular project: ground truth that comes back for the requests Triton answered.
Label files (`request_id,label[,observed_at]`, CSV or parquet) land in
`landing/<project>/feedback/` (`flywheel land-feedback <project> <file>`), or are named by an
event of the Asset `flywheel://<project>/feedback_landed` whose extra holds `{"path": ...}`
(Airflow's REST API: `POST /api/v2/assets/events`), or by the `path` Param of a manual run.

* `join` validates the labels with Great Expectations against the inference log (unknown
  request ids, duplicates, labels outside the label's set or range, labels later than
  `feedback.horizon_hours`): refused rows go to `quarantine/<project>/feedback/` with the
  report, the rest are joined to what the model answered and written to
  `feedback/<project>/labelled/`. A file that cannot be read is refused whole, and the task
  fails without retries after the other files are joined.
* `land_production` lands the newly labelled rows as a training batch in `landing/<project>/`:
  the next retrain validates them with the project's suite and a label check, and learns from
  what the model served.
* The Asset `flywheel://<project>/labels_joined` (extra: the windows that got labels) starts
  `performance__<project>`, which measures those windows' realized performance.

All logic is in `pipelines.steps`; this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from pipelines.config import ProjectKind, project_kinds, task_defaults
from pipelines.steps import FEEDBACK_LANDED, LABELS_JOINED, project_asset


def feedback_dag(project: str):
    landed = Asset(project_asset(project, FEEDBACK_LANDED))
    joined = Asset(project_asset(project, LABELS_JOINED))

    @dag(
        dag_id=f"feedback__{project}",
        # Files dropped into the landing folder are picked up hourly; an Asset event starts a run at once.
        schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("30 * * * *", timezone="UTC"), assets=[landed]),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # one writer of the labelled rows at a time
        default_args=task_defaults(max_retry_delay=timedelta(minutes=10)),
        tags=["flywheel", "monitoring", f"project:{project}"],
        doc_md=__doc__,
        params={"path": Param(None, type=["null", "string"], description="A label file to land first (relative to the deployment home, or absolute).")},
    )
    def feedback():
        from pipelines import steps

        @task
        def land(params=None, triggering_asset_events=None):
            paths = [e.extra["path"] for events in (triggering_asset_events or {}).values() for e in events if e.extra.get("path")]
            return steps.run(steps.feedback_land, project, paths + ([params["path"]] if params["path"] else []))

        @task
        def join(landed_files):
            return steps.run(steps.feedback_join, project)

        @task(outlets=[joined])
        def announce(result, outlet_events=None):
            from airflow.exceptions import AirflowSkipException

            if not result["windows"]:
                raise AirflowSkipException("no new labels joined")  # no Asset event, nothing to measure
            outlet_events[joined].extra = {"project": project, "windows": result["windows"]}
            return result["windows"]

        @task
        def land_production(result):
            return steps.run(steps.feedback_land_production, project, result)

        @task
        def refused_files(result):
            """Fails, without retries, when a label file was refused whole (the others were joined): it pages."""
            return steps.run(steps.feedback_refused, result)

        result = join(land())
        announce(result)
        land_production(result)
        refused_files(result)

    return feedback()


for name, kind in project_kinds().items():
    if kind == ProjectKind.tabular:
        feedback_dag(name)
