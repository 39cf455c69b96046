"""What a window started, and how it ended: the links that follow the story on the on-call pages.

A drifted window (``drift__<p>``) or a degraded performance window (``performance__<p>``) emits
an Asset event whose ``extra`` names its report; the scheduler starts ``retrain__<p>`` from it.
``window_runs`` reads those events and the runs they created from Airflow's metadata database
(the pages run inside Airflow's api-server; its REST endpoint for Asset events answers 500 once
an event has started a run without a logical date, in Airflow 3.3.2), and ``outcome`` says how
each run ended: promoted vN, not promoted with the gate's reason, failed at a task, or still
running. The run's record (``pipelines.serving.publish.run_record_path``) is the gate's word;
Airflow's run state the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from flywheel_oncall.data import REPORT_FOLDER

DRIFT, PERFORMANCE = "drift", "performance"


def ui_root() -> str:
    """The path Airflow's UI is served under ([api] base_url, behind a proxy); "" at the root."""
    from urllib.parse import urlsplit

    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "/").path.rstrip("/")


def run_url(root: str, dag_id: str, run_id: str) -> str:
    """Airflow's own page of a DAG run, under the UI's base path ``root`` ("" at the server's root)."""
    return f"{root}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def report_folder(extra: Any) -> str | None:
    """The report folder (``YYYYmmddTHHMMSSZ``) an Asset event's extra names, if it names one."""
    report = extra.get("report") if isinstance(extra, dict) else None
    name = Path(report).parent.name if isinstance(report, str) else ""
    return name if REPORT_FOLDER.fullmatch(name) else None


def outcome(record: dict | None, state: str | None, failed_tasks: list[str]) -> str:
    """How a training run ended, in words, from its lineage record (written by publish) and
    Airflow's run state: ``promoted v3``, ``not promoted: <gate reason>``, ``failed at validate``,
    ``running``."""
    if record is not None:
        gate = record.get("gate") or {}
        version = record.get("version")
        if version is not None:
            return f"promoted v{version}" + (" (gate overridden)" if gate.get("forced") else "")
        return f"not promoted: {gate.get('reason') or gate.get('decision') or 'no gate decision recorded'}"
    if state == "failed":
        return f"failed at {', '.join(failed_tasks)}" if failed_tasks else "failed"
    if state == "success":
        return "nothing to train"  # needs_training skipped the rest: no record
    return state or "unknown"


def run_link(config, root: str, dag_id: str, run_id: str, state: str | None, failed_tasks: list[str]) -> dict[str, Any]:
    """One run as the pages link it: ids, Airflow's page, state and ``outcome``."""
    from pipelines.lineage import read_json
    from pipelines.serving.publish import run_record_path

    path = run_record_path(config.artifacts_dir, run_id)
    record = read_json(path) if path.is_file() else None
    return {"dag_id": dag_id, "run_id": run_id, "url": run_url(root, dag_id, run_id), "state": state, "outcome": outcome(record, state, failed_tasks)}


def window_runs(config, root: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"drift": {folder: run}, "performance": {folder: run}}``: for each window of the project
    whose Asset event started a run, that run (``run_link``), the latest if several.

    Reads Airflow's metadata database; only callable inside an Airflow process (the api-server).
    """
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from pipelines.steps import drift_asset, performance_asset

    kinds = {drift_asset(config.name): DRIFT, performance_asset(config.name): PERFORMANCE}
    links: dict[str, dict[str, dict[str, Any]]] = {DRIFT: {}, PERFORMANCE: {}}
    with create_session() as session:
        events = session.execute(
            select(AssetEvent, AssetModel.uri).join(AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.uri.in_(kinds)).order_by(AssetEvent.timestamp)
        ).all()
        for event, uri in events:
            folder = report_folder(event.extra)
            for run in event.created_dagruns if folder else ():
                links[kinds[uri]][folder] = _linked(session, config, root, run.dag_id, run.run_id, run.state)
    return links


def run_links(config, root: str, runs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """``{run_id: run_link}`` of the given ``(dag_id, run_id)`` pairs that exist in Airflow's
    metadata database (the Audit page's runs); only inside an Airflow process."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    links = {}
    with create_session() as session:
        for dag_id, run_id in runs:
            state = session.scalar(select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
            if state is None:
                continue
            links[run_id] = _linked(session, config, root, dag_id, run_id, state)
    return links


def _linked(session, config, root: str, dag_id: str, run_id: str, state: Any) -> dict[str, Any]:
    """``run_link`` of a run in Airflow's metadata database; its failed tasks asked only of a failed run."""
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    said = None if state is None else str(getattr(state, "value", state))
    failed: list[str] = []
    if said == "failed":
        query = select(TaskInstance.task_id).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.state == "failed")
        failed = sorted(session.scalars(query).all())
    return run_link(config, root, dag_id, run_id, said, failed)
