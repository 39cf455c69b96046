"""A deployment home with what the on-call pages read, written by the projects' own code, without
training a model.

The tabular project (``flights``): three versions (one rejected by its smoke test), the served
one named in ``config.pbtxt``, the serving history, run records (one challenger not promoted),
real drift reports from ``check_window`` over an inference log of real flights, and the model
card of version 2 with a rollout record (``write_card``).

The text project (``reviews``): two versions of its classifier ensemble with the lineage
``pipelines.steps.finetune_publish`` writes (gate on accuracy against the untuned base and the
champion), version 2 served (the ensemble's ``config.pbtxt`` from
``pipelines.finetune.serving.ensemble_config``), its serving history, and its run records
(one fine-tune not promoted). No drift report: text projects have no drift DAG yet."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import numpy as np

from pipelines.artifacts import REFERENCE_FILE
from pipelines.config import ProjectConfig, TextProjectConfig
from pipelines.data.replay import month_batch
from pipelines.evaluation.gate import NOT_PROMOTED, PROMOTED
from pipelines.lineage import write_json
from pipelines.monitoring.check import check_window
from pipelines.serving import live, repository
from pipelines.serving.client import write_log
from pipelines.serving.model_card import write_model_card
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


def _run(run_id: str, kind: str, dag_id: str) -> dict:
    run_type = {"schedule": "scheduled", "drift": "asset_triggered"}.get(kind, kind)
    return {"dag_id": dag_id, "run_id": run_id, "run_type": run_type, "logical_date": "None", "trigger": {"kind": kind}}


def _digest(name: str, seed: int) -> str:  # stands in for the MD5 that DVC records
    return hashlib.md5(f"{name}-{seed}".encode()).hexdigest()


def _lineage(config: ProjectConfig, run: dict, decision: dict, created_at: str, seed: int) -> dict:
    data = config.portable(config.path(config.data_dir))
    return {
        "model": config.model.name,
        "candidate": f"{run['run_id']}-c{seed}",
        "data_version": {
            f"{data}/raw.parquet": _digest("raw", seed),
            f"{data}/split/train.parquet": _digest("train", seed),
            f"{data}/split/test.parquet": _digest("test", seed),
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
    month_batch("2013-01", 20_000)[[f.name for f in config.dataset.features]].to_parquet(reference, index=False)  # as monitoring.reference_rows samples
    model_dir = config.model_dir
    dag = f"retrain__{config.name}"
    published = [
        (_run("scheduled__2026-03-01T02:00:00+00:00", "schedule", dag), gate(V1, None, None, PROMOTED, "no champion yet; roc_auc 0.6811 passes the floor 0.5"), "2026-03-01T02:14:09+00:00"),
        (_run("asset_triggered__2026-03-01T11:00:00+00:00", "drift", dag), gate(V2, V1, 1, PROMOTED, "roc_auc 0.7043 beats the champion's 0.6811 by at least 0.002"), "2026-03-01T11:21:40+00:00"),
        (_run("manual__2026-03-01T15:30:00+00:00", "manual", dag), gate(V3, V2, 2, PROMOTED, "roc_auc 0.7102 beats the champion's 0.7043 by at least 0.002"), "2026-03-01T15:44:02+00:00"),
    ]
    for seed, (run, decision, created_at) in enumerate(published, start=1):
        lineage = _lineage(config, run, decision, created_at, seed)
        version = repository.add_version(model_dir, {REFERENCE_FILE: reference}, lineage)
        write_json(run_record_path(config.artifacts_dir, run["run_id"]), {**lineage, "version": version})
        if version == 3:
            live.mark_rejected(config, version, 2, run, REJECTED_REASON)
        else:
            repository.write_model_config(model_dir, repository.model_config(config.model_dir, config.serving, config.dataset, version))
            live.record(config, "publish", version, version - 1 or None, run)
    weak = _run("scheduled__2026-03-02T02:00:00+00:00", "schedule", dag)
    write_json(
        run_record_path(config.artifacts_dir, weak["run_id"]),
        _lineage(config, weak, gate(WEAK, V2, 2, NOT_PROMOTED, "roc_auc 0.6120 does not beat the champion's 0.7043 by 0.002"), "2026-03-02T02:12:55+00:00", 9),
    )


# What the rollout DAG passes the card of a challenger in canary: per stage its sequential test
# and the traffic each version served.
ROLLOUT = {
    "shadow": {
        "decision": "promote",
        "reason": "lower bound -0.0041 above -margin 0.01",
        "rows": 812,
        "mean": 0.0031,
        "lower": -0.0041,
        "upper": 0.0102,
        "alpha": 0.05,
        "tau": 0.01,
        "margin": 0.01,
        "traffic": {"1": 5120, "2": 0},
        "agreement": 0.947,
        "latency_ms": {"p50": 2.4, "p99": 9.8},
    },
    "canary": {"decision": "continue", "rows": 57, "traffic": {"1": 4096, "2": 1024}},
}
CARD_LIMITATION = "Trained on 2013 departures from the three New York airports only."


def write_card(config: ProjectConfig) -> dict:
    """The model card of version 2 (compared with version 1), with ``ROLLOUT``; its paths."""
    return write_model_card(config, 2, ROLLOUT)


def write_drift_reports(config: ProjectConfig) -> list[dict]:
    """Log an hour of January flights and an hour of July flights answered by version 2 and check
    both windows as the drift DAG does; returns the two summaries (calm first)."""
    # July's window large enough for the calibrated check to tell the season from chance
    for start, month, rows in ((CALM, "2013-01", ROWS), (DRIFTED, "2013-07", 10_000)):
        write_log(config, month_batch(month, rows, seed=1).assign(prediction=np.float32(0.2)), 2, start + timedelta(minutes=30))
    return [check_window(config, start, start + timedelta(hours=1)) for start in (CALM, DRIFTED)]


# --- the text project ----------------------------------------------------------------------------

TEXT_V1 = {"accuracy": 0.7920, "f1_macro": 0.7611}
TEXT_V2 = {"accuracy": 0.8150, "f1_macro": 0.7904}
TEXT_BASE = {"accuracy": 0.7010, "f1_macro": 0.6588}
TEXT_WEAK = {"accuracy": 0.7050, "f1_macro": 0.6702}
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LABELS = ["negative", "positive"]
TEXT_V2_RUN = "manual__2026-03-03T09:00:00+00:00"


def finetune_gate(challenger: dict, champion: dict | None, decision: str, reason: str) -> dict:
    """A gate record as ``pipelines.finetune.evaluate.evaluate`` writes it for a classifier."""
    return {
        "decision": decision,
        "reason": reason,
        "metric": "accuracy",
        "test_records": 240,
        "challenger": challenger,
        "base": TEXT_BASE,
        "champion": champion,
    }


def _finetune_lineage(config: TextProjectConfig, run: dict, decision: dict, created_at: str, seed: int) -> dict:
    """A run's lineage as ``pipelines.steps.finetune_publish`` writes it (before publish adds the version)."""
    datasets = config.portable(config.path(config.finetune.datasets_dir))
    return {
        "project": config.name,
        "model": config.finetune.model_name,
        "candidate": f"artifacts/{config.name}/finetune/{run['run_id']}-c{seed}",
        "base_model": {"name": BASE_MODEL, "sha256": _digest("base", 0)},
        "data_version": {f"{datasets}/reviews.jsonl": _digest("reviews", seed)},
        "code_version": hashlib.sha1(f"commit-{seed}".encode()).hexdigest(),
        "params": {"base_model": BASE_MODEL, "task": "sequence-classification", "method": "lora", "r": 8, "alpha": 16,
                   "dropout": 0.1, "target_modules": ["query", "value"], "epochs": 2, "learning_rate": 0.0005,
                   "max_length": 128, "dataset": "reviews", "max_train_records": None},
        "training": {"best_val_loss": 0.41, "epochs": 2, "labels": LABELS, "accelerator": "cpu"},
        "gate": decision,
        "airflow": run,
        "created_at": created_at,
        "version": None,
    }


def write_text_versions(config: TextProjectConfig) -> None:
    """Versions 1 and 2 of the classifier ensemble published (2 serves), one fine-tune not promoted."""
    from pipelines.artifacts import SERVING_FILE
    from pipelines.finetune.serving import ensemble_config

    settings = config.home / SERVING_FILE  # what the exported tokenizer step carries: labels, max_length
    write_json(settings, {"labels": LABELS, "max_length": 128})
    dag = f"finetune__{config.name}"
    published = [
        (
            _run("manual__2026-03-02T09:00:00+00:00", "manual", dag),
            finetune_gate(TEXT_V1, None, PROMOTED, "accuracy 0.7920 beats the untuned base with a linear head (0.7010)"),
            "2026-03-02T09:41:12+00:00",
        ),
        (
            _run(TEXT_V2_RUN, "manual", dag),
            finetune_gate(TEXT_V2, TEXT_V1, PROMOTED, "accuracy 0.8150 beats the untuned base with a linear head (0.7010); accuracy 0.8150 beats the champion (0.7920)"),
            "2026-03-03T09:38:50+00:00",
        ),
    ]
    for seed, (run, decision, created_at) in enumerate(published, start=1):
        lineage = _finetune_lineage(config, run, decision, created_at, seed)
        # the ensemble's version folder last, as pipelines.finetune.serving.add_version writes them
        repository.add_version(repository.step_dir(config.served_model_dir, "tokenizer"), {SERVING_FILE: settings}, None, seed)
        version = repository.add_version(config.served_model_dir, {}, {**lineage, "exported": lineage["candidate"] + "/export"}, seed)
        repository.write_model_config(config.served_model_dir, ensemble_config(config.served_model_dir, config.serving, version))
        entry = live.record(config, "publish", version, version - 1 or None, run, model=config.served_model, switch_seconds=0.8)
        write_json(run_record_path(config.artifacts_dir, run["run_id"]), {**lineage, "version": version, "live": entry})
    weak = _run("manual__2026-03-04T09:00:00+00:00", "manual", dag)
    decision = finetune_gate(TEXT_WEAK, TEXT_V2, NOT_PROMOTED, "accuracy 0.7050 does not beat the untuned base with a linear head (0.7010) by 0.02")
    write_json(run_record_path(config.artifacts_dir, weak["run_id"]), _finetune_lineage(config, weak, decision, "2026-03-04T09:35:05+00:00", 9))
