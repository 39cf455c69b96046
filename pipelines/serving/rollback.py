"""Rollback: serve a previous version again, recorded in the model's serving history."""

from __future__ import annotations

from pipelines.config import ProjectConfig
from pipelines.metrics import emit
from pipelines.serving import live, repository
from pipelines.serving.publish import served_version_sample


def rollback(config: ProjectConfig, model: str, version: int, run: dict) -> dict:
    """Put ``version`` of ``model`` back in service; refuses unknown and rejected versions."""
    if model == config.finetune.model_name:  # the text classifier: a Triton ensemble
        from pipelines.finetune.serving import rollback_classifier

        return rollback_classifier(config, version, run)
    if model != config.model.name:
        raise ValueError(
            f"model {model!r}: this project ({config.home / 'params.yaml'}) serves {config.model.name!r} and {config.finetune.model_name!r}"
        )
    available = repository.versions(config.model_dir)
    if version not in available:
        raise ValueError(f"{model} has no version {version}; the repository holds versions {available}")
    lineage = repository.lineage_of(config.model_dir, version)
    if lineage.get("status") == "rejected":
        raise ValueError(f"{model} version {version} was rejected and is never served: {lineage['rejected_reason']}")
    previous = repository.served_version(config.model_dir)
    if version == previous:
        return {"model": model, "version": version, "previous": previous, "changed": False}
    entry = live.serve(config, version, run, event="rollback")
    emit(config, "rollback", [served_version_sample(config)])
    return {"model": model, "version": version, "previous": previous, "changed": True, "switch_seconds": entry.get("switch_seconds")}
