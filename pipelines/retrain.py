"""The steps of the retrain DAG, one function a task, each with plain arguments and a small
JSON-able result. The project is the one in ``$FLYWHEEL_HOME`` (see ``pipelines.config``).
"""

from __future__ import annotations

from pipelines.config import load_config


def check_params(force_publish: bool, force_reason: str | None) -> dict:
    """Refuse bad combinations of Params before any work is done."""
    from pipelines.evaluation.gate import check_override

    check_override(force_publish, force_reason)
    return {"force_publish": force_publish}


def validate() -> dict:
    """Validate new landing batches; passing ones join the raw data, failing ones go to quarantine."""
    from pipelines.data.ingest import ingest_landing

    return ingest_landing(load_config())


def version_data() -> dict:
    """Reproduce and push the DVC split stage; return the data version."""
    from pipelines.data.versioning import version_split

    return version_split(load_config())


def train(data_version: dict[str, str], max_epochs: int | None, learning_rate: float | None) -> dict:
    from pipelines.training.train import train as fit

    return fit(load_config(), data_version, max_epochs=max_epochs, learning_rate=learning_rate)


def export(candidate: str) -> dict:
    from pipelines.export.onnx import export as to_onnx

    return to_onnx(load_config(), candidate)


def gate(candidate: str, force_publish: bool, force_reason: str | None) -> dict:
    from pipelines.evaluation.gate import evaluate

    return evaluate(load_config(), candidate, force_publish, force_reason)


def trigger(run_type: str, drift_events: list[dict]) -> dict:
    """Why a run ran, for its lineage: the schedule, drift (with its reports), or a person."""
    if run_type == "asset_triggered":
        return {"kind": "drift", "events": drift_events}
    return {"kind": {"scheduled": "schedule"}.get(run_type, run_type)}


def publish(candidate: str, gate: dict, data_version: dict[str, str], run: dict, overrides: dict) -> dict:
    from pipelines.serving.publish import publish as release

    return release(load_config(), candidate, gate, data_version, run, overrides)
