"""The Models page's chart of production performance, laid out as SVG shapes.

``performance_chart`` turns a project's performance windows (``data.performance_window``, oldest
first) into coordinates: the realized metric per window with its interval, the estimated one,
the test metric of the version that served, where versions changed, the degraded windows and
the share of requests labelled; ``templates/performance.html`` draws them as inline SVG. No
script and no asset from elsewhere: the page works offline, and everything it says is written
on it (axes, legend, the last values), not behind a hover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

# The drawing, in SVG user units (the <svg> scales to the page's width).
WIDTH = 960
LEFT, RIGHT = 64, 800  # the plots' x extent; right of it, the latest values
TOP, BOTTOM = 48, 270  # the metric's plot; above it, the legend
STRIP_TOP, STRIP_BOTTOM = 290, 330  # the share of each window's requests labelled
HEIGHT = 374  # the time axis below the strip
LABEL_GAP = 15  # least vertical distance between two of the latest values' labels

# A time axis's tick step, in hours: the first that gives at most MAX_TIME_TICKS ticks.
TIME_STEPS = (1, 2, 3, 6, 12, 24, 48, 96, 168, 336, 672, 1344)
MAX_TIME_TICKS = 8


@dataclass(frozen=True)
class Tick:
    at: float  # x or y in the drawing
    label: str


@dataclass(frozen=True)
class Point:
    """A window's value: at the window's middle; ``low_y``/``high_y``: its interval's ends."""

    x: float
    y: float
    value: float
    title: str
    degraded: bool = False
    low_y: float | None = None
    high_y: float | None = None

    @property
    def diamond(self) -> str:
        """The points of a diamond around it (an estimated value's marker)."""
        r = 5.0
        return f"{self.x:.1f},{self.y - r:.1f} {self.x + r:.1f},{self.y:.1f} {self.x:.1f},{self.y + r:.1f} {self.x - r:.1f},{self.y:.1f}"


@dataclass(frozen=True)
class Span:
    """A horizontal line from ``x1`` to ``x2`` at ``y`` (a version's test metric) or a box of
    windows (a degraded window, a label coverage bar: ``y`` to ``y + height``)."""

    x1: float
    x2: float
    y: float
    title: str
    label: str = ""
    height: float = 0.0

    @property
    def width(self) -> float:
        return self.x2 - self.x1


@dataclass(frozen=True)
class Label:
    """One of the latest values, written right of the plot at the height of its series."""

    y: float
    text: str
    series: str  # realized, estimated, test: the css class of its colour


@dataclass(frozen=True)
class Chart:
    metric: str
    confidence: float | None  # the realized intervals' level
    methods: list[str]  # the estimators of the windows (CBPE, DLE)
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    realized: list[Point]
    realized_lines: list[str]  # polylines' points, broken where a window has no realized value
    estimated: list[Point]
    estimated_lines: list[str]
    tests: list[Span]  # one per run of windows of the same version and test metric
    versions: list[Tick]  # where each version's first window starts, "v<n>"
    degraded: list[Span]
    coverage: list[Span]
    latest: list[Label]
    windows: int  # charted
    left_out: int  # windows of another metric (the gate's metric changed), not charted

    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = RIGHT
    top: int = TOP
    bottom: int = BOTTOM
    strip_top: int = STRIP_TOP
    strip_bottom: int = STRIP_BOTTOM


def seconds(moment: str) -> float:
    """An ISO 8601 time (UTC when it has no offset) as seconds since the epoch."""
    parsed = datetime.fromisoformat(moment)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


BOUNDED_METRICS = ("roc_auc", "f1", "precision", "recall", "accuracy")  # metrics that live in [0, 1]


def nice_step(span: float, ticks: int = 5) -> float:
    """A step of 1, 2, 2.5 or 5 times a power of ten that cuts ``span`` into about ``ticks`` parts."""
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def value_range(values: Sequence[float], bounded: bool = False) -> tuple[float, float, float]:
    """The metric axis: ``(low, high, step)`` covering ``values`` with a margin, on tick steps,
    kept within [0, 1] for a ``bounded`` metric (ROC AUC, F1: an axis to 1.2 shows what cannot
    be). No values: 0 to 1."""
    if not values:
        return 0.0, 1.0, 0.2
    low, high = min(values), max(values)
    span = max(high - low, 0.02)  # a flat series still gets an axis of a few hundredths
    middle = (low + high) / 2
    low, high = min(low, middle - span / 2) - 0.08 * span, max(high, middle + span / 2) + 0.08 * span
    step = nice_step(high - low)
    low, high = math.floor(low / step) * step, math.ceil(high / step) * step
    return (max(low, 0.0), min(high, 1.0), step) if bounded else (low, high, step)


def decimals(step: float) -> int:
    """Decimals that tell ticks ``step`` apart (2.5e-2: 3)."""
    digits = max(0, -math.floor(math.log10(step)))
    return digits + (1 if round(step / 10**-digits, 6) % 1 else 0)


def time_ticks(start: float, end: float) -> list[tuple[float, str]]:
    """Ticks of a UTC time axis from ``start`` to ``end`` (epoch seconds): whole days (or hours
    for short spans) aligned to UTC midnight, at most ``MAX_TIME_TICKS``."""
    hours = (end - start) / 3600
    step = next((s for s in TIME_STEPS if hours / s <= MAX_TIME_TICKS), TIME_STEPS[-1])
    form = "%b %d" if step >= 24 else "%b %d %H:%M"
    first = math.ceil(start / (step * 3600)) * step * 3600
    count = int((end - first) // (step * 3600)) + 1
    return [(t, datetime.fromtimestamp(t, timezone.utc).strftime(form)) for t in (first + i * step * 3600 for i in range(count))]


def _runs(points: list[Point | None]) -> list[str]:
    """Polyline point strings through consecutive points, broken at a None."""
    lines, current = [], []
    for point in [*points, None]:
        if point is None:
            if len(current) > 1:
                lines.append(" ".join(f"{p.x:.1f},{p.y:.1f}" for p in current))
            current = []
        else:
            current.append(point)
    return lines


def _spread(labels: list[Label]) -> list[Label]:
    """The labels moved apart vertically (at least ``LABEL_GAP``), kept in their order."""
    placed: list[Label] = []
    for label in sorted(labels, key=lambda lab: lab.y):
        y = max(label.y, placed[-1].y + LABEL_GAP) if placed else label.y
        placed.append(Label(y, label.text, label.series))
    return placed


def _pct(share: float | None) -> str:
    return "—" if share is None else f"{100 * share:.0f}%"


def performance_chart(windows: Sequence[dict[str, Any]]) -> Chart | None:
    """The chart of ``windows`` (``data.performance_window`` rows, oldest first) in the newest
    window's metric; None without windows."""
    if not windows:
        return None
    metric = windows[-1]["metric"]
    shown = [w for w in windows if w["metric"] == metric]
    starts, ends = [seconds(w["start"]) for w in shown], [seconds(w["end"]) for w in shown]
    t0, t1 = min(starts), max(max(ends), min(starts) + 1)
    low, high, step = value_range(
        [v for w in shown for v in (w["realized"], w["realized_low"], w["realized_high"], w["estimated"], w["test"]) if v is not None],
        bounded=metric in BOUNDED_METRICS,
    )
    digits = decimals(step)

    def x(t: float) -> float:
        return LEFT + (t - t0) / (t1 - t0) * (RIGHT - LEFT)

    def y(value: float) -> float:
        return BOTTOM - (value - low) / (high - low) * (BOTTOM - TOP)

    def f(value: float | None) -> str:
        return "—" if value is None else f"{value:.4f}"

    realized: list[Point | None] = []
    estimated: list[Point | None] = []
    tests: list[Span] = []
    versions: list[Tick] = []
    degraded: list[Span] = []
    coverage: list[Span] = []
    version, test = None, None  # of the window before
    for w, start, end in zip(shown, starts, ends, strict=True):
        middle, x1, x2 = x((start + end) / 2), x(start), x(end)
        when = f"{w['start']} to {w['end']}, version {w['version']}"
        if w["realized"] is not None:
            interval = "" if w["realized_low"] is None else f" [{f(w['realized_low'])}, {f(w['realized_high'])}]"
            verdict = "degraded" if w["degraded"] else "not degraded" if w["status"] == "checked" else f"no verdict: {w['reason']}"
            realized.append(
                Point(
                    middle,
                    y(w["realized"]),
                    w["realized"],
                    f"{when}: realized {metric} {f(w['realized'])}{interval}, {verdict}",
                    w["degraded"],
                    None if w["realized_low"] is None else y(w["realized_low"]),
                    None if w["realized_high"] is None else y(w["realized_high"]),
                )
            )
        else:
            realized.append(None)
        if w["estimated"] is not None:
            estimated.append(Point(middle, y(w["estimated"]), w["estimated"], f"{when}: estimated {metric} {f(w['estimated'])} ({w['estimated_method']})"))
        else:
            estimated.append(None)
        if w["degraded"]:
            degraded.append(Span(x1, max(x2, x1 + 3), TOP, f"{when}: degraded", height=BOTTOM - TOP))
        if not versions or w["version"] != version:
            versions.append(Tick(x1, f"v{w['version']}"))
        if w["test"] is not None:
            if tests and (w["version"], w["test"]) == (version, test):  # the same line goes on
                tests[-1] = Span(tests[-1].x1, x2, tests[-1].y, tests[-1].title, tests[-1].label)
            else:
                tests.append(Span(x1, x2, y(w["test"]), f"version {w['version']}: test {metric} {f(w['test'])}", f"v{w['version']}"))
            test = w["test"]
        version = w["version"]
        share = w["label_coverage"]
        height = (share or 0.0) * (STRIP_BOTTOM - STRIP_TOP)
        labelled = f"{w['labelled']} of {w['rows']} requests labelled ({_pct(share)})"
        coverage.append(Span(x1 + 0.5, max(x2 - 0.5, x1 + 1.5), STRIP_BOTTOM - height, f"{when}: {labelled}", height=height))

    latest = []  # the newest value of each series, written right of the plot
    for series, points in (("realized", realized), ("estimated", estimated)):
        last = next((p for p in reversed(points) if p), None)
        if last:
            latest.append(Label(last.y + 4, f"{series} {f(last.value)}", series))
    if tests:
        latest.append(Label(tests[-1].y + 4, f"test {tests[-1].label} {f(test)}", "test"))

    return Chart(
        metric=metric,
        confidence=next((w["confidence"] for w in reversed(shown) if w["confidence"] is not None), None),
        methods=sorted({w["estimated_method"] for w in shown if w["estimated"] is not None and w["estimated_method"]}),
        y_ticks=[Tick(y(low + i * step), f"{low + i * step:.{digits}f}") for i in range(round((high - low) / step) + 1)],
        x_ticks=[Tick(x(t), label) for t, label in time_ticks(t0, t1)],
        realized=[p for p in realized if p],
        realized_lines=_runs(realized),
        estimated=[p for p in estimated if p],
        estimated_lines=_runs(estimated),
        tests=tests,
        versions=versions,
        degraded=degraded,
        coverage=coverage,
        latest=_spread(latest),
        windows=len(shown),
        left_out=len(windows) - len(shown),
    )
