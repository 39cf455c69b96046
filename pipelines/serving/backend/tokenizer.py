"""Triton Python-backend model: the tokenizer step of a text classifier's ensemble.

Raw strings in (``text``, one a row), ``input_ids`` and ``attention_mask`` out (int64, padded
and truncated to the ``max_length`` of ``serving.json``), as the exported classifier was
checked with. Fixed-length rows let the classifier's dynamic batcher stack requests. Copied as
``model.py`` next to ``tokenizer/`` and ``serving.json`` in every version folder of
``<model>_tokenizer``; it runs in the backend's own environment (numpy 1, ``tokenizers``; see
``pipelines/launch/triton.py``), not in the project's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

TOKENIZER_DIR = "tokenizer"
SERVING_FILE = "serving.json"
INPUT = "text"
OUTPUTS = ("input_ids", "attention_mask")


def load(folder: Path) -> Tokenizer:
    """The saved tokenizer, truncating and padding to the served ``max_length`` with its own pad token."""
    max_length = int(json.loads((folder / SERVING_FILE).read_text())["max_length"])
    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_DIR / "tokenizer.json"))
    settings_file = folder / TOKENIZER_DIR / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    saved = tokenizer.padding or {}
    pad_token = settings.get("pad_token") or saved.get("pad_token")
    pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
    if pad_id is None:
        raise ValueError(f"{folder / TOKENIZER_DIR}: pad token {pad_token!r} is not in the vocabulary; padding to max_length needs one")
    tokenizer.enable_truncation(max_length, direction=settings.get("truncation_side", "right"))
    tokenizer.enable_padding(
        direction=settings.get("padding_side", "right"),
        pad_id=pad_id,
        pad_type_id=int(settings.get("pad_token_type_id", 0)),
        pad_token=pad_token,
        length=max_length,
    )
    return tokenizer


def decode(values: np.ndarray[Any, Any]) -> list[str]:
    """The request's strings; ``ValueError`` names the row that is not UTF-8."""
    texts = []
    for row, value in enumerate(values.reshape(-1)):
        try:
            texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError as exc:
            raise ValueError(f"row {row} of input {INPUT!r} is not UTF-8 ({exc.reason} at byte {exc.start}); send UTF-8 strings") from None
    return texts


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.tokenizer = load(Path(args["model_repository"]) / args["model_version"])

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        # The dynamic batcher hands over several requests at once: one tokenizer call for all;
        # a request whose text cannot be read gets its own error, the others their answers.
        texts: list[str] = []
        sizes: list[int] = []
        errors: dict[int, pb_utils.TritonError] = {}
        for index, request in enumerate(requests):
            try:
                rows = decode(pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy())
            except ValueError as exc:
                errors[index], rows = pb_utils.TritonError(str(exc)), []
            texts.extend(rows)
            sizes.append(len(rows))
        encodings = self.tokenizer.encode_batch(texts) if texts else []
        columns = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        responses, start = [], 0
        for index, size in enumerate(sizes):
            if index in errors:
                responses.append(pb_utils.InferenceResponse(error=errors[index]))
                continue
            tensors = [pb_utils.Tensor(name, columns[name][start : start + size]) for name in OUTPUTS]
            responses.append(pb_utils.InferenceResponse(tensors))
            start += size
        return responses
