"""Publish: record the run's lineage and, when the gate promoted the candidate, make it a
new served version of the model repository, live in Triton when one is configured.

Either the new version is complete and ``config.pbtxt`` names it, or the repository serves
what it served before. A version that fails its smoke test in Triton stays on disk marked
rejected. A retried publish of the same Airflow run finds its version and does not add another.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from pathlib import Path

from pipelines import tracking
from pipelines.artifacts import MODEL_FILE, PLAN_FILE
from pipelines.config import AnyProject, ProjectConfig
from pipelines.data.split import split_paths
from pipelines.evaluation.gate import PROMOTED
from pipelines.feedback.reference import write_reference as write_performance_reference
from pipelines.lineage import Record, code_version, read_json, write_json
from pipelines.metrics import Sample, emit
from pipelines.monitoring.check import write_reference
from pipelines.serving import live, repository, rollout

log = logging.getLogger(__name__)
# The settings a version was trained and gated with, in its lineage record.
LINEAGE_PARAMS: dict[str, set[str] | bool] = {
    "dataset": {"id_column", "time_column", "label", "features"},
    "split": {"seed", "train", "val", "test"},
    "model": True,
    "train": True,
    "gate": True,
    "export": True,
}


def runs_dir(artifacts_dir: Path) -> Path:
    """One lineage record per training run (retrain or finetune) of a project, promoted or not,
    in its ``artifacts_dir``."""
    return artifacts_dir / "runs"


def run_record_path(artifacts_dir: Path, run_id: str) -> Path:
    """The lineage record of Airflow run ``run_id`` (a file name made of it) in ``runs_dir``."""
    return runs_dir(artifacts_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)}.json"


def publish(
    config: ProjectConfig,
    candidate: str,
    gate: Record,
    data_version: dict[str, str],
    run: Record,
    overrides: Record | None = None,
) -> Record:
    """Write the run's lineage record; add and serve a new version if the gate promoted it.

    ``run`` names the Airflow run (dag_id, run_id, logical_date, run_type); ``overrides`` are
    the Params the run was triggered with.
    """
    folder = config.path(Path(candidate))
    training = read_json(folder / "candidate.json")
    lineage: Record = {
        "model": config.model.name,
        "candidate": folder.name,
        "data_version": data_version,
        "code_version": code_version(),
        "params": config.model_dump(mode="json", include=LINEAGE_PARAMS),
        "overrides": overrides or {},
        "training": {k: v for k, v in training.items() if k != "inputs"},
        "export": read_json(folder / "export.json"),
        "gate": gate,
        "airflow": run,
        # the MLflow run of the candidate, with what training lost of it; tagged with the version below
        "tracking": training.get("tracking") or tracking.candidate_run(folder),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": None,
    }
    model_dir = config.model_dir
    if gate["decision"] == PROMOTED:
        version = repository.version_of_run(model_dir, run["run_id"])
        if version is None:
            # what the drift check compares with
            train = split_paths(config.split.output_dir)["train"]
            baseline = write_reference(train, config.dataset, config.monitoring, config.train.seed, folder)
            lineage["drift_calibration"] = baseline["calibration"]
            fit = training.get("fit_seconds")
            log.info("drift thresholds calibrated in %.1f s%s", baseline["calibration"]["seconds"], f" ({baseline['calibration']['seconds'] / fit:.0%} of the training's {fit:.1f} s)" if fit else "")
            # what production performance is compared with and estimated from; a model ONNX Runtime
            # cannot run is for the smoke test to refuse, with the version recorded as rejected
            try:
                scored = write_performance_reference(split_paths(config.split.output_dir)["test"], config.dataset, folder / MODEL_FILE, config.performance.seed, folder)
            except Exception as failed:  # noqa: BLE001 - ONNX Runtime raises many kinds for a broken model
                log.warning("no performance reference: scoring the test split failed: %s", failed)
                scored = {"files": {}, "error": f"{type(failed).__name__}: {failed}"}
            lineage["performance_reference"] = {k: v for k, v in scored.items() if k != "files"}
            files = {MODEL_FILE: folder / MODEL_FILE, **repository.BACKEND_FILES, **baseline["files"], **scored["files"]}
            version = repository.next_version(model_dir, *(repository.step_dir(model_dir, s) for s in repository.ENGINE_STEPS))
            if (folder / PLAN_FILE).is_file():  # export built a TensorRT engine: the gpu profile serves it
                repository.add_engine_steps(model_dir, folder, version)
            version = repository.add_version(model_dir, files, lineage, version)
        lineage["version"] = version
        champion = repository.served_version(model_dir)
        try:
            if config.rollout.enabled and champion is not None and champion != version:  # a first version serves in full
                lineage["live"] = rollout.start(config, version, run)
            else:
                lineage["live"] = live.serve(config, version, run, event="publish")
        except Exception as failed:  # the smoke test refused it, or Triton did not answer
            outcome = "rejected" if isinstance(failed, live.SmokeTestError) else "failed"
            lineage["live"] = {"event": outcome, "reason": str(failed)}
            write_json(run_record_path(config.artifacts_dir, run["run_id"]), lineage)
            report(config, outcome, gate)
            raise
        log.info("published %s version %d: %s", config.model.name, version, gate["reason"])
    else:
        log.info("not promoted: %s; the candidate stays in %s with its metrics", gate["reason"], folder)
    record = write_json(run_record_path(config.artifacts_dir, run["run_id"]), lineage)
    if lineage["version"] is not None:
        tracking.tag_version(lineage["tracking"], lineage["version"], config.portable(record), config.tracking.timeout_s)
    report(config, gate["decision"], gate)
    routed = repository.route_of(model_dir)
    return {
        "decision": gate["decision"],
        "version": lineage["version"],
        "served_version": repository.served_version(model_dir),
        "rollout": routed.challenger if routed is not None and routed.challenger == lineage["version"] else None,
        "lineage": config.portable(record),
    }


def report(config: AnyProject, outcome: str, gate: Record) -> None:
    """The publish outcome, both gate metrics, the served version and how many challengers in a
    row the gate refused, for Prometheus."""
    samples = [
        Sample("flywheel_publish_outcome", "1 for the outcome of the latest publish (promoted, not promoted, rejected, failed).", 1.0, {"outcome": outcome.replace(" ", "_")}),
        served_version_sample(config.served_model_dir),
        Sample("flywheel_gate_rejections_in_a_row", "Latest runs in a row whose challenger the gate did not promote.", float(rejections_in_a_row(config.artifacts_dir))),
    ]
    for role in ("challenger", "champion"):
        for metric, value in (gate.get(role) or {}).items():
            if isinstance(value, int | float):  # a text project's gate also records counts and names
                samples.append(Sample("flywheel_gate_metric", "Gate metrics of the latest challenger and champion on the same test split.", value, {"role": role, "metric": metric}))
    emit(config.metrics, config.identity, "publish", samples)


def run_records(artifacts_dir: Path) -> list[Record]:
    """The lineage records of a project's completed training runs (one per Airflow run), oldest first."""
    files = sorted(runs_dir(artifacts_dir).glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    return sorted((read_json(p) for p in files), key=lambda r: r["created_at"])  # stable: same second keeps write order


def rejections_in_a_row(artifacts_dir: Path) -> int:
    """Trailing run records in a project's ``artifacts_dir`` (one per Airflow run, so retries
    count once) the gate did not promote."""
    count = 0
    for record in reversed(run_records(artifacts_dir)):
        if record["gate"]["decision"] == PROMOTED:
            break
        count += 1
    return count


def served_version_sample(model_dir: Path) -> Sample:
    """The version the model in ``model_dir`` serves, as a metric sample (0: none yet)."""
    return Sample("flywheel_served_version", "The version Triton serves (0: none yet).", float(repository.served_version(model_dir) or 0))
