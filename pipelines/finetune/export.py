"""Export a merged text classifier to ONNX, with the tokenizer that Triton's ensemble runs before it.

The graph takes token ids, padded to the run's ``max_length`` so that Triton's dynamic batcher
can stack requests, and gives ``scores`` (softmax, one column a label) and ``label`` (the
best label's name, looked up inside the graph). Everything a server needs to go from raw text
to that answer is in one folder::

    model.onnx        input_ids, attention_mask (int64, batch x max_length) -> scores, label
    tokenizer/        the tokenizer, as save_pretrained writes it
    serving.json      labels, max_length
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pipelines.artifacts import INPUTS, LABEL, MODEL_FILE, SCORES, SERVING_FILE, TOKENIZER_DIR
from pipelines.errors import NotRetryable
from pipelines.lineage import Record, read_json, write_json

if TYPE_CHECKING:
    import onnx
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
OPSET = 18
ML_OPSET = 3


class ParityError(NotRetryable, RuntimeError):
    """The exported graph does not score like the merged PyTorch model."""


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> dict[str, npt.NDArray[np.int64]]:
    """Token ids as served: truncated and padded to ``max_length``, int64."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in INPUTS}


def _network(model: torch.nn.Module, max_length: int) -> onnx.ModelProto:
    import onnx
    import torch

    class Scores(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.inner(input_ids=input_ids, attention_mask=attention_mask).logits, dim=-1)

    example = (torch.ones(2, max_length, dtype=torch.int64), torch.ones(2, max_length, dtype=torch.int64))
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        Scores(model.cpu().eval()).eval(),
        example,
        input_names=list(INPUTS),
        output_names=[SCORES],
        dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}},
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # dynamo=True returns the program
    return onnx.load_from_string(program.model_proto.SerializeToString())


def build_onnx(model: torch.nn.Module, labels: list[str], max_length: int) -> onnx.ModelProto:
    """The network plus ArgMax and a LabelEncoder from the best index to its label's name."""
    import onnx
    from onnx import TensorProto, helper

    network = _network(model, max_length)
    graph = network.graph
    graph.node.extend(
        [
            helper.make_node("ArgMax", [SCORES], ["label_index"], axis=1, keepdims=1),
            helper.make_node(
                "LabelEncoder",
                ["label_index"],
                [LABEL],
                domain="ai.onnx.ml",
                keys_int64s=list(range(len(labels))),
                values_strings=list(labels),
                default_string="",
            ),
        ]
    )
    graph.output.append(helper.make_tensor_value_info(LABEL, TensorProto.STRING, ["batch", 1]))
    if not any(o.domain == "ai.onnx.ml" for o in network.opset_import):
        network.opset_import.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    onnx.checker.check_model(network, full_check=True)
    return network


def export_classifier(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, labels: list[str], max_length: int, folder: Path, texts: list[str], tolerance: float
) -> Record:
    """Write the served folder for a merged classifier after a parity check on ``texts``;
    returns {onnx: the graph's path, parity_texts, max_abs_diff}.

    ``ParityError`` when ONNX Runtime's scores differ from PyTorch's by more than ``tolerance``
    (nothing is left in ``folder`` then).
    """
    import onnx
    import onnxruntime as ort
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{MODEL_FILE}.partial"
    onnx.save(build_onnx(model, labels, max_length), partial)
    feeds = tokenize(tokenizer, texts, max_length)
    with torch.no_grad():
        logits = model.cpu().eval()(**{name: torch.from_numpy(v) for name, v in feeds.items()}).logits
        expected = torch.softmax(logits, dim=-1).numpy()
    scores, names = ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"]).run([SCORES, LABEL], feeds)
    max_abs_diff = float(np.max(np.abs(scores - expected)))
    if not max_abs_diff <= tolerance or list(names[:, 0]) != [labels[i] for i in expected.argmax(1)]:
        partial.unlink()
        raise ParityError(
            f"{folder / MODEL_FILE}: ONNX and PyTorch differ by {max_abs_diff:.3g} on {len(texts)} texts "
            f"(tolerance {tolerance:g}) or pick other labels; nothing was exported"
        )
    tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    write_json(folder / SERVING_FILE, {"labels": list(labels), "max_length": max_length})
    partial.replace(folder / MODEL_FILE)
    log.info("exported %s: max |onnx - torch| = %.2g over %d texts", folder / MODEL_FILE, max_abs_diff, len(texts))
    return {"onnx": str(folder / MODEL_FILE), "parity_texts": len(texts), "max_abs_diff": max_abs_diff}


def predict_folder(folder: Path, texts: list[str]) -> tuple[list[str], npt.NDArray[np.float32]]:
    """Labels and scores (texts x labels) of an exported folder for raw texts, with ONNX Runtime: what a client gets."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    folder = Path(folder)
    settings = read_json(folder / SERVING_FILE)
    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    scores, names = session.run([SCORES, LABEL], tokenize(tokenizer, texts, settings["max_length"]))
    return [str(n) for n in names[:, 0]], scores
