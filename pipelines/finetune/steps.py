"""The steps of the finetune DAG, one function a task, each with plain arguments and a small
JSON-able result. The project is the one in ``$FLYWHEEL_HOME`` (see ``pipelines.config``).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from pathlib import Path

from pipelines.config import FinetuneTask, load_config

log = logging.getLogger(__name__)
EXPORT_DIR = "export"


def check_params(raw: dict) -> dict:
    """Refuse bad Params before any work; the checked Params, with the base model's path."""
    from pipelines.finetune.params import check

    return check(load_config(), raw)


def validate(dataset: str) -> dict:
    """Validate a landed file of the dataset, if any: bad records to quarantine, the rest become the dataset."""
    from pipelines.finetune.data import ingest

    return ingest(load_config(), dataset)


def version_data(dataset: str) -> dict:
    from pipelines.finetune.data import version

    return {"data_version": version(load_config(), dataset)}


def finetune(checked: dict, data_version: dict[str, str]) -> dict:
    from pipelines.finetune.train import finetune as fit

    return fit(load_config(), checked, data_version)


def export(candidate: str) -> dict:
    """Merge the adapter and export a classifier to ONNX (parity-checked); a causal LM is kept merged-on-demand."""
    from pipelines.finetune.data import load_splits
    from pipelines.finetune.export import export_classifier
    from pipelines.finetune.params import resolve_base
    from pipelines.finetune.train import CANDIDATE_FILE, load_tokenizer, merged
    from pipelines.lineage import read_json, write_json

    config = load_config()
    candidate = config.path(Path(candidate))
    record = read_json(candidate / CANDIDATE_FILE)
    params = record["inputs"]["params"]
    if params["task"] != FinetuneTask.sequence_classification.value:
        return {"folder": None, "reason": "causal LMs are evaluated and kept as adapters; only classifiers are exported for Triton"}
    texts = [r["text"] for r in load_splits(config, params["dataset"])["val"][:64]]
    folder = candidate / EXPORT_DIR
    exported = export_classifier(
        merged(candidate), load_tokenizer(resolve_base(params["base_model"])), record["result"]["labels"],
        params["max_length"], folder, texts, config.finetune.parity_tolerance,
    )
    exported["onnx"] = config.portable(Path(exported["onnx"]))
    write_json(candidate / "export.json", exported)
    return {"folder": config.portable(folder), **exported}


def evaluate(candidate: str, export_folder: str | None) -> dict:
    from pipelines.finetune.evaluate import evaluate as score

    return score(load_config(), candidate, export_folder)


def publish(candidate: str, export_folder: str | None, decision: dict, data_version: dict[str, str], run: dict) -> dict:
    """Record the run's lineage; a promoted classifier becomes a served version of the ensemble."""
    from pipelines.evaluation.gate import PROMOTED
    from pipelines.finetune.train import CANDIDATE_FILE
    from pipelines.lineage import code_version, read_json, write_json

    config = load_config()
    record = read_json(config.path(Path(candidate)) / CANDIDATE_FILE)
    lineage = {
        "model": config.finetune.model_name,
        "candidate": candidate,
        "base_model": record["inputs"]["base"],
        "data_version": data_version,
        "code_version": code_version(),
        "params": record["inputs"]["params"],
        "training": record["result"],
        "gate": decision,
        "airflow": run,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": None,
    }
    if decision["decision"] == PROMOTED and export_folder:
        from pipelines.finetune import serving

        lineage.update(serving.publish_classifier(config, config.path(Path(export_folder)), lineage, run))
    elif decision["decision"] == PROMOTED:
        lineage["served"] = "no: causal LMs are not served through Triton; the adapter and its lineage are the result"
    runs = config.path(config.artifacts_dir) / "finetune" / "runs"
    path = write_json(runs / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', run['run_id'])}.json", lineage)
    return {"decision": decision["decision"], "version": lineage["version"], "lineage": config.portable(path)}
