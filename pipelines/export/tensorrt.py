"""Route (b) of TensorRT: build an engine (``model.plan``) from a candidate's ``network.onnx``.

Only where the ``tensorrt`` package is importable (the ``tensorrt`` extra, on the GPU worker
image: its library wheels come from NVIDIA's own index, not PyPI) and a CUDA device is present.
Elsewhere ``export_engine`` logs one warning with the reason, records ``built: false`` and
the candidate is served through its ONNX rendering; it never raises for that.

The engine takes the numeric half of the model (``network.onnx``: ``categorical_codes`` int32
and ``numeric`` float32) and answers what it answers (``prediction``, and a classifier's int32
``label``); the string lookup stays in ONNX Runtime (``lookup.onnx``), which the
``tensorrt_plan`` rendering runs as the first step of a Triton ensemble. Before it is kept the
engine is checked against ONNX Runtime on the same test rows, within the configured tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from pipelines.artifacts import LABEL_OUTPUT, LOOKUP_FILE, NETWORK_FILE, OUTPUT, PLAN_FILE
from pipelines.config import ExportConfig, TensorRTPrecision
from pipelines.export.onnx import ParityError, label_mismatches, onnx_inputs, threshold_of
from pipelines.lineage import Record

if TYPE_CHECKING:
    import tensorrt as trt  # no type information: its classes are Any to mypy

    from pipelines.training.data import Encoding

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]


def tensorrt_available() -> str | None:
    """None where an engine can be built here; otherwise the reason it cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"the tensorrt package is not importable ({exc}); install the `tensorrt` extra on the GPU worker image"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def _one_kind(encoding: Encoding) -> str | None:
    """Why the engine route does not take this table's features, or None: it crosses both kinds
    of feature as Triton tensors, and Triton refuses a tensor of width 0."""
    missing = [kind for kind, columns in (("categorical", encoding.categorical), ("numeric", encoding.numeric)) if not columns]
    return f"the table has no {missing[0]} feature, and the engine's ensemble needs both kinds" if missing else None


def export_engine(export: ExportConfig, seed: int, max_batch: int, folder: Path, encoding: Encoding, splits: Mapping[str, Path]) -> Record:
    """Build and check ``folder/model.plan`` from the candidate's ``network.onnx``, as the
    ``export`` section asks (its ``tensorrt`` precision, fp16 or int8, parity rows and tolerances).

    ``seed`` seeds the int8 calibration sample (the project's ``train.seed``), ``max_batch`` is
    the largest batch the engine takes (``serving.max_batch_size``), ``splits`` the split files
    by part (``train`` and ``test`` are read). Returns ``{"built": True, **build_engine's record}``,
    or ``{"built": False, "reason": ...}`` where TensorRT is unavailable or the table has
    features of one kind only (one warning, nothing raised); ``ParityError`` where the engine disagrees with ONNX Runtime beyond tolerance,
    ``ValueError`` when ``export.tensorrt`` is off.
    """
    precision = export.tensorrt
    if precision == TensorRTPrecision.off:
        raise ValueError("export.tensorrt is off: no engine to build")
    reason = _one_kind(encoding) or tensorrt_available()
    if reason:
        log.warning("export.tensorrt=%s: no TensorRT engine built, %s; the ONNX rendering is published", precision.value, reason)
        return {"built": False, "reason": reason}
    parity, calibration = engine_feeds(export, seed, folder, encoding, splits)
    tolerance = export.tensorrt_int8_tolerance if precision == TensorRTPrecision.int8 else export.tensorrt_fp16_tolerance
    record = build_engine(folder / NETWORK_FILE, folder / PLAN_FILE, precision.value, calibration, max_batch, parity, tolerance)
    log.info("built %s (%s): max |tensorrt - onnxruntime| = %.2g over %d test rows", folder / PLAN_FILE, precision.value, record["max_abs_diff"], record["parity_rows"])
    return {"built": True, **record}


def engine_feeds(export: ExportConfig, seed: int, folder: Path, encoding: Encoding, splits: Mapping[str, Path]) -> tuple[Arrays, Arrays | None]:
    """The engine's parity rows and (int8 only, else None) calibration rows, as the network's inputs.

    Parity: the first ``export.parity_rows`` rows of ``splits["test"]``. Calibration: the
    seeded sample of ``splits["train"]`` that ``calibration_rows`` picks. Both go through the
    candidate's ``lookup.onnx`` (``folder``), so each is ``{"categorical_codes": int32 (rows,
    categorical), "numeric": float32 (rows, numeric)}``. Runs on CPU (ONNX Runtime), no TensorRT.
    """
    lookup = folder / LOOKUP_FILE
    parity = _codes(lookup, pd.read_parquet(splits["test"]).head(export.parity_rows), encoding)
    calibration = None
    if export.tensorrt == TensorRTPrecision.int8:
        sample = calibration_rows(pd.read_parquet(splits["train"]), export.tensorrt_calibration_rows, seed)
        calibration = _codes(lookup, sample, encoding)
    return parity, calibration


def calibration_rows(train: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """The rows that calibrate an int8 engine: ``min(rows, len(train))`` of ``train``, sampled
    without replacement with ``seed`` (the same seed and split give the same rows, in the order
    drawn). The caller passes the project's ``train.seed``."""
    return train.sample(min(rows, len(train)), random_state=seed)


def _codes(lookup: Path, rows: pd.DataFrame, encoding: Encoding) -> Arrays:
    """The network's inputs for raw rows, made by the lookup graph the ensemble serves."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(lookup), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, onnx_inputs(rows, list(encoding.categorical), encoding.numeric))))


def build_engine(
    network_onnx: Path,
    plan: Path,
    precision: Literal["fp16", "int8"],
    calibration: Arrays | None,
    max_batch: int,
    parity: Arrays,
    tolerance: float,
) -> Record:
    """Build a TensorRT engine for batches 1..``max_batch``, check it, and write ``plan``.

    ``calibration`` (int8 only) and ``parity`` are the network's inputs by name. The engine is
    written beside ``plan`` and renamed into place only once its answers on ``parity`` are
    within ``tolerance`` of ONNX Runtime's: its predictions, and its labels (a classifier's
    network) on every row whose ONNX Runtime prediction is at least ``tolerance`` from the
    threshold (nearer, the engine may cut the other way); otherwise ``ParityError``.
    """
    import onnx
    import tensorrt as trt

    if (precision == "int8") != (calibration is not None):
        given = "given" if calibration is not None else "missing"
        raise ValueError(f"precision {precision!r} with calibration {given}: int8 needs a calibration set, fp16 takes none")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(network_onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{network_onnx}: TensorRT's ONNX parser refused it: {errors}")
    settings = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        width = tuple(tensor.shape)[1:]  # the batch axis is the only dynamic one
        profile.set_shape(tensor.name, (1, *width), (max(1, max_batch // 2), *width), (max_batch, *width))
    settings.add_optimization_profile(profile)
    settings.set_flag(trt.BuilderFlag.FP16)  # int8 engines keep fp16 for the layers int8 does not cover
    if calibration is not None:  # int8, as checked above
        settings.set_flag(trt.BuilderFlag.INT8)
        settings.int8_calibrator = _calibrator(calibration, max_batch)
        settings.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, settings)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build a {precision} engine from {network_onnx} (its log above says why)")

    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    got = engine_outputs(engine, parity, max_batch)
    expected = _onnxruntime(network_onnx, parity)
    max_abs_diff = float(np.max(np.abs(got[OUTPUT] - expected[OUTPUT])))
    rows = len(expected[OUTPUT])
    problems = []
    if not max_abs_diff <= tolerance:
        problems.append(f"differ by {max_abs_diff:.3g} on {rows} test rows, more than export.tensorrt_{precision}_tolerance={tolerance:g}")
    threshold = threshold_of(onnx.load(str(network_onnx)))
    if threshold is not None and (flipped := label_mismatches(got[LABEL_OUTPUT][:, 0], expected[OUTPUT][:, 0], threshold, tolerance)):
        problems.append(f"cut {flipped} of {rows} labels differently, on rows at least {tolerance:g} from the threshold {threshold:g}")
    if problems:
        raise ParityError(f"{plan}: the {precision} TensorRT engine and ONNX Runtime {'; and '.join(problems)}; no engine was kept")
    partial = plan.with_name(f".{plan.name}.partial")
    partial.write_bytes(bytes(serialized))
    partial.replace(plan)
    return {"precision": precision, "max_batch": max_batch, "parity_rows": rows, "max_abs_diff": max_abs_diff, "tolerance": tolerance}


def _onnxruntime(network_onnx: Path, feeds: Arrays) -> Arrays:
    """Every output of ``network_onnx`` for the network's inputs ``feeds``, by name, (rows, 1) each."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(network_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def run_engine(engine: trt.ICudaEngine, feeds: Arrays, max_batch: int) -> np.ndarray:
    """The engine's ``prediction`` (float32, (rows, 1)) for the network's inputs ``feeds``, in
    batches of at most ``max_batch`` rows (the engine's optimization profile). Needs CUDA."""
    return engine_outputs(engine, feeds, max_batch)[OUTPUT]


def engine_outputs(engine: trt.ICudaEngine, feeds: Arrays, max_batch: int) -> Arrays:
    """Every output of the engine by name, (rows, 1) each (``prediction`` float32, a classifier's
    ``label`` int32), for the network's inputs ``feeds``, as ``run_engine`` runs them. Needs CUDA."""
    rows = len(next(iter(feeds.values())))
    batches = [_run(engine, {n: a[i : i + max_batch] for n, a in feeds.items()}) for i in range(0, rows, max_batch)]
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def _run(engine: trt.ICudaEngine, feeds: Arrays) -> Arrays:
    """One batch through the engine, with torch CUDA tensors as its buffers (TensorRT needs one
    for every output, used or not)."""
    import tensorrt as trt
    import torch

    context = engine.create_execution_context()
    held: dict[str, torch.Tensor] = {}  # the buffers must outlive the asynchronous run
    for name, array in feeds.items():
        held[name] = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        context.set_input_shape(name, tuple(array.shape))
        context.set_tensor_address(name, held[name].data_ptr())
    outputs = [n for n in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)) if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    for name in outputs:
        dtype = getattr(torch, np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name)  # float32 or int32
        held[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, held[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT failed to run the engine on the parity rows")
    stream.synchronize()
    return {name: held[name].cpu().numpy() for name in outputs}


def _calibrator(calibration: Arrays, batch: int) -> trt.IInt8EntropyCalibrator2:
    """An entropy calibrator fed ``calibration`` in batches from CUDA buffers.

    TensorRT 10 deprecates implicit int8 calibration in favour of Q/DQ nodes (NVIDIA's ModelOpt),
    which would be another dependency; the calibrator API is still supported by TensorRT 10.
    """
    import tensorrt as trt
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]  # tensorrt has no type information
        def __init__(self) -> None:
            super().__init__()
            rows = len(next(iter(calibration.values())))
            self.size = min(batch, rows)
            self.starts = iter(range(0, rows - self.size + 1, self.size))  # whole batches only
            self.held: list[torch.Tensor] = []

        def get_batch_size(self) -> int:
            return self.size

        def get_batch(self, names: list[str]) -> list[int] | None:
            start = next(self.starts, None)
            if start is None:
                return None
            self.held = [torch.from_numpy(np.ascontiguousarray(calibration[n][start : start + self.size])).cuda() for n in names]
            return [t.data_ptr() for t in self.held]

        def read_calibration_cache(self) -> None:
            return None  # calibrate afresh: each candidate is a new model

        def write_calibration_cache(self, cache: bytes) -> None:
            pass

    return Calibrator()
