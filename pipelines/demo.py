"""``make demo``: the data flywheel through a real local Airflow, over months of real flights.

Each night a month of flights lands and the retrain DAG runs: the first night is the
scheduler's own run of the nightly slot, later nights are triggered as a data scientist would
from the UI. The first run publishes version 1, later runs are gated against the version in
service, one month arrives corrupted and is quarantined, and a night with no new data reuses
everything from cache. Triton serves throughout: promoted versions go live in it, a later
month is sent through it as client traffic and logged, the drift DAG finds that traffic has
moved, and its ``drift_detected`` Asset starts a retrain by itself. Finally the rollback DAG
puts the previous version back. The demo ends with one table of what happened.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import ProjectConfig
from pipelines.data.replay import land

DAG_ID = "retrain"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Night:
    months: tuple[str, ...]
    corrupt: bool = False
    conf: dict | None = None

    @property
    def label(self) -> str:
        names = ", ".join(self.months) or "no new data"
        return f"{names} (corrupted)" if self.corrupt else names


NIGHTS = (
    Night(("2013-01", "2013-02", "2013-03")),
    Night(("2013-04",)),
    Night(("2013-05",), corrupt=True),
    Night(("2013-05", "2013-06")),  # the upstream fix re-sends May
    Night(()),
)

# Runtime state of a project home; `--fresh` clears it (and Airflow's database, so that the
# scheduler runs the nightly slot again) so the demo starts from nothing.
STATE = ("landing", "data", "quarantine", "artifacts", "reports", "gx", ".dvc", ".dvc-remote", "dvc.lock", ".dvcignore", "inference_log")
# After the nights: a later month of real flights sent to the served model, as clients would.
TRAFFIC_MONTH, TRAFFIC_ROWS = "2013-07", 2000
AIRFLOW_HOME = REPO / ".airflow"
AIRFLOW_STATE = ("airflow.db", "logs")


def reset(config: ProjectConfig) -> None:
    targets = [config.home / name for name in (*STATE, str(config.model_dir.relative_to(config.home)))]
    for target in [*targets, *(AIRFLOW_HOME / name for name in AIRFLOW_STATE)]:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def night_summary(airflow, run_id: str, night: Night, state: str, seconds: float) -> dict:
    """One row of the final table, from the run's task states and XComs."""
    xcom = lambda task: airflow.xcom(DAG_ID, run_id, task) or {}  # noqa: E731
    validated, versioned, trained = xcom("validate"), xcom("version_data"), xcom("train")
    gate, published = xcom("gate"), xcom("publish")
    failed = [t["task_id"] for t in airflow.task_instances(DAG_ID, run_id) if t["state"] == "failed"]
    metric = gate.get("metric", "")
    challenger = (gate.get("challenger") or {}).get(metric)
    champion = (gate.get("champion") or {}).get(metric)
    return {
        "run": run_id,
        "batches": night.label,
        "rows in": validated.get("rows_ingested", "-"),
        "validation": "quarantined" if "validate" in failed else ("passed" if validated.get("passed") else "no batch"),
        "split": "-" if not versioned else ("cache hit" if versioned["cache_hit"] else "new version"),
        "training": "-" if not trained else ("reused" if trained["reused"] else f"{trained['epochs']} epochs"),
        "challenger": f"{metric} {challenger:.4f}" if challenger is not None else "-",
        "champion": f"{champion:.4f}" if champion is not None else "-",
        "decision": published.get("decision", f"run {state}" + (f" at {failed[0]}" if failed else "")),
        "version": published.get("version") or "-",
        "seconds": f"{seconds:.0f}",
    }


def table(rows: list[dict]) -> str:
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    line = lambda values: "  ".join(str(v).ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths), *(line(r.values()) for r in rows)])


def run(config: ProjectConfig, fresh: bool, port: int) -> tuple[list[dict], list[str]]:
    """The nights through Airflow with Triton serving; then live traffic, drift, and a rollback."""
    from pipelines.airflow_local import LocalAirflow
    from pipelines.serving import repository
    from pipelines.serving.client import log_dir, replay_traffic
    from pipelines.serving.triton import TritonServer

    if fresh:
        reset(config)
    rows, serving = [], []
    airflow = LocalAirflow(AIRFLOW_HOME, REPO / "dags", REPO / "plugins", port=port, extra_env={"FLYWHEEL_HOME": str(config.home)})
    with TritonServer(config) as triton, airflow:
        for number, night in enumerate(NIGHTS, start=1):
            for month in night.months:
                land(config, month, broken=night.corrupt)
            started = time.monotonic()
            if number == 1:  # unpaused with catchup off, the scheduler runs the latest nightly slot at once
                run_id = scheduled_run(airflow)
            else:
                run_id = airflow.trigger(DAG_ID, night.conf or {}, run_id=f"demo_{int(time.time())}_night{number}")
            state = airflow.wait_for_run(DAG_ID, run_id, timeout=1800)
            rows.append(night_summary(airflow, run_id, night, state, time.monotonic() - started))
            print(f"night {number}: {night.label}: {state}", flush=True)

        served = repository.served_version(config.model_dir)
        traffic = replay_traffic(config, TRAFFIC_MONTH, rows=TRAFFIC_ROWS)
        serving.append(
            f"traffic:   {traffic['rows']} flights of {TRAFFIC_MONTH} scored by version {served} in Triton ({triton.url}), "
            f"{traffic['requests']} requests, logged to {log_dir(config)}"
        )
        land(config, TRAFFIC_MONTH)  # the month's labelled flights arrive too
        started = time.monotonic()
        retrain, line = drift_check(airflow)
        serving.append(line)
        if retrain:
            state = airflow.wait_for_run(DAG_ID, retrain, timeout=1800)
            rows.append(night_summary(airflow, retrain, Night((TRAFFIC_MONTH,)), state, time.monotonic() - started))
            print(f"drift-triggered retrain: {state}", flush=True)

        served = repository.served_version(config.model_dir)
        if served and served > 1:
            run_id = airflow.trigger("rollback", {"model": config.model.name, "version": served - 1})
            state = airflow.wait_for_run("rollback", run_id, timeout=300)
            result = airflow.xcom("rollback", run_id, "serve_previous_version") or {}
            serving.append(
                f"rollback:  DAG run {state}: version {result.get('previous')} -> {result.get('version')} "
                f"in {result.get('switch_seconds')} s (served now: {repository.served_version(config.model_dir)})"
            )
    return rows, serving


def scheduled_run(airflow, timeout: float = 120) -> str:
    """Unpause the DAGs; the id of the nightly run the scheduler starts (a manual one if it does
    not, e.g. when this Airflow home already ran the latest slot)."""
    for dag_id in (DAG_ID, "drift", "rollback"):
        airflow.wait_for_dag(dag_id)
    known = {r["dag_run_id"] for r in airflow.dag_runs(DAG_ID)}
    for dag_id in (DAG_ID, "drift", "rollback"):
        airflow.unpause(dag_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r["dag_run_id"] for r in airflow.dag_runs(DAG_ID) if r["dag_run_id"] not in known]
        if new:
            return new[0]
        time.sleep(1)
    return airflow.trigger(DAG_ID, {}, run_id=f"demo_{int(time.time())}_night1")


def drift_check(airflow, timeout: float = 120) -> tuple[str | None, str]:
    """Run the drift DAG over the last hour of traffic; the retrain its Asset started, if any."""
    run_id = airflow.trigger("drift", {})
    state = airflow.wait_for_run("drift", run_id, timeout=600)
    summary = airflow.xcom("drift", run_id, "check") or {}
    line = (
        f"drift:     DAG run {state}: share {summary.get('share', 0):.2f} of columns drifted "
        f"{summary.get('drifted_columns', [])}, report {summary.get('report', summary.get('reason'))}"
    )
    if not airflow.xcom("drift", run_id, "trigger_retrain"):
        return None, line + "; no retrain triggered"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = [r["dag_run_id"] for r in airflow.dag_runs(DAG_ID) if r["run_type"] == "asset_triggered"]
        if started:
            return started[0], line + f"; drift_detected started retrain run {started[0]}"
        time.sleep(1)
    return None, line + f"; drift_detected was emitted but no retrain started within {timeout:.0f} s"


def report(config: ProjectConfig, rows: list[dict], serving: list[str]) -> str:
    from pipelines.monitoring.check import reports_root
    from pipelines.serving.live import history_path
    from pipelines.serving.publish import runs_dir

    return "\n".join(
        [
            table(rows),
            "",
            *serving,
            "",
            f"serving history:  {history_path(config)}",
            f"model repository: {config.model_dir}",
            f"lineage records:  {runs_dir(config)}",
            f"quarantine:       {config.path(config.dataset.quarantine_dir)}",
            f"drift reports:    {reports_root(config)}",
            f"data versions:    {config.home / 'dvc.lock'} (pushed to {config.versioning.remote})",
            f"Airflow UI:       run `make up`, then http://localhost:8080 (user admin, password in {REPO / '.airflow'})",
        ]
    )
