"""Triton Python-backend model: the logging step of an ensemble (a text classifier's).

The ensemble maps its input and the classifier's answers into this step (``text``, ``label``,
``scores``); it logs every row (``inference_log.py``, copied beside it, as the config's
parameters say: ``inference_log.from_config``) and answers each output its config declares:
the inputs of the same names, passed through, and each row's key, ``request_id``. The ensemble's
answers come from here, so every request runs this step whichever outputs it asks for (Triton
skips a step no requested output needs). Triton gives every step the ensemble request's id, so the key
is the client's id, or one made here, as for a tabular model. A request the tokenizer refused
never reaches this step: errors are not logged. This step cannot tell when the request reached
the ensemble: ``latency_ms`` is blank in its rows (Triton's metrics have the ensemble's latency).
Copied as ``model.py`` into every version folder of ``<model>_log``; it runs in the backend's
own environment (numpy 1, pyarrow), not in the project's.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import triton_python_backend_utils as pb_utils

if TYPE_CHECKING:  # the project's copy, to type-check against
    from pipelines.serving.backend.inference_log import REQUEST_ID, from_config, request_keys, tensor_columns
else:  # beside this file in the version folder, which the Python backend puts on sys.path
    from inference_log import REQUEST_ID, from_config, request_keys, tensor_columns


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.passed = [tensor["name"] for tensor in config["output"] if tensor["name"] != REQUEST_ID]  # inputs answered as they came
        self.version = int(args["model_version"])
        self.log = from_config(config, args["model_name"], tensor_columns(config["input"]))

    def finalize(self) -> None:
        """Write what the log still buffers: Triton calls this at unload and at a clean shutdown."""
        if self.log is not None:
            self.log.close()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses, columns, keys = [], [], []
        for request in requests:
            values = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            own = np.array(request_keys(request.request_id(), len(next(iter(values.values())))), dtype=object)
            tensors = [pb_utils.Tensor(name, values[name]) for name in self.passed]
            responses.append(pb_utils.InferenceResponse([*tensors, pb_utils.Tensor(REQUEST_ID, own.reshape(-1, 1))]))
            columns.append(values)
            keys.append(own)
        if self.log is not None and keys:
            rows: dict[str, np.ndarray[Any, Any]] = {name: np.concatenate([c[name] for c in columns]) for name in self.inputs}
            self.log.append(rows, np.concatenate(keys), self.version, time.time())
        return responses
