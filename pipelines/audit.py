"""The audit trail: every human action on a project (a retrain or rollback triggered from the
on-call page, an acknowledgement, a forced publish, a rollout approval), who took it, why, and
how it ended.

One file a project, ``<artifacts_dir>/audit.jsonl``: one JSON object a line, oldest first,
only ever appended to. An entry::

    {"time": "2026-03-02T11:04:10+00:00", "project": "flights", "action": "rollback",
     "user": "alice", "reason": "v4 drops 3 points on carrier=UA", "outcome": "triggered",
     "dag_id": "rollback__flights", "run_id": "manual__...", "details": {"version": 3}}

``dag_id``, ``run_id`` and ``details`` are present only when given. Appends hold an OS file
lock (``audit.jsonl.lock``, released if the process dies) and are flushed and fsynced; a line
torn by a crash mid-write is ended before the next entry is appended, so it stays a line of
its own, which ``read`` reports as unreadable rather than hiding it or a good entry after it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.config import Project

AUDIT_FILE = "audit.jsonl"
LOCK_TIMEOUT_S = 30.0  # an append takes milliseconds; waiting longer means a stuck holder

RETRAIN, ROLLBACK, ACKNOWLEDGE, FORCE_PUBLISH, APPROVAL = "retrain", "rollback", "acknowledge", "force_publish", "approval"
ACTIONS = (RETRAIN, ROLLBACK, ACKNOWLEDGE, FORCE_PUBLISH, APPROVAL)
# An approval may go without a reason (approving is the reason); every other action needs one.
REASON_OPTIONAL = frozenset({APPROVAL})
REQUIRED = ("time", "project", "action", "user", "reason", "outcome")

Entry = dict[str, Any]


def audit_file(config: Project) -> Path:
    """The project's audit trail: ``<artifacts_dir>/audit.jsonl``."""
    return config.path(config.artifacts_dir) / AUDIT_FILE


def _lock(file: Path) -> Any:
    from filelock import FileLock

    file.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(file.with_name(f"{file.name}.lock"), timeout=LOCK_TIMEOUT_S)


def _utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{name} {moment.isoformat()}: expected a timezone-aware time (e.g. datetime.now(timezone.utc))")
    return moment.astimezone(timezone.utc)


def record(
    config: Project,
    *,
    action: str,
    user: str,
    reason: str,
    outcome: str,
    dag_id: str | None = None,
    run_id: str | None = None,
    details: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Entry:
    """Append one entry to the project's audit trail and return it.

    ``action``: one of ``ACTIONS``; ``user``: the Airflow user who acted; ``reason``: why (may
    be empty only for an approval); ``outcome``: how it ended, in words ("triggered run ...",
    "failed: ..."); ``details``: anything else, JSON-serializable; ``now``: the time (aware;
    default: the clock), written in UTC. ``ValueError`` naming the field for anything else.
    """
    if action not in ACTIONS:
        raise ValueError(f"audit action {action!r}: expected one of {list(ACTIONS)}")
    for name, value in (("user", user), ("outcome", outcome), ("reason", reason)):
        if not isinstance(value, str):
            raise ValueError(f"audit {name} {value!r}: expected a string")
    if not user.strip():
        raise ValueError("audit user is empty: expected the name of the user who acted")
    if not outcome.strip():
        raise ValueError(f"audit outcome of {action} is empty: expected how the action ended")
    if not reason.strip() and action not in REASON_OPTIONAL:
        raise ValueError(f"audit reason of {action} is empty: every action but {sorted(REASON_OPTIONAL)} needs one")
    moment = _utc(now, "now") if now is not None else datetime.now(timezone.utc)
    entry: Entry = {
        "time": moment.isoformat(timespec="seconds"),
        "project": config.name,
        "action": action,
        "user": user.strip(),
        "reason": reason.strip(),
        "outcome": outcome.strip(),
    }
    if dag_id is not None:
        entry["dag_id"] = dag_id
    if run_id is not None:
        entry["run_id"] = run_id
    if details is not None:
        entry["details"] = details
    try:
        line = (json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as error:
        raise ValueError(f"audit details {details!r}: expected JSON-serializable values ({error})") from error
    _append(audit_file(config), line)
    return entry


def _append(file: Path, line: bytes) -> None:
    with _lock(file):
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            # A crash mid-append left a torn line: end it, so it does not swallow this entry.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


def _problem(number: int, text: str) -> str | Entry:
    """The entry on line ``number``, or why it is not one."""
    shown = text if len(text) <= 120 else text[:117] + "..."
    try:
        entry = json.loads(text)
    except ValueError as error:
        return f"line {number}: not JSON ({error.args[0] if error.args else error}): {shown}"
    if not isinstance(entry, dict):
        return f"line {number}: not a JSON object: {shown}"
    missing = [key for key in REQUIRED if not isinstance(entry.get(key), str)]
    if missing:
        return f"line {number}: missing {', '.join(missing)}: {shown}"
    try:
        _utc(datetime.fromisoformat(entry["time"]), "time")
    except ValueError as error:
        return f"line {number}: time {entry['time']!r} is not an aware ISO 8601 time ({error}): {shown}"
    return entry


def read(config: Project) -> tuple[list[Entry], list[str]]:
    """The project's audit entries, oldest first, and its unreadable lines, each as
    ``"line N: <why>: <text>"`` (N from 1): a torn or hand-edited line is reported, not hidden.
    No file yet: no entries. Reads under the append lock, so it never sees a half-written line."""
    file = audit_file(config)
    if not file.exists():
        return [], []
    with _lock(file):
        data = file.read_bytes()
    entries: list[Entry] = []
    problems: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        parsed = _problem(number, text)
        if isinstance(parsed, str):
            problems.append(parsed)
        else:
            entries.append(parsed)
    return entries, problems


def entry_time(entry: Entry) -> datetime:
    """An entry's time, in UTC."""
    return datetime.fromisoformat(entry["time"]).astimezone(timezone.utc)


def select(
    entries: Iterable[Entry],
    *,
    project: str | None = None,
    action: str | None = None,
    user: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Entry]:
    """The entries that match every filter given, newest first (entries of the same time: the
    later appended first). ``project``, ``action``, ``user``: exact matches; ``since``/``until``:
    aware times, both inclusive. ``ValueError`` for an unknown action or a naive time."""
    if action is not None and action not in ACTIONS:
        raise ValueError(f"audit action {action!r}: expected one of {list(ACTIONS)}")
    start = _utc(since, "since") if since is not None else None
    end = _utc(until, "until") if until is not None else None
    kept = [
        entry
        for entry in entries
        if (project is None or entry.get("project") == project)
        and (action is None or entry.get("action") == action)
        and (user is None or entry.get("user") == user)
        and (start is None or entry_time(entry) >= start)
        and (end is None or entry_time(entry) <= end)
    ]
    # sorted() is stable with reverse=True too: reversing first puts later appends first among ties.
    return sorted(reversed(kept), key=entry_time, reverse=True)


def to_jsonl(entries: Iterable[Entry]) -> str:
    """``entries`` as JSON lines (one object a line, each ending in a newline), in the order given."""
    return "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries)
