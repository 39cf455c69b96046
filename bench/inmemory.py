"""The in-memory data steps that bounded-memory ones replaced (Flywheel before the raw data
became parts), kept verbatim where they matter as the baseline of ``bench/history_scale.py`` and
of the equivalence tests: the new steps must give what these gave on data that fits in memory.

* ``append_to_raw``: read the whole raw parquet file, concatenate the batch, de-duplicate by
  id (the newer copy wins), sort, rewrite it all.
* ``split``: read it all, sort by time (or hash each id), cut into train/val/test.
* ``InMemoryDataModule``: read each split whole into tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipelines.config import BATCH, ROW_ID, DatasetConfig, SplitConfig
from pipelines.data.schema import parse_times
from pipelines.training.data import Encoding


def row_ids(rows: pd.DataFrame) -> pd.Series:
    return pd.Series(pd.util.hash_pandas_object(rows, index=False).to_numpy().view("int64"), index=rows.index, name=ROW_ID)


def append_to_raw(raw_file: Path, dataset: DatasetConfig, batch: pd.DataFrame, name: str) -> int:
    """The old ``pipelines.data.ingest.append_to_raw`` on a single raw parquet file (typed raw data only)."""
    rows = batch[dataset.columns]
    if dataset.id_column is None:
        rows = rows.assign(**{ROW_ID: row_ids(rows)})
    rows = rows.assign(**{BATCH: name})
    parts = [pd.read_parquet(raw_file)] if raw_file.exists() else []
    order = [c for c in (dataset.time_column, dataset.key) if c]
    combined = (
        pd.concat([*parts, rows], ignore_index=True)
        .drop_duplicates(subset=[dataset.key], keep="last")
        .sort_values(order, kind="stable")
    )
    raw_file.parent.mkdir(parents=True, exist_ok=True)
    partial = raw_file.with_name(f".{raw_file.name}.partial")
    combined.to_parquet(partial, index=False)
    os.replace(partial, raw_file)
    return len(combined)


def split_by_time(frame: pd.DataFrame, time_column: str, id_column: str, train: float, val: float) -> dict[str, pd.DataFrame]:
    ordered = frame.assign(**{time_column: parse_times(frame[time_column])})
    ordered = ordered.sort_values([time_column, id_column], kind="stable").reset_index(drop=True)
    times = ordered[time_column]
    train_end = times.iloc[int(len(ordered) * train)]
    val_end = times.iloc[min(int(len(ordered) * (train + val)), len(ordered) - 1)]
    parts = {
        "train": ordered[times < train_end],
        "val": ordered[(times >= train_end) & (times < val_end)],
        "test": ordered[times >= val_end],
    }
    return {name: part.reset_index(drop=True) for name, part in parts.items()}


def split_by_hash(frame: pd.DataFrame, key: str, seed: int, train: float, val: float) -> dict[str, pd.DataFrame]:
    hashed = pd.util.hash_pandas_object(pd.DataFrame({"key": frame[key].to_numpy(), "seed": seed}), index=False)
    bucket = hashed.to_numpy(np.uint64) / np.float64(2**64)
    ordered = frame.assign(_bucket=bucket)
    parts = {
        "train": ordered[bucket < train],
        "val": ordered[(bucket >= train) & (bucket < train + val)],
        "test": ordered[bucket >= train + val],
    }
    return {name: part.drop(columns="_bucket").sort_values(key, kind="stable").reset_index(drop=True) for name, part in parts.items()}


def split(raw: pd.DataFrame, dataset: DatasetConfig, config: SplitConfig) -> dict[str, pd.DataFrame]:
    """The old split stage's parts of ``raw`` (the whole raw data in memory)."""
    raw = raw.drop(columns=[BATCH], errors="ignore")
    if dataset.time_column:
        return split_by_time(raw, dataset.time_column, dataset.key, config.train, config.val)
    return split_by_hash(raw, dataset.key, config.seed, config.train, config.val)


def tensors(frame: pd.DataFrame, encoding: Encoding, label: str) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(encoding.categorical_indices(frame)),
        torch.from_numpy(encoding.numeric_values(frame)),
        torch.from_numpy(frame[label].to_numpy("float32")),
    )


class InMemoryDataModule(pl.LightningDataModule):
    """The old ``TabularDataModule``: every split read whole into tensors."""

    def __init__(self, split_paths: dict[str, Path], dataset: DatasetConfig, batch_size: int):
        super().__init__()
        self.split_paths = split_paths
        self.dataset = dataset
        self.batch_size = batch_size
        self.encoding: Encoding | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.encoding is not None:
            return
        label = self.dataset.label.column
        frames = {name: pd.read_parquet(path).dropna(subset=[label]) for name, path in self.split_paths.items()}
        self.encoding = Encoding.fit(frames["train"], self.dataset)
        self.splits = {name: tensors(frame, self.encoding, label) for name, frame in frames.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.batch_size)
