"""What on-call can do from a project's pages, each through Airflow's own API and permissions::

    POST /api/projects/<project>/actions/retrain      {"reason"}             a run of retrain__<project>
    POST /api/projects/<project>/actions/rollback     {"version", "reason"}  a run of rollback__<project>
    POST /api/projects/<project>/actions/acknowledge  {"window", "reason"}   silence the project's drift pages

Retrain and rollback trigger a DAG run through Airflow's REST API (``POST /api/v2/dags/<dag>/dagRuns``)
with the caller's own token, so Airflow's auth manager decides: a user who may not trigger that
DAG gets Airflow's 403, passed on. The run records itself in the project's audit trail with the
user Airflow names as its trigger (``pipelines.audit``), wherever it was started from; a refused
request is recorded here, since no run exists to record it. An acknowledgement needs edit
permission on ``drift__<project>`` (the auth manager's ``PUT``) and is an Alertmanager silence
(``pipelines.monitoring.acknowledge``), recorded by it.

Bodies are JSON (``application/json``): a cross-site form cannot send that without a CORS
preflight, which the api-server does not grant, so the session cookie cannot be used from
elsewhere. A bad body is a 422 naming the field; an unknown version, or the one serving, a 409.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, StrictInt, StringConstraints

from flywheel_oncall import data
from flywheel_oncall.app import Access, Caller, load, project_kind
from flywheel_oncall.story import run_url, ui_root

# Why, in words: goes into the audit trail and the run's record; blanks around it are dropped,
# so a reason of spaces is no reason.
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
COOKIE = "_token"  # airflow.api_fastapi.auth.managers.base_auth_manager.COOKIE_NAME_JWT_TOKEN

router = APIRouter()


class RetrainRequest(BaseModel):
    reason: Reason


class RollbackRequest(BaseModel):
    version: Annotated[StrictInt, Field(ge=1, description="The version to serve again (a JSON integer).")]
    reason: Reason


class AcknowledgeRequest(BaseModel):
    window: Annotated[str, Field(pattern=data.REPORT_FOLDER.pattern, description="The window's report folder, YYYYmmddTHHMMSSZ.")]
    reason: Reason


def dag_of(project: str, action: str) -> str:
    """The DAG an action runs or guards: retrain__, rollback__ or drift__<project>."""
    return {"retrain": f"retrain__{project}", "rollback": f"rollback__{project}", "acknowledge": f"drift__{project}"}[action]


def offered(kind: str) -> tuple[str, ...]:
    """The actions a project's pages offer: a text project has no retrain DAG nor drift check (its
    fine-tune takes Params only Airflow's trigger form asks for)."""
    return ("rollback",) if kind == data.TEXT else ("retrain", "rollback", "acknowledge")


def allowed(caller: Access, project: str, kind: str) -> dict[str, bool]:
    """Which actions the caller may take on ``project`` (the pages disable the others): the auth
    manager's ``POST`` on the DAG's runs for retrain and rollback, ``PUT`` on the drift DAG for an
    acknowledgement. The same check Airflow's own API makes, so a button is never enabled for a
    request that would be refused."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

    checks = {"retrain": ("POST", DagAccessEntity.RUN), "rollback": ("POST", DagAccessEntity.RUN), "acknowledge": ("PUT", None)}
    return {action: action in offered(kind) and caller.may(dag_of(project, action), *checks[action]) for action in checks}


def token_of(caller: Access) -> str:
    """The caller's JWT as the request carried it (bearer header, else the UI's cookie)."""
    header = caller.request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else caller.request.cookies.get(COOKIE, "")
    if not token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "no Airflow token on the request: log in to Airflow again")
    return token


def api_root(caller: Access) -> str:
    """Airflow's api-server as this request reached it, under the UI's base path."""
    url = caller.request.url
    return f"{url.scheme}://{url.netloc}{ui_root()}"


def _offered_or_404(project: str, action: str) -> tuple[Any, str]:
    kind = project_kind(project)
    if action not in offered(kind):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"a {kind} project has no {action} action; use Airflow's trigger form")
    return load(project), kind


def trigger(caller: Access, config, action: str, conf: dict[str, Any], reason: str) -> dict[str, Any]:
    """A run of ``action``'s DAG (``dag_of``) with ``conf``, triggered as the caller; Airflow's
    refusal is passed on with its status and recorded in the audit trail (the run, when there is
    one, records itself)."""
    from pipelines import audit
    from pipelines.launch.airflow import AirflowApiError, trigger_run

    dag_id = dag_of(config.name, action)
    try:
        run_id = trigger_run(api_root(caller), token_of(caller), dag_id, conf)
    except AirflowApiError as error:
        said = f"Airflow refused to start {dag_id} (HTTP {error.status}): {error.body}" if error.status else f"Airflow's API did not answer: {error.body}"
        audit.record(config, action=action, user=caller.user.get_name(), reason=reason, outcome=said, dag_id=dag_id)
        code = error.status if error.status in (401, 403, 404, 409, 422) else status.HTTP_502_BAD_GATEWAY
        raise HTTPException(code, said) from error
    return {"dag_id": dag_id, "run_id": run_id, "url": run_url(ui_root(), dag_id, run_id), "outcome": f"run {run_id} of {dag_id} queued"}


@router.post("/api/projects/{project}/actions/retrain", name="retrain_action")
async def retrain_action(project: str, body: RetrainRequest, caller: Caller) -> dict[str, Any]:
    """Start a retrain now, for ``reason`` (a run's reason makes it train even on unchanged data)."""

    def act() -> dict[str, Any]:
        config, _ = _offered_or_404(project, "retrain")
        return trigger(caller, config, "retrain", {"reason": body.reason}, body.reason)

    return await run_in_threadpool(act)


@router.post("/api/projects/{project}/actions/rollback", name="rollback_action")
async def rollback_action(project: str, body: RollbackRequest, caller: Caller) -> dict[str, Any]:
    """Serve ``version`` again: 409 unless it is a version of the served model other than the serving one."""

    def act() -> dict[str, Any]:
        from pipelines.serving import repository

        config, kind = _offered_or_404(project, "rollback")
        caller.require(data.dag_ids(project, kind)["models"])  # the versions are the Models page's
        model_dir = config.served_model_dir
        versions, served = repository.versions(model_dir), repository.served_version(model_dir)
        if body.version == served:
            said = "it is the version serving"
        elif body.version not in versions:
            said = f"the versions are {versions}"
        else:
            lineage = repository.lineage_of(model_dir, body.version)
            said = f"it was rejected: {lineage.get('rejected_reason')}" if lineage.get("status") == "rejected" else ""
        if said:
            raise HTTPException(status.HTTP_409_CONFLICT, f"cannot roll {project} back to v{body.version}: {said}")
        conf = {"version": body.version, "reason": body.reason}
        return trigger(caller, config, "rollback", conf, body.reason)

    return await run_in_threadpool(act)


@router.post("/api/projects/{project}/actions/acknowledge", name="acknowledge_action")
async def acknowledge_action(project: str, body: AcknowledgeRequest, caller: Caller) -> dict[str, Any]:
    """Acknowledge a drifted window: its project's drift alerts stop paging for ``monitoring.acknowledge_hours``."""

    def act() -> dict[str, Any]:
        from pipelines.monitoring.acknowledge import AlertmanagerError, acknowledge

        config, _ = _offered_or_404(project, "acknowledge")
        caller.require(dag_of(project, "acknowledge"), "PUT")
        try:
            done = acknowledge(config, body.window, caller.user.get_name(), body.reason)
        except ValueError as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(error)) from error
        except AlertmanagerError as error:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from error
        return {**done, "outcome": done["note"]}

    return await run_in_threadpool(act)
