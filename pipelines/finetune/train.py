"""Fine-tune: adapters trained by Lightning on a versioned dataset, saved with their lineage.

A candidate lives in ``<artifacts>/finetune/<dataset>/<fingerprint>/``, named by everything
that shapes it (base model hash, data version, Params, code), so a retried task reuses a
finished candidate or resumes from its last checkpoint::

    adapter/          peft save_pretrained: adapter_model.safetensors + adapter_config.json
    checkpoints/      Lightning checkpoints (trainable weights only)
    candidate.json    written last: Params, base model and hash, data version, losses, parameter counts
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines import tracking
from pipelines.artifacts import ADAPTER_DIR, CANDIDATE_FILE
from pipelines.config import FinetuneConfig, FinetuneMethod, FinetuneTask, TextProjectConfig
from pipelines.lineage import Record, code_version, fingerprint, read_json, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that carry no loss (prompts, padding)


def base_hash(path: Path) -> str:
    """SHA-256 over the base model's weight files: which weights were tuned, whatever the path."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.suffix in {".safetensors", ".bin"}):
        with file.open("rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def labels_of(records: list[Record]) -> list[str]:
    return sorted({r["label"] for r in records})


def prompt_and_answer(record: Record) -> list[tuple[str, bool]]:
    """A record as text pieces, each marked whether the model learns to write it (answers only)."""
    if "messages" in record:
        return [(f"<|{m['role']}|>\n{m['content']}\n", m["role"] == "assistant") for m in record["messages"]]
    prompt = f"### Instruction:\n{record['instruction']}\n\n"
    if record.get("input"):
        prompt += f"### Input:\n{record['input']}\n\n"
    return [(prompt + "### Response:\n", False), (record["output"], True)]


def encode(
    records: list[Record], tokenizer: PreTrainedTokenizerBase, task: FinetuneTask, max_length: int, labels: list[str] | None = None
) -> list[Record]:
    """Token ids and labels, one dict a record (a classifier's: the index of its label in
    ``labels``). Causal LM: prompts are cut first, so answers keep their tokens."""
    if task == FinetuneTask.sequence_classification:
        if labels is None:
            raise ValueError("encoding for a sequence classifier needs its labels")
        index = {label: i for i, label in enumerate(labels)}
        encoded = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": index[r["label"]]}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], records)
        ]
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    examples = []
    for record in records:
        pieces = [(tokenizer(text, add_special_tokens=False)["input_ids"], learn) for text, learn in prompt_and_answer(record)]
        answer_tokens = sum(len(ids) for ids, learn in pieces if learn) + 1
        budget = max(max_length - answer_tokens, 1)  # what prompts may use
        ids: list[int] = []
        targets: list[int] = []
        for piece, learn in pieces:
            if not learn:
                piece = piece[: max(budget, 0)]
                budget -= len(piece)
            ids += piece
            targets += piece if learn else [IGNORE] * len(piece)
        ids, targets = (ids + [end])[:max_length], (targets + [end])[:max_length]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": targets})
    return examples


def collate(pad_id: int) -> Callable[[list[Record]], dict[str, torch.Tensor]]:
    """Pad a batch to its longest example: ids with the pad token, causal labels with IGNORE."""

    def pad(batch: list[Record]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in batch)
        out = {
            "input_ids": torch.tensor([e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in batch]),
            "attention_mask": torch.tensor([e["attention_mask"] + [0] * (width - len(e["attention_mask"])) for e in batch]),
        }
        if isinstance(batch[0]["labels"], int):
            out["labels"] = torch.tensor([e["labels"] for e in batch])
        else:
            out["labels"] = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in batch])
        return out

    return pad


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with the end-of-sequence token as padding where it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # causal LMs often have none: padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def candidate_dir(artifacts_dir: Path, dataset: str, key: str) -> Path:
    """A candidate's folder in the project's ``artifacts_dir``: ``finetune/<dataset>/<key>``."""
    return artifacts_dir / "finetune" / dataset / key


def finetune(config: TextProjectConfig, params: Record, data_version: dict[str, str], run: Record | None = None) -> Record:
    """Train adapters for checked ``params`` (see ``pipelines.finetune.params.check``) on the dataset's
    train split; the candidate folder is returned relative to the project home (shared storage),
    with the training result (``candidate.json``'s, its ``tracking``: the MLflow run, see
    ``pipelines.tracking``) and whether a finished candidate was reused. ``run`` names the Airflow
    run, for the MLflow run's tags."""
    from pipelines.data.split import check_label_coverage
    from pipelines.finetune.data import load_splits
    from pipelines.finetune.params import resolve_base

    base = resolve_base(params["base_model"])
    splits = load_splits(config.finetune, params["dataset"])
    train_records = splits["train"][: params["max_train_records"]] if params["max_train_records"] else splits["train"]
    labels = None
    if params["task"] == FinetuneTask.sequence_classification.value:
        used = {"train": train_records, "val": splits["val"], "test": splits["test"]}
        check_label_coverage({part: Counter(str(r["label"]) for r in records) for part, records in used.items()}, f"dataset {params['dataset']!r}")
        labels = labels_of(train_records)
    inputs = {
        "base": {"name": params["base_model"], "sha256": base_hash(base)},
        "data": data_version,
        "params": params,
        "train_records": len(train_records),
        "settings": config.finetune.model_dump(mode="json", include={"batch_size", "seed", "test_share", "val_share"}),
        "code": code_version(),
    }
    folder = candidate_dir(config.artifacts_dir, params["dataset"], fingerprint(inputs)[:16])
    reused = (folder / CANDIDATE_FILE).exists()
    if reused:
        log.info("candidate %s was already trained on these inputs: reusing it", folder.name)
        result = read_json(folder / CANDIDATE_FILE)["result"]
    else:
        tags = {"flywheel.candidate": folder.name, "flywheel.kind": "finetune", **tracking.airflow_tags(run)}
        tracked = tracking.open_run(config.tracking, config.name, folder, f"{params['dataset']}-{folder.name[:8]}", inputs, tags)
        try:
            result = _fit(config.finetune, params, base, labels, train_records, splits["val"], inputs, folder, tracked, config.tracking.timeout_s)
        except BaseException:
            tracking.finish(tracked, "FAILED", config.tracking.timeout_s)
            raise
        tracking.finish(tracked, timeout_s=config.tracking.timeout_s)
    return {"candidate": config.portable(folder), "reused": reused, **result}


def _fit(
    finetune: FinetuneConfig, params: Record, base: Path, labels: list[str] | None,
    train_records: list[Record], val_records: list[Record], inputs: Record, folder: Path, tracked: Record, timeout_s: float,
) -> Record:
    """Train the adapter into ``folder`` (resuming from its last checkpoint), each epoch's losses
    into the MLflow run ``tracked``; its ``candidate.json`` result."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from pipelines.finetune.model import AdapterModule, compute_dtype, load_base, parameter_counts, with_adapter
    from pipelines.training.train import _resumable

    task, method = FinetuneTask(params["task"]), FinetuneMethod(params["method"])
    pl.seed_everything(finetune.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(base)
    quantized = method == FinetuneMethod.qlora
    dtype = compute_dtype() if quantized else torch.float32  # LoRA: fp32 weights, bf16-mixed autocast on GPU
    model = with_adapter(
        load_base(base, task, labels, quantized=quantized, dtype=dtype),
        task, method, params["r"], params["alpha"], params["dropout"], params["target_modules"],
    )
    model.train()  # from_pretrained leaves eval mode (no dropout), and Lightning keeps the mode it finds
    counts = parameter_counts(model)
    log.info("%s on %s: %d of %d parameters trainable (%.2f%%)", method.value, params["base_model"], counts["trainable"], counts["total"], 100 * counts["trainable"] / counts["total"])

    def loader(records: list[Record], shuffle: bool) -> DataLoader[Record]:
        examples = encode(records, tokenizer, task, params["max_length"], labels)
        # A list is a map-style dataset to torch (__getitem__ and __len__); the stub wants a Dataset.
        return DataLoader(examples, batch_size=finetune.batch_size, shuffle=shuffle, collate_fn=collate(tokenizer.pad_token_id))  # type: ignore[arg-type]

    checkpoints = ModelCheckpoint(dirpath=folder / "checkpoints", monitor="val_loss", save_last=True, save_top_k=1)
    cuda = torch.cuda.is_available()
    trainer = pl.Trainer(
        max_epochs=params["epochs"],
        accelerator="auto",
        precision="bf16-mixed" if cuda and not quantized else "32-true",
        callbacks=[checkpoints, epochs := tracking.EpochMetrics(tracked, timeout_s)],
        logger=CSVLogger(folder, name="logs", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = AdapterModule(model, params["learning_rate"])
    resume_from, resumed_epochs = _resumable(folder / "checkpoints" / "last.ckpt")
    trainer.fit(module, loader(train_records, True), loader(val_records, False), ckpt_path=resume_from)
    # The best epoch's adapter is the candidate, not the last one's.
    score = checkpoints.best_model_score
    assert score is not None  # set by the validation run of every epoch
    best = torch.load(checkpoints.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
    unexpected = module.load_state_dict(best, strict=False).unexpected_keys  # strict=False: the frozen base is not in it
    if unexpected or not best:
        raise RuntimeError(f"{checkpoints.best_model_path} does not hold this model's adapter weights (unexpected: {unexpected[:3]})")
    model.save_pretrained(str(folder / ADAPTER_DIR))
    result = {
        "best_val_loss": float(score),
        "epochs": trainer.current_epoch,
        "resumed_after_epochs": resumed_epochs,
        "parameters": counts,
        # QLoRA's nf4 base layers (peft's wrappers around them share the class name, not the module)
        "four_bit_layers": sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit" for m in model.modules()),
        "labels": labels,
        "accelerator": "cuda" if cuda else "cpu",
    }
    if tracked.get("run_id") and not tracking.log_to(tracked, {"best_val_loss": float(score), "epochs": float(trainer.current_epoch)}, timeout_s=timeout_s):
        epochs.lost = epochs.lost or "the run's summary was not taken"
    result["tracking"] = tracked | ({"detail": f"{tracked['detail']}; {epochs.lost}"} if epochs.lost else {})
    write_json(folder / CANDIDATE_FILE, {"inputs": inputs, "result": result})
    log.info("fine-tuned %s: best val_loss %.4f after %d epochs", folder.name, result["best_val_loss"], result["epochs"])
    return result


def merged(candidate: Path) -> torch.nn.Module:
    """The base in fp32 with the candidate's adapter merged in (``merge_and_unload``), in eval mode.

    QLoRA adapters too merge into full-precision weights: what is exported and served never
    carries the 4-bit rounding of the base that training saw.
    """
    from peft import PeftModel

    from pipelines.finetune.model import load_base
    from pipelines.finetune.params import resolve_base

    record = read_json(Path(candidate) / CANDIDATE_FILE)
    params = record["inputs"]["params"]
    path = resolve_base(params["base_model"])
    if base_hash(path) != record["inputs"]["base"]["sha256"]:
        raise ValueError(f"{candidate}: the base model at {path} is not the one its adapter was trained on (weights hash differs)")
    base = load_base(path, FinetuneTask(params["task"]), record["result"]["labels"])
    model: torch.nn.Module = PeftModel.from_pretrained(base, Path(candidate) / ADAPTER_DIR).merge_and_unload().eval()
    return model
