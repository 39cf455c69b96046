"""The gate: challenger and champion scored on the same test split; only a better model passes.

Both are scored from their ONNX files with ONNX Runtime, the artifact that is (or would be)
served, so the comparison is of what clients get, not of two different code paths.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import LOWER_IS_BETTER, ProjectConfig, Task

log = logging.getLogger(__name__)
PROMOTED, NOT_PROMOTED = "promoted", "not promoted"


def check_override(force_publish: bool, force_reason: str | None) -> None:
    """Refuse a forced publish that does not say why: the reason goes into the lineage."""
    if force_publish and not (force_reason or "").strip():
        raise ValueError("force_publish is set but force_reason is empty: say why the gate is overridden")


def metrics(task: Task, truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Classification: ROC AUC, F1 at 0.5 and log loss; regression: RMSE and MAE."""
    from sklearn import metrics as m

    if task == Task.classification:
        return {
            "roc_auc": float(m.roc_auc_score(truth, predicted)),
            "f1": float(m.f1_score(truth, predicted >= 0.5)),
            "log_loss": float(m.log_loss(truth, np.clip(predicted, 1e-7, 1 - 1e-7), labels=[0, 1])),
        }
    return {
        "rmse": float(np.sqrt(m.mean_squared_error(truth, predicted))),
        "mae": float(m.mean_absolute_error(truth, predicted)),
    }


def predict_onnx(model_file: Path, frame: pd.DataFrame) -> np.ndarray:
    """Score raw rows with an exported model, feeding each input the graph asks for."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in frame.columns:
            raise KeyError(f"{model_file} needs column {spec.name!r}, which the test split does not have")
        column = frame[spec.name]
        values = column.astype(str).to_numpy(object) if spec.type == "tensor(string)" else column.to_numpy("float32")
        feeds[spec.name] = values.reshape(-1, 1)
    (out,) = session.run(None, feeds)
    return out[:, 0]


def beats(metric: str, challenger: float, champion: float, margin: float) -> bool:
    """Whether ``challenger`` is better than ``champion`` by at least ``margin`` in the metric's
    direction. A tie is never better, whatever the margin: a challenger equal to the champion
    (the same model retrained on the same data) is not promoted."""
    gain = champion - challenger if metric in LOWER_IS_BETTER else challenger - champion
    return gain > 0 and gain >= margin


def passes_floor(metric: str, value: float, floor: float) -> bool:
    return value <= floor if metric in LOWER_IS_BETTER else value >= floor


def decide(
    config: ProjectConfig,
    challenger_onnx: Path,
    champion_onnx: Path | None,
    force_publish: bool = False,
    force_reason: str | None = None,
) -> dict:
    """Score both models on the test split and decide; the result carries both sets of metrics."""
    from pipelines.data.split import split_paths

    check_override(force_publish, force_reason)
    test = pd.read_parquet(split_paths(config)["test"])
    truth = test[config.dataset.label.column].to_numpy()
    task, gate = config.dataset.label.task, config.gate
    challenger = metrics(task, truth, predict_onnx(challenger_onnx, test))
    champion = metrics(task, truth, predict_onnx(champion_onnx, test)) if champion_onnx else None
    ours = challenger[gate.metric]

    if not passes_floor(gate.metric, ours, gate.floor):
        promoted, reason = False, f"{gate.metric} {ours:.4f} does not pass the floor {gate.floor:g}"
    elif champion is None:
        promoted, reason = True, f"no champion yet; {gate.metric} {ours:.4f} passes the floor {gate.floor:g}"
    elif beats(gate.metric, ours, champion[gate.metric], gate.min_improvement):
        promoted, reason = True, (
            f"{gate.metric} {ours:.4f} beats the champion's {champion[gate.metric]:.4f} by at least {gate.min_improvement:g}"
        )
    else:
        promoted, reason = False, (
            f"{gate.metric} {ours:.4f} does not beat the champion's {champion[gate.metric]:.4f} by {gate.min_improvement:g}"
        )
    if force_publish and not promoted:
        promoted, reason = True, f"forced: {force_reason.strip()} (the gate said: {reason})"
    decision = {
        "decision": PROMOTED if promoted else NOT_PROMOTED,
        "reason": reason,
        "metric": gate.metric,
        "forced": force_publish,
        "test_rows": len(test),
        "challenger": challenger,
        "champion": champion,
    }
    log.info("gate: %s (%s)", decision["decision"], reason)
    return decision


def evaluate(config: ProjectConfig, candidate: str, force_publish: bool = False, force_reason: str | None = None) -> dict:
    """Gate a candidate against the version in service (if any) and record the decision beside it."""
    from pipelines.artifacts import MODEL_FILE
    from pipelines.lineage import write_json
    from pipelines.serving.repository import served_version

    champion_version = served_version(config.model_dir)
    champion_onnx = config.model_dir / str(champion_version) / MODEL_FILE if champion_version else None
    folder = config.path(Path(candidate))
    decision = decide(config, folder / MODEL_FILE, champion_onnx, force_publish, force_reason)
    decision["champion_version"] = champion_version
    write_json(folder / "gate.json", decision)
    return decision
