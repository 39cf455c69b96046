"""LoRA and QLoRA on a transformers model, trained by Lightning like the tabular model.

peft wraps the base model (``get_peft_model``) so only the adapter matrices (and, for a
classifier, its new head) are trainable; QLoRA first loads the base in 4-bit nf4 through
bitsandbytes (``prepare_model_for_kbit_training``). ``AdapterModule`` is the
``LightningModule`` around it: the same Trainer, callbacks, checkpoints and CSV logs as
``pipelines.training``, with checkpoints that hold the trainable weights only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig

from pipelines.config import FinetuneMethod, FinetuneTask

if TYPE_CHECKING:
    from peft import PeftModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk, never from a hub at run time

PEFT_TASK = {FinetuneTask.sequence_classification: "SEQ_CLS", FinetuneTask.causal_lm: "CAUSAL_LM"}


def compute_dtype() -> torch.dtype:
    """bf16 where a GPU has it, else fp32 (CPU kernels of 4-bit layers compute in fp32)."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_base(
    path: Path, task: FinetuneTask, labels: list[str] | None = None, quantized: bool = False, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The pretrained model for ``task`` (a classifier over ``labels``, which it then needs); in
    4-bit nf4 (bitsandbytes) when ``quantized``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]  # transformers leaves __init__ unannotated
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    if task == FinetuneTask.sequence_classification:
        if labels is None:
            raise ValueError("a sequence classifier needs its labels")
        classifier: torch.nn.Module = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **kwargs,
        )
        return classifier
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def with_adapter(
    base: torch.nn.Module, task: FinetuneTask, method: FinetuneMethod, r: int, alpha: float, dropout: float, target_modules: list[str]
) -> PeftModel:
    """The base wrapped by peft: LoRA adapters on ``target_modules``, everything else frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == FinetuneMethod.qlora:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]  # peft leaves it unannotated
    config = LoraConfig(
        # peft annotates lora_alpha as int, but only divides it by r: a float alpha scales as well
        task_type=PEFT_TASK[task], r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),  # type: ignore[arg-type]
    )
    return get_peft_model(base, config)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


class AdapterModule(pl.LightningModule):
    """Trains a peft model; the loss is the one transformers computes from ``labels``."""

    def __init__(self, model: PeftModel, learning_rate: float) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate
        # Checkpoints keep the trainable weights only (a 4-bit base cannot be re-saved, and
        # re-saving a frozen base every epoch is waste): loading them must not ask for the rest.
        self.strict_loading = False

    def _loss(self, batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        loss: torch.Tensor = self.model(**batch).loss
        self.log(f"{name}_loss", loss, prog_bar=name == "val", on_step=False, on_epoch=True, batch_size=len(batch["input_ids"]))
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._loss(batch, "val")

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        from transformers import get_linear_schedule_with_warmup

        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.learning_rate)
        # Warm up over the first tenth, then decay linearly: a new head and fresh adapters at the
        # full rate from step one can push a classifier onto its majority class and keep it there.
        steps = int(self.trainer.estimated_stepping_batches)
        schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)  # type: ignore[no-untyped-call]  # unannotated in transformers
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
