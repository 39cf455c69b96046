"""Evaluate a fine-tuned candidate on held-out records against the untuned base and the champion.

* Sequence classification: accuracy and macro F1 of the exported model (ONNX Runtime, what
  clients get) on the test records, against a linear head trained on the frozen base's
  mean-pooled embeddings of the same training records (the untuned base), and against the
  served version on the same records. Promoted only if it beats the base by
  ``finetune.min_gain_over_base`` and the champion by ``finetune.min_improvement``.
* Causal LM: held-out loss (and perplexity) on the answers of the test records, against the
  untuned base. Promoted only if the loss drops by ``finetune.min_improvement`` (a share).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from pipelines import tracking
from pipelines.config import FinetuneConfig, FinetuneTask, TextProjectConfig
from pipelines.evaluation.gate import NOT_PROMOTED, PROMOTED, beats
from pipelines.lineage import Record, read_json, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A model's scores: accuracy and f1_macro (classifier), or loss and perplexity (causal LM).
Scores = dict[str, float]

log = logging.getLogger(__name__)


def classification_metrics(truth: list[str], predicted: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(truth, predicted)), "f1_macro": float(f1_score(truth, predicted, average="macro"))}


def embed(base: Path, texts: list[str], max_length: int, batch_size: int = 32) -> npt.NDArray[np.float32]:
    """Mean-pooled last hidden states of the untuned base (the sentence embedding MiniLM was
    trained for): texts x hidden size."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModel.from_pretrained(base).eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            parts.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(parts)


def linear_probe(base: Path, train: list[Record], test: list[Record], max_length: int, seed: int) -> list[str]:
    """Labels the untuned base gives the test records through a logistic-regression head fitted on ``train``."""
    from sklearn.linear_model import LogisticRegression

    head = LogisticRegression(max_iter=2000, random_state=seed)
    head.fit(embed(base, [r["text"] for r in train], max_length), [r["label"] for r in train])
    return list(head.predict(embed(base, [r["text"] for r in test], max_length)))


def held_out_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[Record], max_length: int, batch_size: int) -> float:
    """Mean loss a token over the answers of ``records`` (prompt tokens carry none)."""
    from pipelines.finetune.train import IGNORE, collate, encode

    examples = encode(records, tokenizer, FinetuneTask.causal_lm, max_length)
    pad = collate(tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = pad(examples[start : start + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
            total += float(loss)
            tokens += int((targets != IGNORE).sum())
    return total / tokens


def _score_classifier(
    finetune: FinetuneConfig, params: Record, train: list[Record], test: list[Record], base: Path, export_folder: Path, model_dir: Path
) -> tuple[Scores, Scores, Scores | None]:
    """Accuracy and F1 of the exported model, the untuned base with a linear head fitted on
    ``train``, and the champion served from ``model_dir`` (None before the first publish)."""
    from pipelines.finetune import serving
    from pipelines.finetune.export import predict_folder

    texts, truth = [r["text"] for r in test], [r["label"] for r in test]
    challenger = classification_metrics(truth, predict_folder(export_folder, texts)[0])
    untuned = classification_metrics(truth, linear_probe(base, train, test, params["max_length"], finetune.seed))
    served = serving.champion_predict(model_dir, texts)
    champion = classification_metrics(truth, served[0]) if served else None
    return challenger, untuned, champion


def _score_causal_lm(finetune: FinetuneConfig, params: Record, test: list[Record], base: Path, candidate: Path) -> tuple[Scores, Scores, None]:
    """Held-out loss and perplexity of the merged model and of the untuned base (no champion: not served)."""
    from pipelines.finetune.model import load_base
    from pipelines.finetune.train import load_tokenizer, merged

    tokenizer = load_tokenizer(base)
    scores = []
    for model in (merged(candidate), load_base(base, FinetuneTask.causal_lm).eval()):
        loss = held_out_loss(model, tokenizer, test, params["max_length"], finetune.batch_size)
        scores.append({"loss": loss, "perplexity": math.exp(loss)})
    return scores[0], scores[1], None


def evaluate(config: TextProjectConfig, candidate: str, export_folder: str | None) -> Record:
    """Score the candidate, the base and (for a served task) the champion on the same test records; decide.

    ``candidate`` and ``export_folder`` (a classifier's, else None) are task results: relative to
    the project home. Returns the decision (also written to the candidate's ``gate.json``)."""
    from pipelines.artifacts import CANDIDATE_FILE
    from pipelines.finetune.data import load_splits
    from pipelines.finetune.params import resolve_base

    settings = config.finetune
    folder = config.path(Path(candidate))
    params = read_json(folder / CANDIDATE_FILE)["inputs"]["params"]
    splits = load_splits(settings, params["dataset"])
    test = splits["test"][: settings.max_eval_records]
    base = resolve_base(params["base_model"])
    champion: Scores | None
    if params["task"] == FinetuneTask.sequence_classification.value:
        metric = "accuracy"
        if export_folder is None:
            raise ValueError(f"{candidate}: a classifier is scored as exported, and no export folder was given")
        train = splits["train"][: params["max_train_records"]] if params["max_train_records"] else splits["train"]
        exported = config.path(Path(export_folder))
        challenger, untuned, champion = _score_classifier(settings, params, train, test, base, exported, config.served_model_dir)
        margins = [("the untuned base with a linear head", untuned, settings.min_gain_over_base), ("the champion", champion, settings.min_improvement)]
    else:
        metric = "loss"
        challenger, untuned, champion = _score_causal_lm(settings, params, test, base, folder)
        margins = [("the untuned base", untuned, settings.min_improvement * untuned["loss"])]
    checks = [
        (f"{what} ({other[metric]:.4f})", beats(metric, challenger[metric], other[metric], margin), margin)
        for what, other, margin in margins
        if other is not None
    ]
    failed = [(what, margin) for what, passed, margin in checks if not passed]
    if failed:
        reason = "; ".join(f"{metric} {challenger[metric]:.4f} does not beat {what} by {margin:g}" for what, margin in failed)
    else:
        reason = "; ".join(f"{metric} {challenger[metric]:.4f} beats {what}" for what, _, _ in checks)
    decision = {
        "decision": NOT_PROMOTED if failed else PROMOTED,
        "reason": reason,
        "metric": metric,
        "test_records": len(test),
        "challenger": challenger,
        "base": untuned,
        "champion": champion,
    }
    write_json(folder / "gate.json", decision)
    tracking.log_decision(folder, decision, config.tracking.timeout_s)
    log.info("finetune gate: %s (%s)", decision["decision"], reason)
    return decision
