"""The Audit page: every human action on the deployment's projects (``pipelines.audit``), newest
first, with filters, and the same as JSON and as a JSON-lines export::

    /audit              the page: a filters form, the entries, the trail's unreadable lines
    /api/audit          {"filters", "entries", "unreadable", "projects", "total", "limit"}
    /api/audit.jsonl    the selected entries as JSON lines (application/x-ndjson, an attachment)

Filters (query parameters, each optional; an empty one is no filter): ``project``, ``action``
(one of ``pipelines.audit.ACTIONS``), ``user`` (exact), ``since`` and ``until`` (ISO 8601,
inclusive; a time without a zone is UTC). Every route needs a logged-in Airflow user; the
entries of a project are shown only to a caller who may read its models DAG (``retrain__<p>``,
``finetune__<p>`` for a text project), as its Models page. Filtering on a project that is not
the deployment's is a 404 naming the known ones, on one the caller may not read a 403.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response

from flywheel_oncall import data, pages
from flywheel_oncall.app import Access, Caller, home, project_kind, ui_root

router = APIRouter()

EXPORT_NAME = "flywheel-audit.jsonl"
UNPROCESSABLE = 422  # a filter that is not one (starlette renamed its constant; the number stays)

Text = Annotated[str | None, Query(max_length=200)]
Limit = Annotated[int, Query(ge=1, le=5000, description="at most this many of the newest matching entries")]


def parse_time(name: str, value: str | None) -> datetime | None:
    """A filter's time: ISO 8601, UTC when it names no zone; 422 naming the parameter otherwise."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise HTTPException(
            UNPROCESSABLE, f"{name} {value!r}: expected an ISO 8601 time such as 2026-03-02T11:00:00Z or 2026-03-02"
        ) from None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def filters_of(project: str | None, action: str | None, user: str | None, since: str | None, until: str | None) -> dict[str, Any]:
    """The filters given (empty form fields dropped), checked: an unknown action is a 422 naming the known ones."""
    from pipelines import audit

    given = {"project": project, "action": action, "user": user, "since": since, "until": until}
    filters = {key: value.strip() for key, value in given.items() if value and value.strip()}
    if "action" in filters and filters["action"] not in audit.ACTIONS:
        raise HTTPException(UNPROCESSABLE, f"action {filters['action']!r}: expected one of {list(audit.ACTIONS)}")
    return filters


def entry_row(entry: dict[str, Any], root: str) -> dict[str, Any]:
    """One entry as the page shows it: as recorded, plus ``run_url`` (Airflow's page of its run) when it names one."""
    from flywheel_oncall.story import run_url

    dag_id, run_id = entry.get("dag_id"), entry.get("run_id")
    linked = isinstance(dag_id, str) and isinstance(run_id, str) and dag_id and run_id
    return {**entry, "run_url": run_url(root, dag_id, run_id) if linked else None}


def with_run_outcomes(rows: list[dict[str, Any]], root: str) -> list[dict[str, Any]]:
    """Each retrain entry with ``run_outcome``: how its run has ended since it was recorded
    (``story.run_links``: promoted vN, not promoted with the gate's reason, failed at a task,
    running); None where Airflow's metadata database does not know the run."""
    from sqlalchemy.exc import SQLAlchemyError

    from flywheel_oncall.story import run_links
    from pipelines import audit
    from pipelines.config import ConfigError, load_project

    runs: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        if row["action"] == audit.RETRAIN and row["run_url"]:
            runs.setdefault(row["project"], []).append((row["dag_id"], row["run_id"]))
    outcomes: dict[tuple[str, str], str] = {}
    for project, pairs in runs.items():
        try:
            links = run_links(load_project(project, home()), root, pairs)
        except (ConfigError, SQLAlchemyError):
            continue  # the entry as recorded still shows
        outcomes.update({(project, run_id): link["outcome"] for run_id, link in links.items()})
    return [{**row, "run_outcome": outcomes.get((row["project"], row.get("run_id", "")))} for row in rows]


def load_audit(caller: Access, filters: dict[str, Any]) -> dict[str, Any]:
    """The entries of the projects the caller may read that match ``filters``, newest first,
    and every unreadable line of their trails (``"<project>: line N: ..."``)."""
    from pipelines import audit
    from pipelines.config import ConfigError, load_project, project_kinds

    since, until = parse_time("since", filters.get("since")), parse_time("until", filters.get("until"))
    if "project" in filters:
        kind = project_kind(filters["project"])  # 404 naming the known projects
        caller.require(data.dag_ids(filters["project"], kind)["models"])  # 403
    kinds = project_kinds(home())
    readable = [name for name, kind in kinds.items() if caller.may(data.dag_ids(name, kind)["models"])]
    entries: list[dict[str, Any]] = []
    unreadable: list[str] = []
    for name in readable:
        if filters.get("project") not in (None, name):
            continue
        try:
            config = load_project(name, home())
        except ConfigError as error:
            unreadable.append(f"{name}: its config cannot be read, so neither can its trail: {error}")
            continue
        found, problems = audit.read(config)
        # Only the project's own entries: the caller's permission is per project.
        entries += [entry for entry in found if entry["project"] == name]
        unreadable += [f"{name}: {audit.audit_file(config)} {problem}" for problem in problems]
    selected = audit.select(entries, project=filters.get("project"), action=filters.get("action"), user=filters.get("user"), since=since, until=until)
    return {"filters": filters, "entries": selected, "unreadable": unreadable, "projects": readable}


def _view(caller: Access, filters: dict[str, Any], limit: int) -> dict[str, Any]:
    view = load_audit(caller, filters)
    view["total"] = len(view["entries"])
    view["entries"] = view["entries"][:limit]
    view["limit"] = limit
    return view


@router.get("/audit", response_class=HTMLResponse, name="audit_page")
def audit_page(request: Request, caller: Caller, project: Text = None, action: Text = None, user: Text = None, since: Text = None, until: Text = None, limit: Limit = 500) -> HTMLResponse:
    from pipelines import audit

    filters = filters_of(project, action, user, since, until)
    view = _view(caller, filters, limit)
    root = ui_root()
    view["entries"] = with_run_outcomes([entry_row(entry, root) for entry in view["entries"]], root)
    export = request.url_for("audit_jsonl").path + (f"?{urlencode(filters)}" if filters else "")
    return HTMLResponse(pages.render("audit.html", request, view=view, project=None, actions=audit.ACTIONS, export=export))


@router.get("/api/audit", name="audit_json")
def audit_json(caller: Caller, project: Text = None, action: Text = None, user: Text = None, since: Text = None, until: Text = None, limit: Limit = 500) -> dict[str, Any]:
    return _view(caller, filters_of(project, action, user, since, until), limit)


@router.get("/api/audit.jsonl", name="audit_jsonl")
def audit_jsonl(caller: Caller, project: Text = None, action: Text = None, user: Text = None, since: Text = None, until: Text = None) -> Response:
    from pipelines import audit

    view = load_audit(caller, filters_of(project, action, user, since, until))
    return Response(audit.to_jsonl(view["entries"]), media_type="application/x-ndjson", headers={"Content-Disposition": f'attachment; filename="{EXPORT_NAME}"'})
