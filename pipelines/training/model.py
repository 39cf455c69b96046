"""The tabular model: an embedding per categorical column and scaled numerics into an MLP."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from pipelines.config import Task


class TabularModel(pl.LightningModule):
    """Binary classifier (one logit) or regressor (one value) over mixed tabular features."""

    numeric_mean: torch.Tensor  # buffers, shape (numeric columns,): registered in __init__
    numeric_std: torch.Tensor

    def __init__(
        self,
        task: str,
        vocab_sizes: list[int],
        numeric_mean: list[float],
        numeric_std: list[float],
        embedding_dim: int,
        hidden_sizes: list[int],
        dropout: float,
        learning_rate: float,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task = Task(task)
        # +1: index 0 is kept for categories never seen in training.
        self.embeddings = nn.ModuleList(nn.Embedding(size + 1, embedding_dim) for size in vocab_sizes)
        self.register_buffer("numeric_mean", torch.tensor(numeric_mean, dtype=torch.float32))
        self.register_buffer("numeric_std", torch.tensor(numeric_std, dtype=torch.float32))
        self.target_mean, self.target_std = target_mean, target_std
        layers: list[nn.Module] = []
        width = embedding_dim * len(vocab_sizes) + len(numeric_mean)
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.loss = nn.BCEWithLogitsLoss() if self.task == Task.classification else nn.MSELoss()

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        """Raw output, shape (rows,): a logit for classification, the standardised value for regression."""
        parts = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        # A missing (or infinite) number is read as the training mean: validation may accept a
        # few blanks, and one must not turn the loss or a served prediction into NaN.
        parts.append(torch.nan_to_num((numeric - self.numeric_mean) / self.numeric_std, nan=0.0, posinf=0.0, neginf=0.0))
        out: torch.Tensor = self.mlp(torch.cat(parts, dim=1))
        return out.squeeze(1)

    def predict(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        """What is served: the probability of the positive class, or the regressed value."""
        out: torch.Tensor = self(categorical, numeric)
        if self.task == Task.classification:
            return torch.sigmoid(out)
        return out * self.target_std + self.target_mean

    def _step(self, batch: tuple[torch.Tensor, ...], name: str) -> torch.Tensor:
        categorical, numeric, target = batch
        loss: torch.Tensor = self.loss(self(categorical, numeric), (target - self.target_mean) / self.target_std)
        # One value an epoch (the mean over its batches): the curves MLflow and the CSV log keep.
        self.log(f"{name}_loss", loss, prog_bar=name == "val", on_step=False, on_epoch=True, batch_size=len(target))
        return loss

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["learning_rate"])
