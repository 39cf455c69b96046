"""The on-call pages as a FastAPI app, mounted into Airflow's api-server by the plugin.

Every route needs a logged-in Airflow user allowed to read a DAG: the ``drift`` DAG for drift
reports, the ``retrain`` DAG for model versions. The user comes from Airflow's own
``get_user`` (the bearer token of an API client, else the ``_token`` cookie the UI sets at
login, which the page embedded in the UI sends), the permission from the auth manager
through ``requires_access_dag``. No token: 401; a bad one or no permission: 403.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flywheel_oncall import data, pages

URL_PREFIX = "/flywheel"
DRIFT_DAG = "drift"
RETRAIN_DAG = "retrain"

_bearer = HTTPBearer(auto_error=False)
# Evidently's report is scripts and data from served requests: let it run, but in an origin of
# its own, so nothing in it can act in the Airflow UI with the user's session.
REPORT_HEADERS = {"Content-Security-Policy": "sandbox allow-scripts", "X-Content-Type-Options": "nosniff"}


def can_read_dag(dag_id: str):
    """A dependency: the caller is an Airflow user who may read ``dag_id``."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> None:
        # Imported here, not at the top: Airflow imports plugins in every task process too, and
        # this module of the api-server takes seconds to import, which no task needs.
        from airflow.api_fastapi.core_api import security

        user = await security.get_user(request, _oauth_token=None, bearer_credentials=credentials)
        # sync: asks the metadata database which team owns the DAG
        await run_in_threadpool(security.requires_access_dag("GET", param_dag_id=dag_id), request, user)

    dependency.__name__ = f"can_read_{dag_id}_dag"
    return dependency


can_read_drift = can_read_dag(DRIFT_DAG)
can_read_retrain = can_read_dag(RETRAIN_DAG)

drift = APIRouter(dependencies=[Depends(can_read_drift)])
models = APIRouter(dependencies=[Depends(can_read_retrain)])


def project():
    """The project in ``$FLYWHEEL_HOME``; a 503 that says what to set if it cannot be read."""
    from pipelines.config import ConfigError, load_config

    try:
        return load_config()
    except ConfigError as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Flywheel project: {error}") from error


def _report(folder: str) -> dict:
    try:
        return data.load_report(project(), folder)
    except data.NotFound as missing:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(missing)) from missing


Limit = Annotated[int, Query(ge=1, le=500, description="at most this many of the latest windows")]


@drift.get("/drift", response_class=HTMLResponse, name="drift_page")
def drift_page(request: Request, limit: Limit = 50) -> HTMLResponse:
    return HTMLResponse(pages.drift(request, data.load_drift(project(), limit)))


@drift.get("/drift/{folder}", response_class=HTMLResponse, name="drift_report_page")
def drift_report_page(request: Request, folder: str) -> HTMLResponse:
    return HTMLResponse(pages.drift_report(request, _report(folder)))


@drift.get("/drift/{folder}/report.html", name="drift_report_html")
def drift_report_html(folder: str) -> FileResponse:
    try:
        path = data.report_html(project(), folder)
    except data.NotFound as missing:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(missing)) from missing
    return FileResponse(path, media_type="text/html", headers=REPORT_HEADERS)


@drift.get("/api/drift", name="drift_json")
def drift_json(limit: Limit = 50) -> dict:
    return data.load_drift(project(), limit)


@drift.get("/api/drift/{folder}", name="drift_report_json")
def drift_report_json(folder: str) -> dict:
    return _report(folder)


@models.get("/models", response_class=HTMLResponse, name="models_page")
def models_page(request: Request) -> HTMLResponse:
    return HTMLResponse(pages.models(request, data.load_models(project())))


@models.get("/api/models", name="models_json")
def models_json() -> dict:
    return data.load_models(project())


def create_app() -> FastAPI:
    app = FastAPI(
        title="Flywheel on-call",
        description="Drift reports and model versions of the Flywheel project, for on-call (docs/oncall.md).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(drift)
    app.include_router(models)
    return app
