"""The on-call charts as plotly figures, drawn in the page by the plotly.js the plugin serves.

``timeline_figure`` draws a project's timeline (``data.load_timeline``) as one figure of up to
four rows on one time axis: the drifted share per window against ``monitoring.drift_share``, the
per-column heatmap, the served version with every promotion, rejection and rollback written on
the chart, and (a tabular project with performance windows) realized and estimated performance.
``performance_figure`` draws the Models page's performance chart from the same traces.

Everything the chart says is written on it (axis titles, legend, event labels, the highlighted
window's time), not only behind a hover. Times are plotted as UTC wall-clock strings
(``YYYY-MM-DD HH:MM:SS``): plotly.js reads no offsets. plotly is imported inside the functions:
Airflow imports plugins in every task process, which never draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from markupsafe import Markup

# Colours of the pages' stylesheet (base.html).
BAD, GOOD, INFO, WARN, MUTED, FG = "#b42318", "#067647", "#175cd3", "#dc6803", "#59636e", "#1f2328"
BAND = "rgba(23, 92, 211, 0.12)"
EVENT_STYLE = {  # marker symbol and colour of each serving event
    "publish": ("triangle-up", GOOD),
    "rollout": ("triangle-up", GOOD),
    "rollback": ("triangle-down", WARN),
    "rejected": ("x", BAD),
    "shadow": ("circle-open", MUTED),
    "canary": ("circle-open", INFO),
    "abort": ("square-open", WARN),
    "not_promoted": ("x-thin-open", WARN),
}
# Heatmap values: a column that did not drift is its score's share of the threshold, scaled to
# [0, 0.5] (white to amber); a drifted column is 1 (red), whatever its score (a column also
# drifts on its share of missing values).
HEATMAP_SCALE = [[0.0, "#ffffff"], [0.5, "#fdb022"], [0.5001, BAD], [1.0, BAD]]
ROW_HEIGHT = {"drift": 230, "columns": 34, "serving": 230, "performance": 260}
MARGIN = {"l": 150, "r": 40, "t": 70, "b": 120}  # below the plots: the time axis, its title, then the legend
LEGEND_GAP = 70  # pixels from the last plot's bottom to the legend, past the axis title


def plot_time(moment: str) -> str:
    """An ISO 8601 time as the UTC wall-clock string plotly.js reads (``2026-03-02 10:00:00``)."""
    parsed = datetime.fromisoformat(moment)
    parsed = parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
    return parsed.strftime("%Y-%m-%d %H:%M:%S")


def label_time(moment: str) -> str:
    return plot_time(moment)[:16]


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def heat(column: dict) -> float | None:
    """A column's cell in the heatmap (see ``HEATMAP_SCALE``); None when it has no score."""
    if column["drifted"]:
        return 1.0
    score, threshold = column.get("score"), column.get("threshold")
    if score is None or not threshold:
        return None
    return 0.5 * min(score / threshold, 1.0)


def verdict(window: dict) -> str:
    """A performance window's verdict in words: a realized value without one is not called healthy."""
    if window["degraded"]:
        return "degraded"
    return "not degraded" if window["status"] == "checked" else f"no verdict: {window['reason']}"


def performance_traces(windows: Sequence[dict[str, Any]], metric: str, legendgroup: str = "performance") -> list:
    """The traces of performance windows (``data.performance_window`` rows, oldest first) in
    ``metric``: the realized value at each window's end with its interval as error bars (degraded
    windows red), the estimated value, and the test metric of the version that served."""
    import plotly.graph_objects as go

    shown = [w for w in windows if w["metric"] == metric]
    x = [plot_time(w["end"]) for w in shown]
    realized = [w for w in shown if w["realized"] is not None]
    traces = []
    for degraded in (False, True):
        points = [w for w in realized if w["degraded"] == degraded]
        if not points:
            continue
        traces.append(
            go.Scatter(
                x=[plot_time(w["end"]) for w in points],
                y=[w["realized"] for w in points],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [(w["realized_high"] - w["realized"]) if w["realized_high"] is not None else 0 for w in points],
                    "arrayminus": [(w["realized"] - w["realized_low"]) if w["realized_low"] is not None else 0 for w in points],
                    "color": BAD if degraded else INFO,
                },
                mode="markers",
                marker={"color": BAD if degraded else INFO, "size": 9},
                name=f"realized {metric}, degraded" if degraded else f"realized {metric} (interval)",
                legendgroup=legendgroup,
                hovertext=[
                    f"{label_time(w['start'])} to {label_time(w['end'])} UTC, v{w['version']}: realized {_num(w['realized'])}"
                    f" [{_num(w['realized_low'])}, {_num(w['realized_high'])}], {w['labelled']} of {w['rows']} labelled, {verdict(w)}"
                    for w in points
                ],
                hoverinfo="text",
            )
        )
    if realized:  # the realized values joined, under their markers
        line = go.Scatter(x=[plot_time(w["end"]) for w in realized], y=[w["realized"] for w in realized], mode="lines", line={"color": INFO, "width": 1.5})
        traces.insert(0, line.update(showlegend=False, hoverinfo="skip", legendgroup=legendgroup))
    if any(w["estimated"] is not None for w in shown):
        methods = sorted({w["estimated_method"] for w in shown if w["estimated"] is not None and w["estimated_method"]})
        traces.append(
            go.Scatter(
                x=x,
                y=[w["estimated"] for w in shown],
                mode="lines+markers",
                line={"color": WARN, "dash": "dash", "width": 1.5},
                marker={"symbol": "diamond-open", "size": 9, "color": WARN},
                name=f"estimated {metric}" + (f" ({', '.join(methods)})" if methods else ""),
                legendgroup=legendgroup,
                connectgaps=False,
                hovertext=[f"v{w['version']}: estimated {_num(w['estimated'])} {w['estimated_method'] or w['estimated_reason'] or ''}" for w in shown],
                hoverinfo="text",
            )
        )
    if any(w["test"] is not None for w in shown):
        traces.append(
            go.Scatter(
                x=x,
                y=[w["test"] for w in shown],
                mode="lines",
                line={"color": FG, "dash": "dot", "width": 1.5, "shape": "hv"},
                name=f"test {metric} of the serving version",
                legendgroup=legendgroup,
                hovertext=[f"v{w['version']}: test {_num(w['test'])}" for w in shown],
                hoverinfo="text",
            )
        )
    return traces


def _drift_traces(view: dict, since: str, until: str) -> list:
    import plotly.graph_objects as go

    windows = view["windows"]
    x = [plot_time(w["window_end"]) for w in windows]
    share = view["drift_share"]
    traces = [
        go.Scatter(
            x=[plot_time(since), plot_time(until)],
            y=[share, share],
            mode="lines",
            line={"color": BAD, "dash": "dash", "width": 1},
            name=f"threshold: monitoring.drift_share {share:.2f}",
            hoverinfo="skip",
        ),
        go.Scatter(
            x=x,
            y=[w["share"] for w in windows],
            mode="lines+markers",
            line={"color": INFO, "width": 1.5},
            marker={"color": INFO, "size": 7},
            name="drifted share of the columns",
            cliponaxis=False,  # a window ending at the range's end is drawn whole
            hovertext=[f"window to {label_time(w['window_end'])} UTC: {_num(w['share'], 2)} drifted ({', '.join(w['drifted_columns']) or 'none'})" for w in windows],
            hoverinfo="text",
        ),
    ]
    drifted = [w for w in windows if w["dataset_drift"]]
    if drifted:
        traces.append(
            go.Scatter(
                x=[plot_time(w["window_end"]) for w in drifted],
                y=[w["share"] for w in drifted],
                mode="markers",
                marker={"color": BAD, "size": 12, "symbol": "circle", "line": {"color": "#fff", "width": 1}},
                name="dataset drift",
                cliponaxis=False,
                hovertext=[f"dataset drift: {', '.join(w['drifted_columns'])}" for w in drifted],
                hoverinfo="text",
            )
        )
    return traces


def _column_cells(view: dict):
    """The per-column row: one square a (window, column), drawn at a fixed size in pixels so a
    window stays visible at any range (a heatmap's cells would be an hour wide: a hairline over
    30 days). Colour: ``heat``; a column without a score in a window is not drawn."""
    import plotly.graph_objects as go

    cells = [(w, c) for w in view["windows"] for c in w["columns"] if heat(c) is not None]
    return go.Scatter(
        x=[plot_time(w["window_end"]) for w, _ in cells],
        y=[c["column"] for _, c in cells],
        mode="markers",
        marker={
            "symbol": "square", "size": 13, "color": [heat(c) for _, c in cells], "cmin": 0, "cmax": 1, "colorscale": HEATMAP_SCALE,
            "line": {"width": 1, "color": "#d0d5dd"}, "showscale": True,
            "colorbar": {"tickvals": [0, 0.5, 1], "ticktext": ["score 0", "at threshold", "drifted"], "len": 0.25, "thickness": 12, "title": {"text": "column"}},
        },
        text=[
            f"{c['column']}: {'drifted' if c['drifted'] else 'no drift'}, score {_num(c['score'])} / threshold {_num(c['threshold'])}"
            + (f", {c['reason']}" if c.get("reason") else "")
            for _, c in cells
        ],
        hoverinfo="text",
        cliponaxis=False,
        name="columns",
        showlegend=False,
    )


def _serving_traces(view: dict) -> list:
    import plotly.graph_objects as go

    traces = []
    steps = view["served"]
    if steps:
        traces.append(
            go.Scatter(
                x=[plot_time(s["start"]) for s in steps] + [plot_time(steps[-1]["end"])],
                y=[s["version"] for s in steps] + [steps[-1]["version"]],
                mode="lines",
                line={"color": FG, "shape": "hv", "width": 2},
                name="served version",
                hovertext=[f"v{s['version']} serves from {label_time(s['start'])} UTC" for s in steps] + [f"v{steps[-1]['version']} serves"],
                hoverinfo="text",
            )
        )
    if view["versions"]:
        created = view["versions"]
        traces.append(
            go.Scatter(
                x=[plot_time(v["created_at"]) for v in created],
                y=[v["version"] for v in created],
                mode="markers",
                marker={"symbol": "circle-open", "size": 8, "color": MUTED},
                name="version created (gate decision)",
                hovertext=[f"v{v['version']} created by {v['run_id'] or 'an unknown run'}: {v['decision'] or 'no gate decision'}" + (f", {v['reason']}" if v["reason"] else "") for v in created],
                hoverinfo="text",
            )
        )
    events = [e for e in view["events"] if isinstance(e["version"], int)]
    positions = label_positions([e["time"] for e in events], view["since"], view["until"])
    for kind in dict.fromkeys(e["event"] for e in events):
        marked = [e for e in events if e["event"] == kind]
        symbol, colour = EVENT_STYLE.get(kind, ("circle", MUTED))
        traces.append(
            go.Scatter(
                x=[plot_time(e["time"]) for e in marked],
                y=[(e["challenger"] if kind in ("shadow", "canary") and isinstance(e["challenger"], int) else e["version"]) for e in marked],
                mode="markers+text",
                marker={"symbol": symbol, "size": 12, "color": colour, "line": {"width": 2, "color": colour}},
                text=[e["label"] for e in marked],
                textposition=[positions[events.index(e)] for e in marked],
                textfont={"color": colour, "size": 12},
                cliponaxis=False,
                name={"publish": "promoted", "rejected": "rejected", "rollback": "rollback", "not_promoted": "challenger not promoted"}.get(kind, kind),
                hovertext=[f"{label_time(e['time'])} UTC: {e['label']}" + (f" ({e['reason']})" if e["reason"] else "") + (f", run {e['run_id']}" if e["run_id"] else "") for e in marked],
                hoverinfo="text",
            )
        )
    return traces


LABEL_POSITIONS = ("top center", "bottom center", "top right", "bottom left", "top left", "bottom right")
NEAR = 0.06  # events closer than this share of the range have their labels placed apart


def label_positions(times: Sequence[str], since: str, until: str) -> list[str]:
    """Where each event's label goes (plotly ``textposition``), events in time order: the next
    place round ``LABEL_POSITIONS`` for an event near the one before, the first for one far from it."""
    span = (datetime.fromisoformat(until) - datetime.fromisoformat(since)).total_seconds() or 1.0
    order = sorted(range(len(times)), key=lambda i: times[i])
    positions = [LABEL_POSITIONS[0]] * len(times)
    level, last = 0, None
    for i in order:
        moment = datetime.fromisoformat(times[i])
        level = level + 1 if last is not None and (moment - last).total_seconds() < NEAR * span else 0
        positions[i], last = LABEL_POSITIONS[level % len(LABEL_POSITIONS)], moment
    return positions


def timeline_figure(view: dict):
    """The figure of a timeline (``data.load_timeline``): rows drift, columns, serving and (with
    performance windows) performance, sharing one UTC time axis over the timeline's range."""
    from plotly.subplots import make_subplots

    performance = view.get("performance") or {}
    rows = ["drift", "columns", "serving"] + (["performance"] if performance.get("windows") else [])
    heights = [ROW_HEIGHT[r] if r != "columns" else max(90, ROW_HEIGHT["columns"] * max(len(view["columns"]), 1)) for r in rows]
    titles = {
        "drift": "Drifted share of the monitored columns per window",
        "columns": "Per column (red: drifted)",
        "serving": "Served version, promotions, rejections and rollbacks",
        "performance": f"Performance in production ({performance.get('metric')})",
    }
    figure = make_subplots(
        rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.06,
        row_heights=heights, subplot_titles=[titles[r] for r in rows],
    )
    since, until = view["since"], view["until"]
    for trace in _drift_traces(view, since, until):
        figure.add_trace(trace, row=1, col=1)
    if view["windows"]:
        figure.add_trace(_column_cells(view), row=2, col=1)
    for trace in _serving_traces(view):
        figure.add_trace(trace, row=3, col=1)
    if "performance" in rows:
        for trace in performance_traces(performance["windows"], performance["metric"]):
            figure.add_trace(trace, row=4, col=1)
        figure.update_yaxes(title_text=performance["metric"], row=4, col=1)
    figure.update_yaxes(title_text="drifted share", range=[0, 1.05], row=1, col=1)
    # the checked order, top down, every column named even where none was scored
    figure.update_yaxes(title_text="column", automargin=True, autorange="reversed", type="category", categoryorder="array", categoryarray=view["columns"], row=2, col=1)
    versions = [s["version"] for s in view["served"]] + [e["version"] for e in view["events"] if isinstance(e["version"], int)] + [v["version"] for v in view["versions"]]
    figure.update_yaxes(title_text="version", dtick=1, tickprefix="v", range=[min(versions, default=1) - 0.8, max(versions, default=1) + 0.8], row=3, col=1)
    figure.update_xaxes(range=[plot_time(since), plot_time(until)], type="date", showticklabels=True)
    figure.update_xaxes(title_text="time (UTC)", row=len(rows), col=1)
    for name, row in (("no drift window checked in this range", 1), ("no serving event in this range", 3)):
        empty = not view["windows"] if row == 1 else not (view["served"] or view["events"] or view["versions"])
        if empty:
            figure.add_annotation(text=name, showarrow=False, xref="x domain", yref="y domain", x=0.5, y=0.5, font={"color": MUTED}, row=row, col=1)
    window = view.get("window")
    if window:
        start, end = plot_time(window["start"]), plot_time(window["end"])
        figure.add_shape(type="rect", xref="x", yref="paper", x0=start, x1=end, y0=0, y1=1, fillcolor=BAND, line={"color": INFO, "width": 1, "dash": "dot"}, layer="below")
        figure.add_annotation(
            text=f"window {label_time(window['start'])} to {label_time(window['end'])[11:]} UTC", xref="x", yref="paper",
            x=end, y=1, yanchor="bottom", yshift=22, showarrow=False, font={"color": INFO, "size": 12},
            bgcolor="rgba(255,255,255,0.85)", name="highlighted-window",
        )
    height = sum(heights) + 60 * len(rows) + MARGIN["t"] + MARGIN["b"]
    figure.update_layout(
        height=height,
        margin=MARGIN,
        template="plotly_white",
        legend={"orientation": "h", "y": -LEGEND_GAP / (height - MARGIN["t"] - MARGIN["b"]), "x": 0, "yanchor": "top"},
        hovermode="closest",
        font={"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
    )
    return figure


def performance_figure(windows: Sequence[dict[str, Any]]):
    """The Models page's chart: ``performance_traces`` of the windows (oldest first) in the newest
    window's metric; None without windows."""
    import plotly.graph_objects as go

    if not windows:
        return None
    metric = windows[-1]["metric"]
    figure = go.Figure(performance_traces(windows, metric))
    figure.update_layout(
        height=380, margin={"l": 70, "r": 30, "t": 30, "b": 50}, template="plotly_white", hovermode="closest",
        legend={"orientation": "h", "y": 1.02, "x": 0, "yanchor": "bottom"},
        font={"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
    )
    figure.update_yaxes(title_text=metric)
    figure.update_xaxes(title_text="window end (UTC)", type="date")
    if len({w["end"] for w in windows}) == 1:  # one point: a day either side, not milliseconds
        end = datetime.fromisoformat(windows[-1]["end"])
        figure.update_xaxes(range=[plot_time((end - timedelta(days=1)).isoformat()), plot_time((end + timedelta(days=1)).isoformat())])
    return figure


def embed(figure) -> Markup | None:
    """A figure's JSON for a ``<script type="application/json">`` element: ``<`` escaped, so no
    string of it (a column name, a reason) can close the element."""
    if figure is None:
        return None
    return Markup(figure.to_json().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
