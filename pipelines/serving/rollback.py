"""Rollback: serve a previous version of a project's served model again, or end a rollout in
progress (the champion serves alone), recorded in its serving history."""

from __future__ import annotations

import json

from pipelines.config import AnyProject, ProjectConfig
from pipelines.errors import NotRetryable
from pipelines.lineage import Record
from pipelines.metrics import emit
from pipelines.serving import live, repository
from pipelines.serving.publish import served_version_sample


class RollbackRefused(NotRetryable, ValueError):
    """An unknown or rejected version, or nothing to roll back to: the same request fails the same way."""


def rollback(config: AnyProject, version: int | None, run: Record, reason: str = "", rollout_only: bool = False) -> Record:
    """Put ``version`` of the project's served model (tabular or text) back in service, with no
    smoke test (it passed one); refuses unknown and rejected versions.

    ``version`` None (an alert's rollback, which cannot know versions): a rollout in progress ends
    and the champion serves alone; with none in progress, the version served before the current
    one (``previous_served``) serves again. A rollout in progress also ends when another version
    is named. ``reason`` goes into the serving history. ``rollout_only`` (an alert's rollback):
    without a rollout in progress, change nothing (a second alert of a rollout already ended, or
    one firing again after a restart, must not roll the champion back)."""
    from pipelines.serving import rollout

    model, folder = config.served_model, config.served_model_dir
    routed = repository.route_of(folder)
    ended = None
    if routed is not None and isinstance(config, ProjectConfig):
        rollout.advance(config, routed.challenger, rollout.ABORTED, run, reason=f"rollback: {reason or 'no reason given'}")
        ended = routed.challenger
        if version is None:
            emit(config.metrics, config.identity, "rollback", [served_version_sample(folder)])
            served = repository.served_version(folder)
            return {"model": model, "version": served, "previous": served, "changed": True, "ended_rollout": ended, "reason": reason}
    if rollout_only and ended is None:
        served = repository.served_version(folder)
        return {"model": model, "version": served, "previous": served, "changed": False, "ended_rollout": None, "reason": f"no rollout in progress: nothing done ({reason})"}
    if version is None:
        version = previous_served(config)
    available = repository.versions(folder)
    if version not in available:
        raise RollbackRefused(f"project {config.name}: {model} has no version {version}; the repository holds versions {available}")
    lineage = repository.lineage_of(folder, version)
    if lineage.get("status") == "rejected":
        raise RollbackRefused(f"project {config.name}: {model} version {version} was rejected and is never served: {lineage['rejected_reason']}")
    previous = repository.served_version(folder)
    if version == previous:
        return {"model": model, "version": version, "previous": previous, "changed": ended is not None, "ended_rollout": ended, "reason": reason}
    entry = live.serve(config, version, {**run, "reason": reason}, event="rollback")
    emit(config.metrics, config.identity, "rollback", [served_version_sample(folder)])
    return {"model": model, "version": version, "previous": previous, "changed": True, "ended_rollout": ended, "reason": reason, "switch_seconds": entry.get("switch_seconds")}


def previous_served(config: AnyProject) -> int:
    """The version served before the current one, from the serving history (the ``previous`` of
    the entry that made the current version serve); ``RollbackRefused`` if there is none."""
    current = repository.served_version(config.served_model_dir)
    path = live.history_path(config.artifacts_dir, config.served_model)
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    for entry in reversed(entries):
        if entry.get("version") == current and entry.get("previous") not in (None, current) and entry.get("event") != "rejected":
            return int(entry["previous"])
    raise RollbackRefused(f"project {config.name}: {config.served_model} serves version {current} and the serving history names no version served before it; name the version")
