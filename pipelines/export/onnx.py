"""Export a candidate to one self-contained ONNX file that takes raw feature columns.

Each feature is its own input of shape (batch, 1), as Triton clients send them:
categorical columns as strings, numeric columns as float32. The category lookup runs
inside the graph (``ai.onnx.ml`` LabelEncoder, unseen values to the OOV index), prepended
to the network exported from PyTorch, so every runtime serving the file scores exactly
what was trained. The batch axis is dynamic.

A classifier's graph has a second output, ``label`` (int32, 1 where ``prediction >=`` the
threshold chosen on the validation split, ``pipelines.evaluation.threshold``): the cut is in
the served file, so every rendering answers the same label and no client picks its own.

Beside it go the two halves of that file, for runtimes that cannot take strings (TensorRT):
``lookup.onnx`` (raw columns to ``categorical_codes`` and ``numeric``) and ``network.onnx``
(those two to ``prediction``, and ``label``). The codes cross between them as int32, which
TensorRT handles natively (it narrows int64 with a warning, or refuses it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines import tracking
from pipelines.artifacts import CODES, LABEL_OUTPUT, LOOKUP_FILE, MODEL_FILE, NETWORK_FILE, NUMERIC, OUTPUT, PLAN_FILE
from pipelines.config import DecisionThreshold, ExportConfig, Label, ProjectConfig, Task, TensorRTPrecision
from pipelines.errors import NotRetryable
from pipelines.lineage import Record, write_json

if TYPE_CHECKING:
    import onnx

    from pipelines.training.data import Encoding
    from pipelines.training.model import TabularModel

log = logging.getLogger(__name__)
ML_OPSET = 3  # ai.onnx.ml: LabelEncoder with tensor attributes
THRESHOLD = f"{LABEL_OUTPUT}__threshold"  # the initializer that holds a classifier's cut


def parity_gap(got: npt.NDArray[np.float32], expected: npt.NDArray[np.float32]) -> float:
    """The largest difference between two float32 predictions, relative where the prediction is
    large: ``max |got - expected| / max(1, |expected|)``. An absolute bound is right for
    probabilities, but a regression in the thousands (a price) differs by float32 rounding
    alone by more than 1e-4; relative to the value it is ~1e-7, whatever the label's scale."""
    return float(np.max(np.abs(got - expected) / np.maximum(1.0, np.abs(expected)))) if len(expected) else 0.0


def label_mismatches(label: npt.NDArray[np.integer], prediction: npt.NDArray[np.floating], threshold: float, tolerance: float = 0.0) -> int:
    """Rows whose ``label`` is not ``prediction >= threshold`` (all of shape (rows,)), leaving out
    rows whose prediction is less than ``tolerance`` from the threshold, where a runtime within
    that tolerance of ``prediction`` may cut the other way (0: every row counts)."""
    expected = prediction >= np.float32(threshold)
    return int(np.sum((label != expected) & ~(np.abs(prediction - threshold) < tolerance)))


class ParityError(NotRetryable, RuntimeError):
    """The exported ONNX model does not score like the PyTorch model it came from."""


def onnx_inputs(frame: pd.DataFrame, categorical: list[str], numeric: list[str]) -> dict[str, np.ndarray]:
    """The ONNX (and Triton) inputs for raw rows: one (rows, 1) array per feature column."""
    feeds = {c: frame[c].astype(str).to_numpy(dtype=object).reshape(-1, 1) for c in categorical}
    feeds |= {c: frame[c].to_numpy("float32").reshape(-1, 1) for c in numeric}
    return feeds


def onnx_outputs(model: Path | bytes, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every output of an ONNX model (a file, or its bytes) for raw rows, by name, each of shape
    (rows,): ``prediction`` float32, and ``label`` int32 where the graph has it. Each input the
    graph asks for is fed from the column of its name (strings or float32); ``KeyError`` when
    ``frame`` lacks one."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model) if isinstance(model, Path) else model, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    missing = [i.name for i in inputs if i.name not in frame.columns]
    if missing:
        raise KeyError(f"the ONNX model takes columns {missing}, which the rows do not have")
    categorical = [i.name for i in inputs if i.type == "tensor(string)"]
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, onnx_inputs(frame, categorical, [i.name for i in inputs if i.name not in categorical]))
    return {name: result[:, 0] for name, result in zip(names, results)}


def _network(model: TabularModel, categorical: list[str], numeric: list[str], opset: int) -> onnx.ModelProto:
    """The PyTorch part, exported with inputs ``categorical_codes`` (int64) and ``numeric`` (float32)."""
    import onnx
    import torch

    class Served(torch.nn.Module):
        def __init__(self, inner: TabularModel) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, categorical_codes: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
            return self.inner.predict(categorical_codes, numeric).unsqueeze(1)

    rows = 4
    example = (torch.ones(rows, len(categorical), dtype=torch.int64), torch.zeros(rows, len(numeric)))
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        Served(model.cpu().eval()).eval(),
        example,
        input_names=["categorical_codes", "numeric"],
        output_names=[OUTPUT],
        dynamic_shapes={"categorical_codes": {0: batch}, "numeric": {0: batch}},
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # dynamo=True returns the program
    return onnx.load_from_string(program.model_proto.SerializeToString())


def _empty_columns(like: str, output: str, element: int) -> list[onnx.NodeProto]:
    """Nodes that give ``output``, a tensor of ``element`` type and shape (batch, 0), the batch
    read off the input ``like``: what ``Concat`` of no column would be, were it allowed."""
    from onnx import TensorProto, helper

    batch, zero, shape = (f"{output}__{name}" for name in ("batch", "zero", "shape"))
    return [
        helper.make_node("Shape", [like], [batch], end=1),
        helper.make_node("Constant", [], [zero], value=helper.make_tensor(zero, TensorProto.INT64, [1], [0])),
        helper.make_node("Concat", [batch, zero], [shape], axis=0),
        helper.make_node("ConstantOfShape", [shape], [output], value=helper.make_tensor(output, element, [1], [0])),
    ]


def _lookup(categorical: dict[str, list[str]], numeric: list[str], opset: int) -> onnx.ModelProto:
    """The graph from raw columns to ``categorical_codes`` and ``numeric``."""
    from onnx import TensorProto, helper

    inputs: list[onnx.ValueInfoProto] = []
    nodes: list[onnx.NodeProto] = []
    for column, vocab in categorical.items():
        inputs.append(helper.make_tensor_value_info(column, TensorProto.STRING, ["batch", 1]))
        nodes.append(
            helper.make_node(
                "LabelEncoder",
                [column],
                [f"{column}__code"],
                domain="ai.onnx.ml",
                keys_strings=vocab,
                values_int64s=list(range(1, len(vocab) + 1)),
                default_int64=0,
            )
        )
    for column in numeric:
        inputs.append(helper.make_tensor_value_info(column, TensorProto.FLOAT, ["batch", 1]))
    for output, columns, element in ((CODES, [f"{c}__code" for c in categorical], TensorProto.INT64), (NUMERIC, list(numeric), TensorProto.FLOAT)):
        if columns:
            nodes.append(helper.make_node("Concat", columns, [output], axis=1))
        else:  # no column of this kind (an all-numeric table, say): an empty (batch, 0) tensor
            nodes.extend(_empty_columns(inputs[0].name, output, element))
    outputs = [
        helper.make_tensor_value_info("categorical_codes", TensorProto.INT64, ["batch", len(categorical)]),
        helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["batch", len(numeric)]),
    ]
    graph = helper.make_graph(nodes, "lookup", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", ML_OPSET)])


def build_onnx(model: TabularModel, encoding: Encoding, opset: int) -> onnx.ModelProto:
    """One ONNX model: raw columns in, ``prediction`` (batch, 1) out, checked by ``onnx.checker``.
    A table without categorical (or numeric) features crosses an empty (batch, 0) tensor."""
    import onnx
    from onnx import compose

    categorical, numeric = list(encoding.categorical), list(encoding.numeric)
    network = _network(model, categorical, numeric, opset)
    lookup = _lookup(encoding.categorical, numeric, opset)
    lookup.ir_version = network.ir_version
    merged = compose.merge_models(lookup, network, io_map=[("categorical_codes", "categorical_codes"), ("numeric", "numeric")])
    # merge_models lists each part's opsets: one entry per domain, as tools like the quantiser expect.
    opsets: dict[str, int] = {}
    for entry in merged.opset_import:
        opsets[entry.domain] = max(entry.version, opsets.get(entry.domain, 0))
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
    onnx.checker.check_model(merged, full_check=True)
    return merged


def with_label(model: onnx.ModelProto, threshold: float) -> onnx.ModelProto:
    """``model`` (``build_onnx``'s) with a second output ``label``: int32 of the prediction's
    shape (batch, 1), 1 where ``prediction >= threshold`` (compared in float32) else 0, checked
    by ``onnx.checker``. The threshold is the initializer ``THRESHOLD`` (``threshold_of``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    labelled = onnx.ModelProto()
    labelled.CopyFrom(model)
    graph = labelled.graph
    graph.initializer.append(numpy_helper.from_array(np.array(threshold, dtype=np.float32), THRESHOLD))
    cut = f"{LABEL_OUTPUT}__bool"
    graph.node.extend(
        [
            helper.make_node("GreaterOrEqual", [OUTPUT, THRESHOLD], [cut]),
            helper.make_node("Cast", [cut], [LABEL_OUTPUT], to=TensorProto.INT32),
        ]
    )
    (prediction,) = [o for o in graph.output if o.name == OUTPUT]
    label = graph.output.add()
    label.CopyFrom(prediction)
    label.name = LABEL_OUTPUT
    label.type.tensor_type.elem_type = TensorProto.INT32
    onnx.checker.check_model(labelled, full_check=True)
    return labelled


def threshold_of(model: onnx.ModelProto) -> float | None:
    """The threshold ``with_label`` baked into a graph (a whole model, its network half, or its
    int8 rendering), or None for a graph without a ``label`` output."""
    from onnx import numpy_helper

    if LABEL_OUTPUT not in {o.name for o in model.graph.output}:
        return None
    (value,) = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name == THRESHOLD]
    return float(value)


def split(merged: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``(lookup, network)``: the two halves of ``build_onnx``'s model, cut at ``categorical_codes``
    and ``numeric``, with the codes crossing as int32 (a Cast on each side keeps the arithmetic
    exactly the merged model's). The network answers every output of the merged model
    (``prediction``, and ``label`` where ``with_label`` added it)."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.utils import Extractor

    extractor = Extractor(merged)
    raw = [i.name for i in merged.graph.input]
    lookup = extractor.extract_model(raw, [CODES, NUMERIC])
    network = extractor.extract_model([CODES, NUMERIC], [o.name for o in merged.graph.output])

    narrowed = f"{CODES}__int32"
    for node in lookup.graph.node:
        node.output[:] = [narrowed if name == CODES else name for name in node.output]
    lookup.graph.node.append(helper.make_node("Cast", [narrowed], [CODES], to=TensorProto.INT32))
    widened = f"{CODES}__int64"
    for node in network.graph.node:
        node.input[:] = [widened if name == CODES else name for name in node.input]
    network.graph.node.insert(0, helper.make_node("Cast", [CODES], [widened], to=TensorProto.INT64))
    for graph in (lookup.graph.output, network.graph.input):
        for value in graph:
            if value.name == CODES:
                value.type.tensor_type.elem_type = TensorProto.INT32
    for part in (lookup, network):
        onnx.checker.check_model(part, full_check=True)
    return lookup, network


def export(config: ProjectConfig, candidate: str) -> Record:
    """Export the ``candidate`` folder (relative to the home) as ``write_onnx`` does, then build
    its TensorRT engine and try int8 where the ``export`` section asks; write and return the
    record (``export.json``), its files named relative to the home. A classifier's record has
    its ``threshold`` (``write_onnx``).

    ``ParityError`` (from any of the three) stops the run before anything is published, as does
    ``ThresholdError`` (no threshold reaches ``gate.threshold``'s target on the validation split).
    """
    from pipelines.data.split import split_paths
    from pipelines.training.train import load_candidate

    folder = config.path(Path(candidate))
    splits = split_paths(config.split.output_dir)
    model, encoding = load_candidate(folder)
    written = write_onnx(config.export, model, encoding, folder, splits, config.dataset.label, config.gate.threshold)
    record = {"onnx": config.portable(folder / MODEL_FILE), **written}
    if config.export.tensorrt != TensorRTPrecision.off:
        from pipelines.export.tensorrt import export_engine

        engine = export_engine(config.export, config.train.seed, config.serving.max_batch_size, folder, encoding, splits)
        record["tensorrt"] = engine | ({"plan": config.portable(folder / PLAN_FILE)} if engine["built"] else {})
    if config.export.int8:
        from pipelines.export.quantize import quantize

        record["int8"] = quantize(config.export, config.gate, config.dataset.label, folder, splits["test"])
    write_json(folder / "export.json", record)
    tracking.log_to(tracking.candidate_run(folder), artifacts=[folder / MODEL_FILE, folder / "export.json"], timeout_s=config.tracking.timeout_s)
    return record


def write_onnx(export: ExportConfig, model: TabularModel, encoding: Encoding, folder: Path, splits: Mapping[str, Path], label: Label, setting: DecisionThreshold) -> Record:
    """Write ``model.onnx`` into the candidate ``folder`` after a parity check on the first
    ``export.parity_rows`` rows of the test split, and its halves ``lookup.onnx`` and
    ``network.onnx`` beside it; remove an earlier export's ``model.plan``. ``splits`` are the
    split files by part (``test``, and ``val`` for a classifier).

    A classifier (``label.task``) gets its ``label`` output (``with_label``) at the threshold
    ``setting`` asks for, chosen on the labelled rows of the validation split as the graph scores
    them (``threshold.choose``). Returns ``parity_rows``, ``max_abs_diff`` (the largest |ONNX -
    PyTorch| prediction) and, for a classifier, ``threshold`` (``choose``'s record).

    ``ParityError`` when ONNX Runtime and PyTorch differ by more than ``export.parity_tolerance``
    (``parity_gap``), or the label is not the thresholded prediction on every parity row; no
    ``model.onnx`` is left then. ``ThresholdError`` when no threshold can be chosen.
    """
    import onnx
    import torch

    exported = build_onnx(model, encoding, export.opset)
    record: Record = {}
    if label.task == Task.classification:
        from pipelines.evaluation.threshold import choose

        validation = pd.read_parquet(splits["val"])
        validation = validation[validation[label.column].notna()]
        scores = onnx_outputs(exported.SerializeToString(), validation)[OUTPUT]  # as the served graph scores them
        record["threshold"] = choose(validation[label.column].to_numpy().astype(int), scores, setting)
        exported = with_label(exported, record["threshold"]["value"])
    partial = folder / f".{MODEL_FILE}.partial"
    onnx.save(exported, partial)

    rows = pd.read_parquet(splits["test"]).head(export.parity_rows)
    with torch.no_grad():
        expected = model.predict(torch.from_numpy(encoding.categorical_indices(rows)), torch.from_numpy(encoding.numeric_values(rows))).numpy()
    got = onnx_outputs(partial, rows)
    max_abs_diff = float(np.max(np.abs(got[OUTPUT] - expected)))
    gap = parity_gap(got[OUTPUT], expected)
    problems = []
    if not gap <= export.parity_tolerance:
        problems.append(f"ONNX and PyTorch differ by {max_abs_diff:.3g} on {len(rows)} test rows (relative gap {gap:.3g}), more than export.parity_tolerance={export.parity_tolerance:g}")
    if "threshold" in record and (flipped := label_mismatches(got[LABEL_OUTPUT], got[OUTPUT], record["threshold"]["value"])):
        problems.append(f"{flipped} of {len(rows)} labels are not prediction >= {record['threshold']['value']:g}")
    if problems:
        partial.unlink()
        raise ParityError(f"{folder / MODEL_FILE}: {'; '.join(problems)}; nothing was published")
    partial.replace(folder / MODEL_FILE)
    # Split from the fp32 graph just checked, before int8 may replace model.onnx: TensorRT takes
    # fp32 graphs, and its own precision is export.tensorrt's.
    for part, name in zip(split(exported), (LOOKUP_FILE, NETWORK_FILE)):
        onnx.save(part, folder / name)
    (folder / PLAN_FILE).unlink(missing_ok=True)  # an engine of an earlier export of this candidate is not this one's
    log.info("exported %s: max |onnx - torch| = %.2g over %d test rows", folder / MODEL_FILE, max_abs_diff, len(rows))
    if "threshold" in record:
        chosen = record["threshold"]
        log.info("label at threshold %.4g (%s): validation %s", chosen["value"], chosen["objective"], chosen["validation"])
    return {"parity_rows": len(rows), "max_abs_diff": max_abs_diff, **record}
