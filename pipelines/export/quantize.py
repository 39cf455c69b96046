"""Optional dynamic int8 quantisation of an exported model with ONNX Runtime.

Weights of the matrix multiplications become int8 and activations are quantised on the fly.
The quantised file is kept (it becomes the candidate's ``model.onnx``, the fp32 file stays as
``model.fp32.onnx``) only if its gate metric on the test split stays within
``export.int8_tolerance`` of the fp32 model's; otherwise fp32 is kept and the reason recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipelines.artifacts import MODEL_FILE
from pipelines.config import ProjectConfig

log = logging.getLogger(__name__)
FP32_FILE = "model.fp32.onnx"


def quantize_file(source: Path, target: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return target


def quantize(config: ProjectConfig, candidate: str) -> dict:
    """Quantise the candidate's model; keep int8 only if the metric holds. Returns the record."""
    from pipelines.data.split import split_paths
    from pipelines.evaluation.gate import metrics, predict_onnx

    folder = config.path(Path(candidate))
    fp32, int8 = folder / MODEL_FILE, folder / ".model.int8.onnx"
    quantize_file(fp32, int8)
    test = pd.read_parquet(split_paths(config)["test"])
    truth = test[config.dataset.label.column].to_numpy()
    metric = config.gate.metric
    scores = {name: metrics(config.dataset.label.task, truth, predict_onnx(path, test))[metric] for name, path in (("fp32", fp32), ("int8", int8))}
    loss = abs(scores["int8"] - scores["fp32"])
    kept = loss <= config.export.int8_tolerance
    if kept:
        fp32.replace(folder / FP32_FILE)
        int8.replace(fp32)
    else:
        int8.unlink()
    record = {"precision": "int8" if kept else "fp32", metric: scores, "int8_tolerance": config.export.int8_tolerance}
    log.info(
        "int8 %s: %s %.4f vs fp32 %.4f (tolerance %g)",
        "kept" if kept else "dropped", metric, scores["int8"], scores["fp32"], config.export.int8_tolerance,
    )
    return record
