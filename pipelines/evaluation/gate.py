"""The gate: challenger and champion scored on the same test split; only a better model passes.

Both are scored from their ONNX files with ONNX Runtime, the artifact that is (or would be)
served, so the comparison is of what clients get, not of two different code paths.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import LOWER_IS_BETTER, GateConfig, Label, ProjectConfig, Task
from pipelines.lineage import Record

log = logging.getLogger(__name__)
PROMOTED, NOT_PROMOTED = "promoted", "not promoted"


def check_override(force_publish: bool, force_reason: str | None) -> None:
    """Refuse a forced publish that does not say why: the reason goes into the lineage."""
    if force_publish and not (force_reason or "").strip():
        raise ValueError("force_publish is set but force_reason is empty: say why the gate is overridden")


def metrics(task: Task, truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Classification: ROC AUC, F1 at 0.5 and log loss; regression: RMSE and MAE. ``truth`` and
    ``predicted`` have shape (rows,); a probability of the positive class is predicted for a
    classification."""
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
    """Score raw rows with an exported model, feeding each input the graph asks for: shape (rows,).
    ``KeyError`` when ``frame`` lacks a column the model takes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in frame.columns:
            raise KeyError(f"{model_file} needs column {spec.name!r}, which the test split does not have")
        column = frame[spec.name]
        values = column.astype(str).to_numpy(object) if spec.type == "tensor(string)" else column.to_numpy("float32")
        feeds[spec.name] = values.reshape(-1, 1)
    out: np.ndarray
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


def score(label: Label, test: pd.DataFrame, model_file: Path) -> dict[str, float]:
    """``metrics`` of an exported model on the labelled rows of ``test`` against their ``label.column``."""
    labelled = test[test[label.column].notna()]
    return metrics(label.task, labelled[label.column].to_numpy(), predict_onnx(model_file, labelled))


def decide(
    gate: GateConfig,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    force_publish: bool = False,
    force_reason: str | None = None,
) -> Record:
    """The gate's verdict on a challenger's test ``metrics`` against the champion's (None: no
    champion yet): it must pass ``gate.floor`` and beat the champion by ``gate.min_improvement``
    in ``gate.metric``, unless forced. Returns the decision, the reason, the metric, whether it
    was forced and both sets of metrics; ``ValueError`` for a forced publish without a reason."""
    check_override(force_publish, force_reason)
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
        promoted, reason = True, f"forced: {(force_reason or '').strip()} (the gate said: {reason})"
    decision = {
        "decision": PROMOTED if promoted else NOT_PROMOTED,
        "reason": reason,
        "metric": gate.metric,
        "forced": force_publish,
        "challenger": challenger,
        "champion": champion,
    }
    log.info("gate: %s (%s)", decision["decision"], reason)
    return decision


def evaluate(config: ProjectConfig, candidate: str, force_publish: bool = False, force_reason: str | None = None) -> Record:
    """Gate the ``candidate`` folder (relative to the home) against the version in service, if
    any, both scored from their ``model.onnx`` on the test split (``decide``); the decision, with
    ``test_rows`` and ``champion_version``, is also written to the candidate's ``gate.json``."""
    from pipelines.artifacts import MODEL_FILE
    from pipelines.data.split import split_paths
    from pipelines.lineage import write_json
    from pipelines.serving.repository import served_version

    champion_version = served_version(config.model_dir)
    champion_onnx = config.model_dir / str(champion_version) / MODEL_FILE if champion_version else None
    folder = config.path(Path(candidate))
    test, label = pd.read_parquet(split_paths(config.split.output_dir)["test"]), config.dataset.label
    champion = score(label, test, champion_onnx) if champion_onnx else None
    decision = decide(config.gate, score(label, test, folder / MODEL_FILE), champion, force_publish, force_reason)
    decision |= {"test_rows": len(test), "champion_version": champion_version}
    write_json(folder / "gate.json", decision)
    return decision
