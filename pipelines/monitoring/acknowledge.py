"""Acknowledging a drifted window: the on-call engineer has seen it, and the project's drift
alerts should not page again for a while.

An acknowledgement creates a silence in Alertmanager (its API v2, ``POST /api/v2/silences``)
that matches the project's drift alerts: ``project=<project>``, ``model=<served model>``,
``alertname=~"FlywheelDriftDetected|FlywheelInputsMissing"``, from now for
``monitoring.acknowledge_hours``; and records it in the audit trail (``pipelines.audit``,
action ``acknowledge``), with the window, the end of the silence and its id in ``details``.
Without ``monitoring.alertmanager`` nothing is silenced: the acknowledgement is only recorded,
and the note says which key to set. A failed silence is recorded as ``failed: ...`` and raises
``AlertmanagerError``: the trail never claims a silence that does not exist.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

from pipelines import audit
from pipelines.artifacts import SUMMARY_FILE
from pipelines.config import AnyProject
from pipelines.monitoring.check import FOLDER_TIME, reports_root

# The alerts of pipelines/monitoring/prometheus/alerts.yml that a drifted window fires.
DRIFT_ALERTS = ("FlywheelDriftDetected", "FlywheelInputsMissing")
WINDOW_FOLDER = re.compile(r"\d{8}T\d{6}Z")
TIMEOUT_S = 10.0
FAILED = "failed: "
# Alertmanager is reached directly: an HTTP(S)_PROXY of the environment is for the outside world.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AlertmanagerError(RuntimeError):
    """Alertmanager could not be reached, or answered an error: nothing was silenced."""


def alertmanager_url(address: str) -> str:
    """Alertmanager's base URL from ``monitoring.alertmanager`` (``host:port``, or a URL)."""
    return (address if "://" in address else f"http://{address}").rstrip("/")


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def require_window(config: AnyProject, window: str) -> None:
    """``ValueError`` unless ``window`` is the report folder of a checked window of the project's
    served model (``YYYYmmddTHHMMSSZ``, the window's end in UTC, with a summary)."""
    root = reports_root(config.monitoring, config.served_model)
    expected = f"expected a report folder name YYYYmmddTHHMMSSZ (the window's end, UTC) under {root}"
    if not isinstance(window, str) or not WINDOW_FOLDER.fullmatch(window):
        raise ValueError(f"window {window!r}: {expected}")
    try:
        datetime.strptime(window, FOLDER_TIME)
    except ValueError:
        raise ValueError(f"window {window!r} is not a valid time: {expected}") from None
    if not (root / window / SUMMARY_FILE).is_file():
        raise ValueError(f"window {window!r}: no checked window of {config.served_model} ends then (no {root / window / SUMMARY_FILE}); {expected}")


def silence_body(config: AnyProject, user: str, comment: str, start: datetime, end: datetime) -> dict[str, Any]:
    """Alertmanager's ``PostableSilence`` for the project's drift alerts from ``start`` to ``end``."""

    def equal(name: str, value: str) -> dict[str, Any]:
        return {"name": name, "value": value, "isRegex": False, "isEqual": True}

    return {
        "matchers": [
            equal("project", config.name),
            equal("model", config.served_model),
            {"name": "alertname", "value": "|".join(DRIFT_ALERTS), "isRegex": True, "isEqual": True},
        ],
        "startsAt": _iso(start),
        "endsAt": _iso(end),
        "createdBy": user,
        "comment": comment,
    }


def create_silence(address: str, body: dict[str, Any], timeout: float = TIMEOUT_S) -> str:
    """POST ``body`` to Alertmanager's ``/api/v2/silences`` at ``address``; the silence's id.
    ``AlertmanagerError`` naming the URL and the status and body of an error answer."""
    url = f"{alertmanager_url(address)}/api/v2/silences"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            answer = response.read()
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace").strip()[:500]
        raise AlertmanagerError(f"Alertmanager at {url} answered {error.code} {error.reason}: {text or '(no body)'}") from error
    except (urllib.error.URLError, OSError) as error:
        why = getattr(error, "reason", error)
        raise AlertmanagerError(f"Alertmanager at {url} could not be reached: {why}") from error
    try:
        silence_id = json.loads(answer)["silenceID"]
    except (ValueError, KeyError, TypeError) as error:
        raise AlertmanagerError(f"Alertmanager at {url} answered 2xx without a silenceID: {answer[:500].decode(errors='replace')}") from error
    return str(silence_id)


def acknowledge(config: AnyProject, window: str, user: str, reason: str, now: datetime | None = None) -> dict[str, Any]:
    """Acknowledge ``window`` (a checked window's report folder) of the project for ``user``
    because of ``reason``: silence its drift alerts in Alertmanager until ``now`` (default: the
    clock) + ``monitoring.acknowledge_hours``, and record it in the audit trail.

    Returns ``{"window", "until" (ISO UTC), "silence_id" (None when no Alertmanager is
    configured), "note"}``. ``ValueError`` for an unknown window, or an empty reason or user
    (nothing recorded); ``AlertmanagerError`` when Alertmanager is unreachable or refuses
    (recorded as ``failed: ...``)."""
    require_window(config, window)
    if now is not None and now.tzinfo is None:
        raise ValueError(f"now {now.isoformat()}: expected a timezone-aware time")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"acknowledging window {window}: the reason is empty; say why its drift alerts may be silenced")
    if not isinstance(user, str) or not user.strip():
        raise ValueError(f"acknowledging window {window}: the user is empty; expected the Airflow user who acknowledges")
    start = now.astimezone(timezone.utc) if now is not None else datetime.now(timezone.utc)
    until = start + timedelta(hours=config.monitoring.acknowledge_hours)
    details: dict[str, Any] = {"window": window, "until": _iso(until), "silence_id": None, "alertmanager": config.monitoring.alertmanager}

    def recorded(outcome: str) -> None:
        audit.record(config, action=audit.ACKNOWLEDGE, user=user, reason=reason, outcome=outcome, details=details, now=start)

    if config.monitoring.alertmanager is None:
        note = (
            f"window {window} of {config.name} acknowledged until {_iso(until)}; nothing was silenced: no Alertmanager is configured "
            "(set monitoring.alertmanager to its host:port in projects/defaults.yaml or the project's params.yaml)"
        )
        recorded(f"recorded until {_iso(until)}, nothing silenced (monitoring.alertmanager not set)")
        return {"window": window, "until": _iso(until), "silence_id": None, "note": note}

    comment = f"{reason.strip()} (window {window}, Flywheel on-call page)"
    try:
        silence_id = create_silence(config.monitoring.alertmanager, silence_body(config, user.strip(), comment, start, until))
    except AlertmanagerError as error:
        recorded(f"{FAILED}{error}")
        raise
    details["silence_id"] = silence_id
    recorded(f"silenced until {_iso(until)} (silence {silence_id})")
    note = (
        f"the drift alerts of {config.name} ({', '.join(DRIFT_ALERTS)} of model {config.served_model}) are silenced in "
        f"{alertmanager_url(config.monitoring.alertmanager)} until {_iso(until)} (silence {silence_id})"
    )
    return {"window": window, "until": _iso(until), "silence_id": silence_id, "note": note}


def acknowledged(config: AnyProject, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """The project's windows acknowledged and not yet expired at ``now`` (default: the clock),
    from its audit trail: window folder -> the latest such acknowledgement, ``{"user", "reason",
    "until", "time"}``. Failed acknowledgements (nothing silenced) do not count; unreadable
    lines of the trail are left to ``audit.read``'s caller to show."""
    if now is not None and now.tzinfo is None:
        raise ValueError(f"now {now.isoformat()}: expected a timezone-aware time")
    moment = now.astimezone(timezone.utc) if now is not None else datetime.now(timezone.utc)
    active: dict[str, dict[str, Any]] = {}
    entries, _ = audit.read(config)
    for entry in entries:
        details = entry.get("details")
        if entry["action"] != audit.ACKNOWLEDGE or entry["outcome"].startswith(FAILED) or not isinstance(details, dict):
            continue
        window, until = details.get("window"), details.get("until")
        if not isinstance(window, str) or not isinstance(until, str):
            continue
        try:
            expires = datetime.fromisoformat(until)
        except ValueError:
            continue
        if expires.tzinfo is not None and expires > moment:
            active[window] = {"user": entry["user"], "reason": entry["reason"], "until": until, "time": entry["time"]}
    return active
