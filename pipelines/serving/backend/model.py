"""Triton Python-backend model: one version's ``model.onnx`` run by ONNX Runtime.

The CPU rendering of a version (``serving.profile: cpu``): Triton's embedded server on a
machine without the ONNX Runtime backend serves the very file that the GPU rendering serves
with ``platform: onnxruntime_onnx``. Copied next to ``model.onnx`` in every version folder.
It answers every output its ``config.pbtxt`` names (strings included), as that backend does.
It runs in the backend's own environment (numpy 1, ONNX Runtime, pyarrow; see
``pipelines/launch/triton.py``), not in the project's.

Where its config declares the output ``request_id``, each request's rows are answered their
keys (``inference_log.request_keys``: the request's id, or one made here; ``<id>/<i>`` for row i
of several). Where its config's parameter ``inference_log`` names a folder, every answered row
is logged there (``inference_log.py``, copied beside it): inputs, outputs, key, version, time,
latency; flushed on ``inference_log_flush_rows`` rows or ``inference_log_flush_seconds``, and in
``finalize`` (Triton calls it at unload and at a clean shutdown). A request answered with an
error is not logged.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import triton_python_backend_utils as pb_utils

if TYPE_CHECKING:  # the project's copy, to type-check against
    from pipelines.serving.backend.inference_log import REQUEST_ID, InferenceLogWriter, from_config, request_keys, tensor_columns
else:  # beside this file in the version folder, which the Python backend puts on sys.path
    from inference_log import REQUEST_ID, InferenceLogWriter, from_config, request_keys, tensor_columns

MODEL_FILE = "model.onnx"
# A tabular version's outputs; every chunk of its log has the label column (blank for a version without).
PREDICTION, LABEL = "prediction", "label"
Columns = dict[str, np.ndarray[Any, Any]]  # name -> one value a row, shape (rows, ...)


class Run(NamedTuple):
    """One ONNX Runtime call for the rows of several requests."""

    requests: list[int]  # their places in execute's list
    sizes: list[int]  # their rows
    inputs: Columns  # every request's rows, in order
    outputs: Columns


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("FLYWHEEL_ORT_THREADS", "1"))
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.outputs = [output["name"] for output in config["output"] if output["name"] != REQUEST_ID]
        self.answers_keys = len(self.outputs) < len(config["output"])
        self.version = int(args["model_version"])
        self.log = _writer(config, args["model_name"])

    def finalize(self) -> None:
        """Write what the log still buffers: Triton calls this at unload and at a clean shutdown."""
        if self.log is not None:
            self.log.close()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        # The dynamic batcher hands over several requests at once: one ONNX Runtime call for all.
        # What one request holds never fails another: an unreadable request is answered with its
        # own error, and a batch ONNX Runtime refuses is run again one request at a time.
        started = time.perf_counter()
        feeds = [self.read(request) for request in requests]
        errors = {i: feed for i, feed in enumerate(feeds) if isinstance(feed, str)}
        readable = {i: feed for i, feed in enumerate(feeds) if not isinstance(feed, str)}
        runs: list[Run] = []
        try:
            runs = [self.run(readable)] if readable else []
        except Exception:  # noqa: BLE001 - which request broke the batch is found by running each alone
            for i, feed in readable.items():
                try:
                    runs.append(self.run({i: feed}))
                except Exception as exc:  # noqa: BLE001 - any ONNX Runtime failure is answered, not raised into the stub
                    errors[i] = f"ONNX Runtime failed on this request's {_rows(feed)} rows: {exc}"
        answers: dict[int, list[pb_utils.Tensor]] = {}
        keys = [self.answer(run, requests, answers) for run in runs]
        responses = [pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[i])) if i in errors else pb_utils.InferenceResponse(answers[i]) for i in range(len(requests))]
        if self.log is not None and runs:
            logged = [{**run.inputs, **run.outputs} for run in runs]
            columns = logged[0] if len(logged) == 1 else {name: np.concatenate([r[name] for r in logged]) for name in logged[0]}
            self.log.append(columns, np.concatenate(keys), self.version, time.time(), (time.perf_counter() - started) * 1000)
        return responses

    def read(self, request: pb_utils.InferenceRequest) -> Columns | str:
        """The request's inputs as ONNX Runtime takes them, or why they cannot be read."""
        feed = {}
        for name, kind in self.inputs.items():
            value = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            if kind == "tensor(string)":
                try:
                    value = np.char.decode(value.astype(np.bytes_), "utf-8").astype(object)
                except UnicodeDecodeError:
                    return _not_utf8(name, value)
            feed[name] = value
        return feed

    def run(self, feeds: dict[int, Columns]) -> Run:
        """One ONNX Runtime call for the rows of the requests ``feeds`` holds (by their places)."""
        inputs = {name: np.concatenate([feed[name] for feed in feeds.values()]) for name in self.inputs}
        outputs = dict(zip(self.outputs, self.session.run(self.outputs, inputs)))
        return Run(list(feeds), [_rows(feed) for feed in feeds.values()], inputs, outputs)

    def answer(self, run: Run, requests: list[pb_utils.InferenceRequest], answers: dict[int, list[pb_utils.Tensor]]) -> np.ndarray[Any, Any]:
        """Each request's rows of ``run`` as its answer's tensors, into ``answers``; returns the
        rows' keys, shape (rows,)."""
        keys, start = [], 0
        for i, rows in zip(run.requests, run.sizes):
            own = np.array(request_keys(requests[i].request_id(), rows), dtype=object)
            answers[i] = [pb_utils.Tensor(name, value[start : start + rows]) for name, value in run.outputs.items()]
            if self.answers_keys:
                answers[i].append(pb_utils.Tensor(REQUEST_ID, own.reshape(-1, 1)))
            keys.append(own)
            start += rows
        return np.concatenate(keys)


def _rows(feed: Columns) -> int:
    return len(next(iter(feed.values())))


def _writer(config: dict[str, Any], model: str) -> InferenceLogWriter | None:
    """The log writer the config asks for (``inference_log.from_config``): a column for every input
    and output, and a tabular version's ``label`` even where it answers none (blank)."""
    columns = tensor_columns([tensor for tensor in (*config["input"], *config["output"]) if tensor["name"] != REQUEST_ID])
    if PREDICTION in columns:
        columns.setdefault(LABEL, pa.int32())
    return from_config(config, model, columns)


def _not_utf8(name: str, values: np.ndarray[Any, Any]) -> str:
    """The error for input ``name``: which row is not UTF-8, and its bytes."""
    for row, value in enumerate(values.reshape(-1)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"row {row} of input {name!r} is not UTF-8 ({exc.reason} at byte {exc.start} of {bytes(value)!r}); send UTF-8 strings"
    return f"input {name!r} is not UTF-8; send UTF-8 strings"
