"""A project home with what the on-call pages read, written by the project's own code, without
training a model: three versions (one rejected by its smoke test), the served one named in
``config.pbtxt``, the serving history, run records (one challenger not promoted), and real
drift reports from ``check_window`` over an inference log of real flights."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import numpy as np

from pipelines.config import ProjectConfig
from pipelines.data.replay import month_batch
from pipelines.evaluation.gate import NOT_PROMOTED, PROMOTED
from pipelines.lineage import write_json
from pipelines.monitoring.check import REFERENCE_FILE, check_window
from pipelines.serving import live, repository
from pipelines.serving.client import InferenceLog
from pipelines.serving.publish import run_record_path

ROWS = 2000
REJECTED_REASON = "version 3 of flights_delay answers differently through Triton than ONNX Runtime locally: max difference 0.02"
# Two checked windows: January's flights (what the versions trained on) and July's.
CALM = datetime(2026, 3, 2, 9, tzinfo=timezone.utc)
DRIFTED = datetime(2026, 3, 2, 10, tzinfo=timezone.utc)


def gate(challenger: dict, champion: dict | None, champion_version: int | None, decision: str, reason: str) -> dict:
    """A gate record as ``pipelines.evaluation.gate.evaluate`` writes it."""
    return {
        "decision": decision,
        "reason": reason,
        "metric": "roc_auc",
        "forced": False,
        "test_rows": 900,
        "challenger": challenger,
        "champion": champion,
        "champion_version": champion_version,
    }


V1 = {"roc_auc": 0.6811, "f1": 0.2104, "log_loss": 0.4702}
V2 = {"roc_auc": 0.7043, "f1": 0.2450, "log_loss": 0.4588}
V3 = {"roc_auc": 0.7102, "f1": 0.2511, "log_loss": 0.4561}
WEAK = {"roc_auc": 0.6120, "f1": 0.1010, "log_loss": 0.5105}


def _run(run_id: str, kind: str) -> dict:
    run_type = {"schedule": "scheduled", "drift": "asset_triggered"}.get(kind, kind)
    return {"dag_id": "retrain", "run_id": run_id, "run_type": run_type, "logical_date": "None", "trigger": {"kind": kind}}


def _lineage(config: ProjectConfig, run: dict, decision: dict, created_at: str, seed: int) -> dict:
    def digest(name: str) -> str:  # stands in for the MD5 that DVC records
        return hashlib.md5(f"{name}-{seed}".encode()).hexdigest()

    return {
        "model": config.model.name,
        "candidate": f"{run['run_id']}-c{seed}",
        "data_version": {
            "data/raw/flights.parquet": digest("raw"),
            "data/split/train.parquet": digest("train"),
            "data/split/test.parquet": digest("test"),
        },
        "code_version": hashlib.sha1(f"commit-{seed}".encode()).hexdigest(),
        "params": {},
        "overrides": {},
        "training": {"epochs": 3},
        "export": {"parity_max_difference": 1e-6},
        "gate": decision,
        "airflow": run,
        "created_at": created_at,
        "version": None,
    }


def write_versions(config: ProjectConfig) -> None:
    """Versions 1 and 2 published (2 serves), 3 rejected by its smoke test, one run not promoted."""
    reference = config.home / REFERENCE_FILE
    month_batch("2013-01", ROWS)[[f.name for f in config.dataset.features]].to_parquet(reference, index=False)
    model_dir = config.model_dir
    published = [
        (_run("scheduled__2026-03-01T02:00:00+00:00", "schedule"), gate(V1, None, None, PROMOTED, "no champion yet; roc_auc 0.6811 passes the floor 0.5"), "2026-03-01T02:14:09+00:00"),
        (_run("asset_triggered__2026-03-01T11:00:00+00:00", "drift"), gate(V2, V1, 1, PROMOTED, "roc_auc 0.7043 beats the champion's 0.6811 by at least 0.002"), "2026-03-01T11:21:40+00:00"),
        (_run("manual__2026-03-01T15:30:00+00:00", "manual"), gate(V3, V2, 2, PROMOTED, "roc_auc 0.7102 beats the champion's 0.7043 by at least 0.002"), "2026-03-01T15:44:02+00:00"),
    ]
    for seed, (run, decision, created_at) in enumerate(published, start=1):
        lineage = _lineage(config, run, decision, created_at, seed)
        version = repository.add_version(model_dir, {REFERENCE_FILE: reference}, lineage)
        write_json(run_record_path(config, run["run_id"]), {**lineage, "version": version})
        if version == 3:
            live.mark_rejected(config, version, REJECTED_REASON)
            live.record(config, "rejected", version, 2, run, reason=REJECTED_REASON)
        else:
            repository.write_model_config(model_dir, repository.model_config(config, version))
            live.record(config, "publish", version, version - 1 or None, run)
    weak = _run("scheduled__2026-03-02T02:00:00+00:00", "schedule")
    write_json(
        run_record_path(config, weak["run_id"]),
        _lineage(config, weak, gate(WEAK, V2, 2, NOT_PROMOTED, "roc_auc 0.6120 does not beat the champion's 0.7043 by 0.002"), "2026-03-02T02:12:55+00:00", 9),
    )


def write_drift_reports(config: ProjectConfig) -> list[dict]:
    """Log an hour of January flights and an hour of July flights answered by version 2 and check
    both windows as the drift DAG does; returns the two summaries (calm first)."""
    with InferenceLog(config) as log:
        for start, month in ((CALM, "2013-01"), (DRIFTED, "2013-07")):
            rows = month_batch(month, ROWS, seed=1)
            log.append(rows, np.full(len(rows), 0.2, dtype="float32"), version=2, served_at=start + timedelta(minutes=30))
    return [check_window(config, start, start + timedelta(hours=1)) for start in (CALM, DRIFTED)]
