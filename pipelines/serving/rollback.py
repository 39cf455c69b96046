"""Rollback: serve a previous version of a project's model again, recorded in its serving history."""

from __future__ import annotations

from pipelines.config import AnyProject
from pipelines.errors import NotRetryable
from pipelines.lineage import Record
from pipelines.metrics import emit
from pipelines.serving import live, repository
from pipelines.serving.publish import served_version_sample


class RollbackRefused(NotRetryable, ValueError):
    """An unknown or rejected version: the same request fails the same way."""


def rollback(config: AnyProject, version: int, run: Record) -> Record:
    """Put ``version`` of the project's served model (tabular or text) back in service, with no
    smoke test (it passed one); refuses unknown and rejected versions."""
    model, folder = config.served_model, config.served_model_dir
    available = repository.versions(folder)
    if version not in available:
        raise RollbackRefused(f"project {config.name}: {model} has no version {version}; the repository holds versions {available}")
    lineage = repository.lineage_of(folder, version)
    if lineage.get("status") == "rejected":
        raise RollbackRefused(f"project {config.name}: {model} version {version} was rejected and is never served: {lineage['rejected_reason']}")
    previous = repository.served_version(folder)
    if version == previous:
        return {"model": model, "version": version, "previous": previous, "changed": False}
    entry = live.serve(config, version, run, event="rollback")
    emit(config.metrics, config.identity, "rollback", [served_version_sample(folder)])
    return {"model": model, "version": version, "previous": previous, "changed": True, "switch_seconds": entry.get("switch_seconds")}
