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
        columns: dict[str, list[np.ndarray[Any, Any]]] = {name: [] for name in self.inputs}
        sizes = []
        for request in requests:
            rows = 0
            for name, kind in self.inputs.items():
                value = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                if kind == "tensor(string)":
                    value = np.char.decode(value.astype(np.bytes_), "utf-8").astype(object)
                columns[name].append(value)
                rows = len(value)
            sizes.append(rows)
        try:
            results = self.session.run(self.outputs, {name: np.concatenate(parts) for name, parts in columns.items()})
        except Exception as exc:  # noqa: BLE001 - any ONNX Runtime failure is answered, not raised into the stub
            error = pb_utils.TritonError(f"ONNX Runtime failed on a batch of {sum(sizes)} rows: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for rows in sizes:
            tensors = [pb_utils.Tensor(name, value[start : start + rows]) for name, value in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(tensors))
            start += rows
        return responses
