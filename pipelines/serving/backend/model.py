"""Triton Python-backend model: one version's ``model.onnx`` run by ONNX Runtime.

The CPU rendering of a version (``serving.profile: cpu``): Triton's embedded server on a
machine without the ONNX Runtime backend serves the very file that the GPU rendering serves
with ``platform: onnxruntime_onnx``. Copied next to ``model.onnx`` in every version folder.
It answers every output its ``config.pbtxt`` names (strings included), as that backend does.
It runs in the backend's own environment (numpy 1, ONNX Runtime; see
``pipelines/launch/triton.py``), not in the project's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

MODEL_FILE = "model.onnx"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("FLYWHEEL_ORT_THREADS", "1"))
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.outputs = [output["name"] for output in config["output"]]

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        # The dynamic batcher hands over several requests at once: one ONNX Runtime call for all.
        # What one request holds never fails another: an unreadable request is answered with its
        # own error, and a batch ONNX Runtime refuses is run again one request at a time.
        feeds = [self.read(request) for request in requests]
        readable = [feed for feed in feeds if not isinstance(feed, str)]
        try:
            answers = self.run(readable) if readable else []
        except Exception:  # noqa: BLE001 - which request broke the batch is found by running each alone
            answers = [self.answer_alone(feed) for feed in readable]
        answered = iter(answers)
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError(feed)) if isinstance(feed, str) else next(answered) for feed in feeds]

    def read(self, request: pb_utils.InferenceRequest) -> dict[str, np.ndarray[Any, Any]] | str:
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

    def run(self, feeds: list[dict[str, np.ndarray[Any, Any]]]) -> list[pb_utils.InferenceResponse]:
        """One ONNX Runtime call for every request's rows; each request answered with its own rows."""
        results = self.session.run(self.outputs, {name: np.concatenate([feed[name] for feed in feeds]) for name in self.inputs})
        responses, start = [], 0
        for feed in feeds:
            rows = len(next(iter(feed.values())))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(name, value[start : start + rows]) for name, value in zip(self.outputs, results)]))
            start += rows
        return responses

    def answer_alone(self, feed: dict[str, np.ndarray[Any, Any]]) -> pb_utils.InferenceResponse:
        try:
            (response,) = self.run([feed])
            return response
        except Exception as exc:  # noqa: BLE001 - any ONNX Runtime failure is answered, not raised into the stub
            rows = len(next(iter(feed.values())))
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"ONNX Runtime failed on this request's {rows} rows: {exc}"))


def _not_utf8(name: str, values: np.ndarray[Any, Any]) -> str:
    """The error for input ``name``: which row is not UTF-8, and its bytes."""
    for row, value in enumerate(values.reshape(-1)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"row {row} of input {name!r} is not UTF-8 ({exc.reason} at byte {exc.start} of {bytes(value)!r}); send UTF-8 strings"
    return f"input {name!r} is not UTF-8; send UTF-8 strings"
