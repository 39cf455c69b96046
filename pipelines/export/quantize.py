"""Optional dynamic int8 quantisation of an exported model with ONNX Runtime.

Weights of the matrix multiplications become int8 and activations are quantised on the fly.
The quantised file is kept (it becomes the candidate's ``model.onnx``, the fp32 file stays as
``model.fp32.onnx``) only if its gate metric on the test split stays within
``export.int8_tolerance`` of the fp32 model's and, for a classifier, its ``label`` is still its
own prediction cut at the fp32 model's threshold on every test row; otherwise fp32 is kept and
the reason recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipelines.artifacts import LABEL_OUTPUT, MODEL_FILE, OUTPUT
from pipelines.config import ExportConfig, GateConfig, Label
from pipelines.export.onnx import label_mismatches, onnx_outputs, threshold_of
from pipelines.lineage import Record

log = logging.getLogger(__name__)
FP32_FILE = "model.fp32.onnx"


def quantize_file(source: Path, target: Path) -> Path:
    """Write ``target``: ``source`` with int8 weights and dynamically quantised activations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return target


def quantize(export: ExportConfig, gate: GateConfig, label: Label, folder: Path, test: Path) -> Record:
    """Quantise the ``model.onnx`` of the candidate ``folder``; keep int8 only if ``gate.metric``
    on the ``test`` split file moves by at most ``export.int8_tolerance`` and, where the model
    has a ``label`` output, int8 answers it cut at the same threshold on every test row. Returns
    the record: the precision kept, both scores and (a classifier) ``label_mismatches``."""
    import onnx

    from pipelines.evaluation.gate import DEFAULT_THRESHOLD, score

    fp32, int8 = folder / MODEL_FILE, folder / ".model.int8.onnx"
    quantize_file(fp32, int8)
    rows = pd.read_parquet(test)
    metric = gate.metric
    threshold = threshold_of(onnx.load(str(fp32)))
    cut = DEFAULT_THRESHOLD if threshold is None else threshold  # a classifier's F1 at its served cut
    scores = {name: score(label, rows, path, cut)[metric] for name, path in (("fp32", fp32), ("int8", int8))}
    loss = abs(scores["int8"] - scores["fp32"])
    kept = loss <= export.int8_tolerance
    labelled: Record = {}
    if threshold is not None:
        answers = onnx_outputs(int8, rows)
        labelled["label_mismatches"] = label_mismatches(answers[LABEL_OUTPUT], answers[OUTPUT], threshold)
        kept = kept and labelled["label_mismatches"] == 0
    if kept:
        fp32.replace(folder / FP32_FILE)
        int8.replace(fp32)
    else:
        int8.unlink()
    record = {"precision": "int8" if kept else "fp32", metric: scores, "int8_tolerance": export.int8_tolerance, **labelled}
    log.info(
        "int8 %s: %s %.4f vs fp32 %.4f (tolerance %g)",
        "kept" if kept else "dropped",
        metric,
        scores["int8"],
        scores["fp32"],
        export.int8_tolerance,
    )
    return record
