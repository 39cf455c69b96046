"""Turning split parquet files into tensors: the vocabularies and scales are learned on train only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipelines.config import DatasetConfig, FeatureType, Task

OOV = 0  # index of a category never seen in training; real categories start at 1


@dataclass(frozen=True)
class Encoding:
    """What the model needs to read raw rows: category vocabularies and numeric scales."""

    categorical: dict[str, list[str]]
    numeric: list[str]
    numeric_mean: list[float]
    numeric_std: list[float]
    # A regression target is learned standardised (a raw scale in the hundreds stalls training)
    # and scaled back inside the model; a class label keeps 0 and 1.
    target_mean: float = 0.0
    target_std: float = 1.0

    @classmethod
    def fit(cls, train: pd.DataFrame, dataset: DatasetConfig) -> Encoding:
        cats = dataset.columns_of(FeatureType.categorical)
        nums = dataset.columns_of(FeatureType.numeric)
        values = train[nums].astype("float64").replace([np.inf, -np.inf], np.nan)  # scales of the finite values
        std = values.std(ddof=0).replace(0.0, 1.0).fillna(1.0)
        target = {}
        if dataset.label.task == Task.regression:
            label = train[dataset.label.column].astype("float64")
            target = {"target_mean": float(label.mean()), "target_std": float(label.std(ddof=0)) or 1.0}
        return cls(
            categorical={c: sorted(train[c].dropna().astype(str).unique().tolist()) for c in cats},
            numeric=nums,
            numeric_mean=values.mean().fillna(0.0).tolist(),
            numeric_std=std.tolist(),
            **target,
        )

    def categorical_indices(self, frame: pd.DataFrame) -> np.ndarray:
        """Integer codes per categorical column, ``OOV`` for unseen values: shape (rows, columns)."""
        columns = [
            frame[c].astype(str).map({v: i + 1 for i, v in enumerate(vocab)}).fillna(OOV).to_numpy("int64")
            for c, vocab in self.categorical.items()
        ]
        return np.stack(columns, axis=1) if columns else np.zeros((len(frame), 0), dtype="int64")

    def numeric_values(self, frame: pd.DataFrame) -> np.ndarray:
        """Raw numeric features as float32 (scaling happens inside the model): shape (rows, columns)."""
        return frame[self.numeric].to_numpy("float32") if self.numeric else np.zeros((len(frame), 0), "float32")


def tensors(frame: pd.DataFrame, encoding: Encoding, label: str) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(encoding.categorical_indices(frame)),
        torch.from_numpy(encoding.numeric_values(frame)),
        torch.from_numpy(frame[label].to_numpy("float32")),
    )


class TabularDataModule(pl.LightningDataModule):
    """The train/val/test splits of one project as tensors; the encoding comes from train."""

    def __init__(self, split_paths: dict[str, Path], dataset: DatasetConfig, batch_size: int):
        super().__init__()
        self.split_paths = split_paths
        self.dataset = dataset
        self.batch_size = batch_size
        self.encoding: Encoding | None = None

    def prepare_data(self) -> None:
        missing = [str(p) for p in self.split_paths.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(f"split files missing: {missing}; run the split stage (dvc repro split) first")

    def setup(self, stage: str | None = None) -> None:
        if self.encoding is not None:
            return
        label = self.dataset.label.column
        # Rows without a label teach and score nothing (validation may accept a few).
        frames = {name: pd.read_parquet(path).dropna(subset=[label]) for name, path in self.split_paths.items()}
        self.encoding = Encoding.fit(frames["train"], self.dataset)
        self.splits = {name: tensors(frame, self.encoding, label) for name, frame in frames.items()}

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(self.splits["test"], batch_size=self.batch_size)
