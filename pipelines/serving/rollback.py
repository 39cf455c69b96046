"""Rollback: serve a previous version of a project's model again, recorded in its serving history."""

from __future__ import annotations

from pipelines.config import AnyProject, ProjectConfig
from pipelines.errors import NotRetryable
from pipelines.metrics import emit
from pipelines.serving import live, repository
from pipelines.serving.publish import served_version_sample


class RollbackRefused(NotRetryable, ValueError):
    """An unknown or rejected version: the same request fails the same way."""


def rollback(config: AnyProject, version: int, run: dict) -> dict:
    """Put ``version`` of the project's served model back in service; refuses unknown and rejected versions."""
    if not isinstance(config, ProjectConfig):  # a text project: the classifier's Triton ensemble
        from pipelines.finetune.serving import rollback_classifier

        return rollback_classifier(config, version, run)
    model = config.model.name
    available = repository.versions(config.model_dir)
    if version not in available:
        raise RollbackRefused(f"project {config.name}: {model} has no version {version}; the repository holds versions {available}")
    lineage = repository.lineage_of(config.model_dir, version)
    if lineage.get("status") == "rejected":
        raise RollbackRefused(f"project {config.name}: {model} version {version} was rejected and is never served: {lineage['rejected_reason']}")
    previous = repository.served_version(config.model_dir)
    if version == previous:
        return {"model": model, "version": version, "previous": previous, "changed": False}
    entry = live.serve(config, version, run, event="rollback")
    emit(config, "rollback", [served_version_sample(config)])
    return {"model": model, "version": version, "previous": previous, "changed": True, "switch_seconds": entry.get("switch_seconds")}
