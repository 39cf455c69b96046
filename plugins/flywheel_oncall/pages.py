"""Server-rendered HTML of the on-call pages: Jinja2 templates, autoescaped, no assets from
elsewhere (the pages are embedded in the Airflow UI, which may run offline). The charts are
plotly figures (``timeline.py``) embedded as JSON and drawn by the plotly.js the plugin serves
from the installed ``plotly`` package (``static/figures.js`` draws them)."""

from __future__ import annotations

import functools
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from starlette.requests import Request

from flywheel_oncall import timeline as charts
from flywheel_oncall.story import run_url, ui_root

TEMPLATES = Path(__file__).resolve().parent / "templates"


def when(value: str | None) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM:SS UTC`` (as given if it is not one)."""
    if not value:
        return "—"
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return str(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if moment.tzinfo is not None else "")


def number(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def short(value: str | None, length: int = 12) -> str:
    """A commit or a content hash cut to ``length`` characters, keeping a ``-dirty`` suffix."""
    if not value:
        return "—"
    base, dirty = (value[: -len("-dirty")], "-dirty") if value.endswith("-dirty") else (value, "")
    return base[:length] + dirty


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, number=number, short=short)
    return env


def render(template: str, request: Request, **context) -> str:
    def url(route: str, /, **params) -> str:
        # a path, with the prefix the app is mounted under: links work wherever Airflow serves it;
        # positional-only, so a route's parameter may be called ``name`` (static_file's is)
        return request.url_for(route, **params).path

    def run_page(dag_id: str, run_id: str) -> str:
        return run_url(ui_root(), dag_id, run_id)  # Airflow's own page of the run

    return environment().get_template(template).render(url=url, run_page=run_page, plotly_version=plotly_version(), **context)


@functools.cache
def plotly_version() -> str:
    """The installed plotly's version: plotly.js's URL carries it, so a browser's cached copy
    (cached for long) is never used with another plotly's figures."""
    from importlib.metadata import version

    return version("plotly")


def index(request: Request, view: dict) -> str:
    return render("index.html", request, view=view, project=None)


# A project's pages: the crumbs link its other page and the index.
def drift(request: Request, view: dict) -> str:
    return render("drift.html", request, view=view, project=view["project"])


def drift_report(request: Request, view: dict) -> str:
    return render("drift_report.html", request, view=view, project=view["project"])


def models(request: Request, view: dict) -> str:
    """The Models page; a tabular project's with the chart of its performance windows."""
    performance = view.get("performance")
    chart = charts.embed(charts.performance_figure(performance["windows"])) if performance else None
    return render("models.html", request, view=view, project=view["project"], chart=chart)


def timeline(request: Request, view: dict) -> str:
    """The Timeline page of ``view`` (``data.load_timeline``): its figure and its windows table."""
    return render("timeline.html", request, view=view, project=view["project"], chart=charts.embed(charts.timeline_figure(view)))
