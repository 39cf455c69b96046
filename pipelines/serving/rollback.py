"""Rollback: serve a previous version again, recorded in the model's serving history."""

from __future__ import annotations

from pipelines.config import ProjectConfig
from pipelines.metrics import Sample, emit
from pipelines.serving import live, repository


def rollback(config: ProjectConfig, model: str, version: int, run: dict) -> dict:
    """Put ``version`` of ``model`` back in service; refuses unknown and rejected versions."""
    if model != config.model.name:
        raise ValueError(f"model {model!r}: this project ({config.home / 'params.yaml'}) serves {config.model.name!r}")
    available = repository.versions(config.model_dir)
    if version not in available:
        raise ValueError(f"{model} has no version {version}; the repository holds versions {available}")
    lineage = repository.lineage_of(config.model_dir, version)
    if lineage.get("status") == "rejected":
        raise ValueError(f"{model} version {version} was rejected and is never served: {lineage['rejected_reason']}")
    previous = repository.served_version(config.model_dir)
    if version == previous:
        return {"model": model, "version": version, "previous": previous, "changed": False}
    if config.serving.triton.url:
        entry = live.go_live(config, version, run, event="rollback")
    else:
        repository.write_model_config(config.model_dir, repository.model_config(config, version))
        entry = live.record(config, "rollback", version, previous, run)
    emit(config, "rollback", [Sample("flywheel_served_version", "The version Triton serves (0: none yet).", float(version))])
    return {"model": model, "version": version, "previous": previous, "changed": True, "switch_seconds": entry.get("switch_seconds")}
