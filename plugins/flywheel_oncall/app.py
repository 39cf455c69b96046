"""The on-call pages as a FastAPI app, mounted into Airflow's api-server by the plugin.

One deployment, many projects: ``/projects`` lists them, and each project has its own pages
under ``/projects/<project>/`` (JSON twins under ``/api/``)::

    /projects                                   index: every project the caller may read
    /projects/<project>/drift                   latest checked windows of its served model
    /projects/<project>/drift/<folder>          one window's per-column table
    /projects/<project>/drift/<folder>/report.html   Evidently's report (CSP sandbox)
    /projects/<project>/models                  versions, gate decisions, serving history, runs
    /projects/<project>/versions/<version>/card  a version's model card (the HTML written beside it)
    /projects/<project>/timeline                drift, columns, served version and performance on one time axis
    /api/projects, /api/projects/<project>/drift, /api/projects/<project>/drift/<folder>,
    /api/projects/<project>/models, /api/projects/<project>/timeline
    /static/plotly.min.js                       plotly.js, from the installed plotly package
    /static/<name>                              the files of the package's static/ folder, by name

Every route needs a logged-in Airflow user: Airflow's own ``get_user`` (the bearer token of
an API client, else the ``_token`` cookie the UI sets at login, which the page embedded in
the UI sends); no token: 401, a bad one: 403. Then, per project, the auth manager's read
permission on that project's DAG, through ``requires_access_dag``: its Models page needs
``retrain__<project>`` (``finetune__<project>`` for a text project), and so does a version's
model card; its Drift pages and its Timeline ``drift__<project>``; no permission: 403. The index lists only the
projects the caller may read, and of each only what its pages would show them.

A project name in a URL is checked against ``pipelines.config.PROJECT_NAME`` and the
deployment's projects before it is used for anything: an unknown one is a 404 that lists the
known ones. A report is named by its folder (``YYYYmmddTHHMMSSZ``) only.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flywheel_oncall import data, pages
from flywheel_oncall.story import ui_root

URL_PREFIX = "/flywheel"
INDEX_PATH = "/projects"

_bearer = HTTPBearer(auto_error=False)
# Evidently's report is scripts and data from served requests: let it run, but in an origin of
# its own, so nothing in it can act in the Airflow UI with the user's session.
REPORT_HEADERS = {"Content-Security-Policy": "sandbox allow-scripts", "X-Content-Type-Options": "nosniff"}
# A model card is static HTML with its own styles: nothing else may load or run in it.
CARD_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'", "X-Content-Type-Options": "nosniff"}
STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}
# plotly.js's URL carries the installed plotly's version: a browser may keep it for a year. The
# package's own scripts change with the plugin: a browser asks again each time (a 304 if unchanged).
PLOTLY_HEADERS = {"Cache-Control": "private, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"}
STATIC_HEADERS = {"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}


class Access:
    """A logged-in Airflow user, and what the auth manager lets them do."""

    def __init__(self, request: Request, user) -> None:
        self.request = request
        self.user = user

    def require(self, dag_id: str, method: str = "GET", entity=None) -> None:
        """403 unless the auth manager allows ``method`` (GET: read) on ``dag_id`` (its ``entity``,
        a ``DagAccessEntity``, e.g. RUN; None: the DAG itself). Sync: asks the metadata database
        which team owns the DAG."""
        from airflow.api_fastapi.core_api import security

        security.requires_access_dag(method, access_entity=entity, param_dag_id=dag_id)(self.request, self.user)

    def may(self, dag_id: str, method: str = "GET", entity=None) -> bool:
        """``require`` as a yes or no."""
        try:
            self.require(dag_id, method, entity)
        except HTTPException as refused:
            if refused.status_code == status.HTTP_403_FORBIDDEN:
                return False
            raise
        return True


async def access(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Access:
    """A dependency: the caller, an Airflow user (401 without a token, 403 with a bad one)."""
    # Imported here, not at the top: Airflow imports plugins in every task process too, and
    # this module of the api-server takes seconds to import, which no task needs.
    from airflow.api_fastapi.core_api import security

    return Access(request, await security.get_user(request, _oauth_token=None, bearer_credentials=credentials))


Caller = Annotated[Access, Depends(access)]


def home() -> Path:
    from pipelines.config import project_home

    return project_home()


def project_kind(project: str) -> str:
    """The kind of ``project``, a project of the deployment; 404 listing the known ones otherwise.

    The name is matched against the project-name pattern and the deployment's projects before
    anything uses it: it never reaches a path unless it is one of them.
    """
    from pipelines.config import PROJECT_NAME, project_kinds

    kinds = project_kinds(home())
    if re.fullmatch(PROJECT_NAME, project) and project in kinds:
        return data.kind_name(kinds[project])
    known = sorted(kinds)
    where = f"{home()}/projects"
    detail = f"no project {project!r} in {where}; " + (
        f"the projects are {known}" if known else "it holds none (set FLYWHEEL_HOME to the deployment home)"
    )
    raise HTTPException(status.HTTP_404_NOT_FOUND, detail)


def load(project: str):
    """The project's config; a 503 naming the file and key if it cannot be read."""
    from pipelines.config import ConfigError, load_project

    try:
        return load_project(project, home())
    except ConfigError as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Flywheel project: {error}") from error


def _readable(project: str, caller: Access, page: str):
    kind = project_kind(project)  # 404 first: the DAG to check depends on the kind
    caller.require(data.dag_ids(project, kind)[page])
    return load(project)


# Sync dependencies: FastAPI runs them in a thread pool (the permission asks the database).
def models_project(project: str, caller: Caller):
    """A dependency: the project whose Models page the caller may read (its retrain or finetune DAG)."""
    return _readable(project, caller, "models")


def drift_project(project: str, caller: Caller):
    """A dependency: the project whose Drift pages the caller may read (its drift DAG)."""
    return _readable(project, caller, "drift")


ModelsProject = Annotated[object, Depends(models_project)]
DriftProject = Annotated[object, Depends(drift_project)]

index = APIRouter()
drift = APIRouter()
models = APIRouter()
timeline = APIRouter()
static = APIRouter()


def _index(caller: Access) -> dict:
    return data.load_index(home(), caller.may)


def _report(config, folder: str) -> dict:
    try:
        return data.load_report(config, folder)
    except data.NotFound as missing:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(missing)) from missing


Limit = Annotated[int, Query(ge=1, le=500, description="at most this many of the latest windows")]


@index.get("/", include_in_schema=False)
async def root(caller: Caller) -> RedirectResponse:
    return RedirectResponse(caller.request.url_for("index_page").path)


@index.get(INDEX_PATH, response_class=HTMLResponse, name="index_page")
async def index_page(request: Request, caller: Caller) -> HTMLResponse:
    view = await run_in_threadpool(_index, caller)
    return HTMLResponse(pages.index(request, view))


@index.get(f"/api{INDEX_PATH}", name="index_json")
async def index_json(caller: Caller) -> dict:
    return await run_in_threadpool(_index, caller)


@drift.get("/projects/{project}/drift", response_class=HTMLResponse, name="drift_page")
def drift_page(request: Request, config: DriftProject, limit: Limit = 50) -> HTMLResponse:
    return HTMLResponse(pages.drift(request, data.load_drift(config, limit)))


@drift.get("/projects/{project}/drift/{folder}", response_class=HTMLResponse, name="drift_report_page")
def drift_report_page(request: Request, config: DriftProject, folder: str) -> HTMLResponse:
    return HTMLResponse(pages.drift_report(request, _report(config, folder)))


@drift.get("/projects/{project}/drift/{folder}/report.html", name="drift_report_html")
def drift_report_html(config: DriftProject, folder: str) -> FileResponse:
    try:
        path = data.report_html(config, folder)
    except data.NotFound as missing:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(missing)) from missing
    return FileResponse(path, media_type="text/html", headers=REPORT_HEADERS)


@drift.get("/api/projects/{project}/drift", name="drift_json")
def drift_json(config: DriftProject, limit: Limit = 50) -> dict:
    return data.load_drift(config, limit)


@drift.get("/api/projects/{project}/drift/{folder}", name="drift_report_json")
def drift_report_json(config: DriftProject, folder: str) -> dict:
    return _report(config, folder)


def with_actions(view: dict, caller: Access) -> dict:
    """A project's page view with ``actions``: which of its action buttons the caller may use
    (``actions.allowed``)."""
    from flywheel_oncall import actions

    return {**view, "actions": actions.allowed(caller, view["project"], view["kind"])}


@models.get("/projects/{project}/models", response_class=HTMLResponse, name="models_page")
def models_page(request: Request, config: ModelsProject, caller: Caller) -> HTMLResponse:
    return HTMLResponse(pages.models(request, with_actions(data.load_models(config), caller)))


@models.get("/projects/{project}/versions/{version}/card", name="model_card_page")
def model_card_page(config: ModelsProject, version: int) -> FileResponse:
    try:
        path = data.card_html(config, version)
    except data.NotFound as missing:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(missing)) from missing
    return FileResponse(path, media_type="text/html", headers=CARD_HEADERS)


@models.get("/api/projects/{project}/models", name="models_json")
def models_json(config: ModelsProject) -> dict:
    return data.load_models(config)


Days = Annotated[int | None, Query(ge=1, le=data.TIMELINE_MAX_DAYS, description="the range: this many days up to until (or now)")]
Moment = Annotated[str | None, Query(description="ISO 8601; without an offset, UTC")]
Window = Annotated[str | None, Query(description="a drift report folder (YYYYmmddTHHMMSSZ, the window's end) to highlight")]


def _timeline(config, days: int | None, since: str | None, until: str | None, window: str | None) -> dict:
    """The timeline over the range the query names, each drift window with the retrain run it
    started (``story.window_runs``) and its acknowledgement; 422 saying which parameter is wrong and how."""
    from sqlalchemy.exc import SQLAlchemyError

    from flywheel_oncall import story
    from pipelines.monitoring.acknowledge import acknowledged

    try:
        start, end = data.timeline_range(datetime.now(timezone.utc), days, since, until, window)
        view = data.load_timeline(config, start, end, window)
    except (ValueError, data.NotFound) as wrong:
        raise HTTPException(422, f"window: {wrong}" if isinstance(wrong, data.NotFound) else str(wrong)) from wrong
    try:
        runs = story.window_runs(config, ui_root())
    except SQLAlchemyError as error:  # the page still shows the windows, and says why their runs do not
        runs = {story.DRIFT: {}}
        view["unreadable"].append(f"the runs windows started (Airflow's metadata database): {type(error).__name__}: {str(error).splitlines()[0]}")
    acks = acknowledged(config)
    for row in view["windows"]:
        row["run"] = runs[story.DRIFT].get(row["report"])
        row["acknowledged"] = acks.get(row["report"])
    return view


@timeline.get("/projects/{project}/timeline", response_class=HTMLResponse, name="timeline_page")
def timeline_page(
    request: Request, config: DriftProject, caller: Caller, days: Days = None, since: Moment = None, until: Moment = None, window: Window = None
) -> HTMLResponse:
    view = with_actions(_timeline(config, days, since, until, window), caller)
    return HTMLResponse(pages.timeline(request, {**view, "rollback_to": data.rollback_target(config) if caller.may(data.dag_ids(config.name, config.kind)["models"]) else None}))


@timeline.get("/api/projects/{project}/timeline", name="timeline_json")
def timeline_json(config: DriftProject, days: Days = None, since: Moment = None, until: Moment = None, window: Window = None) -> dict:
    return _timeline(config, days, since, until, window)


def plotly_path() -> Path:
    """plotly.js of the installed ``plotly`` package (a dependency of Evidently): no CDN, no copy."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


# Behind the login like every page (``caller``); only names of files in static/, never a path.
@static.get("/static/plotly.min.js", name="plotly_js")
def plotly_js(caller: Caller) -> FileResponse:
    path = plotly_path()
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no plotly.js at {path}: is the plotly package installed whole?")
    return FileResponse(path, media_type="text/javascript", headers=PLOTLY_HEADERS)


@static.get("/static/{name}", name="static_file")
def static_file(caller: Caller, name: str) -> FileResponse:
    files = {p.name: p for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else {}
    if name not in files:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no static file {name!r}; there are {sorted(files)}")
    return FileResponse(files[name], media_type=STATIC_TYPES.get(files[name].suffix, "application/octet-stream"), headers=STATIC_HEADERS)


def create_app() -> FastAPI:
    app = FastAPI(
        title="Flywheel on-call",
        description="Drift reports and model versions of the Flywheel projects, for on-call (docs/oncall.md).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(index)
    app.include_router(drift)
    app.include_router(models)
    app.include_router(timeline)
    app.include_router(static)
    # Imported here: both build on this module's Access, Caller and loaders.
    from flywheel_oncall import actions, audit_routes

    app.include_router(actions.router)
    app.include_router(audit_routes.router)
    # plotly.js is 4.5 MB, about 1.4 MB gzipped; the pages and their JSON shrink as well
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    return app
