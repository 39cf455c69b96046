"""Turning split parquet files into tensors: the vocabularies and scales are learned on train only.

The splits are streamed by parquet row group (the split stage writes each part as one file in
row groups of ``pipelines.data.raw.ROW_GROUP_ROWS`` rows), never read whole: memory holds a few
row groups, however many rows the split has, so a training set larger than RAM trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipelines.config import DatasetConfig, FeatureType, Task
from pipelines.data.sampling import sample_positions

OOV = 0  # index of a category never seen in training; real categories start at 1
SHUFFLE_GROUPS = 4  # row groups whose rows are shuffled together (about 400,000 rows at the split's row group size)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # categorical codes int64, numerics float32, label float32


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

    @classmethod
    def fit_streaming(cls, frames: Iterable[pd.DataFrame], dataset: DatasetConfig) -> Encoding:
        """``fit`` over the training rows given in pieces (e.g. one frame per parquet row group),
        one pass, in memory that holds the vocabularies and a few numbers a column, not the rows:
        the same vocabularies, and means and standard deviations equal to ``fit``'s on the
        concatenated frames up to float64 rounding. Each piece's count, mean and sum of squared
        deviations are combined with the running ones by Chan, Golub and LeVeque's parallel
        update (``Moments.add``), which stays exact where summing squares would cancel. As in
        ``fit``: infinite numerics count as missing, a column with no spread gets scale 1.
        The pieces must give each column the dtype the whole frame has (``SplitPart.frame`` does)."""
        cats = dataset.columns_of(FeatureType.categorical)
        nums = dataset.columns_of(FeatureType.numeric)
        regression = dataset.label.task == Task.regression
        vocab: dict[str, set[str]] = {c: set() for c in cats}
        numeric, target = Moments(len(nums)), Moments(1)
        for frame in frames:
            for c in cats:
                vocab[c].update(frame[c].dropna().astype(str).unique().tolist())
            numeric.add(frame[nums].astype("float64").replace([np.inf, -np.inf], np.nan).to_numpy())
            if regression:
                target.add(frame[[dataset.label.column]].astype("float64").to_numpy())
        std = numeric.std()
        scales = {}
        if regression:
            seen = bool(target.count[0])  # as fit: NaN over no rows, a spread of 0 read as 1
            spread = float(target.std()[0]) if seen else float("nan")
            scales = {"target_mean": float(target.mean[0]) if seen else float("nan"), "target_std": spread or 1.0}
        return cls(
            categorical={c: sorted(vocab[c]) for c in cats},
            numeric=nums,
            numeric_mean=[float(m) if n else 0.0 for m, n in zip(numeric.mean, numeric.count)],
            numeric_std=[1.0 if not n or s == 0.0 else float(s) for s, n in zip(std, numeric.count)],
            **scales,
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


@dataclass
class Moments:
    """Running count, mean and sum of squared deviations (M2) of ``columns`` columns, NaN skipped."""

    columns: int
    count: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.count, self.mean, self.m2 = np.zeros(self.columns), np.zeros(self.columns), np.zeros(self.columns)

    def add(self, values: np.ndarray) -> None:
        """Take in ``values``, shape (rows, columns), float64, NaN for missing: the piece's own
        moments (two passes over it), then Chan et al.'s pairwise combination
        ``delta = mean_b - mean_a; mean = mean_a + delta * n_b / n; M2 = M2_a + M2_b + delta² n_a n_b / n``."""
        present = ~np.isnan(values)
        n_b = present.sum(axis=0).astype("float64")
        safe = np.where(n_b > 0, n_b, 1.0)
        mean_b = np.where(present, values, 0.0).sum(axis=0) / safe
        m2_b = (np.where(present, values - mean_b, 0.0) ** 2).sum(axis=0)
        n = self.count + n_b
        total = np.where(n > 0, n, 1.0)
        delta = mean_b - self.mean
        self.mean = np.where(n > 0, self.mean + delta * n_b / total, 0.0)
        self.m2 = self.m2 + m2_b + delta**2 * self.count * n_b / total
        self.count = n

    def std(self) -> np.ndarray:
        """Population standard deviation (ddof 0) per column; 0 where no value was seen."""
        return np.sqrt(self.m2 / np.where(self.count > 0, self.count, 1.0))


@dataclass(frozen=True)
class SplitPart:
    """One split file read by row group: the columns training needs, its rows with a label, and,
    for a sampled train split, which of them were drawn."""

    path: Path
    columns: list[str]  # features and label
    label: str
    as_float: list[str]  # integer columns with a null somewhere in the file: float64 in every group, as pandas reads the whole file
    labelled: list[int]  # rows with a label, per row group
    chosen: list[np.ndarray] | None = None  # per row group: positions among its labelled rows that were drawn

    @classmethod
    def open(cls, path: Path, dataset: DatasetConfig) -> SplitPart:
        """Read ``path``'s metadata and label column (one row group at a time). ``ValueError``
        naming the file and the columns it lacks."""
        columns = [*(f.name for f in dataset.features), dataset.label.column]
        file = pq.ParquetFile(path)
        schema = file.schema_arrow
        if missing := [c for c in columns if c not in schema.names]:
            raise ValueError(f"{path}: no column {missing}; expected the features and label of {dataset.name}: {columns}")
        integers = [c for c in columns if pa.types.is_integer(schema.field(c).type)]
        nulls = _null_counts(file, integers)
        unknown = [c for c in integers if c not in nulls]  # no statistics in the file: counted below
        label, counts = dataset.label.column, {c: 0 for c in unknown}
        labelled = []
        for group in range(file.num_row_groups):
            table = file.read_row_group(group, columns=list(dict.fromkeys([label, *unknown])))
            labelled.append(int(table.column(label).to_pandas().notna().sum()))
            for c in unknown:
                counts[c] += table.column(c).null_count
        nulls |= counts
        return cls(path, columns, label, [c for c in integers if nulls[c]], labelled)

    @property
    def rows(self) -> int:
        """Rows read from this part: the labelled ones, or the drawn ones of a sample."""
        return sum(len(c) for c in self.chosen) if self.chosen is not None else sum(self.labelled)

    def sample(self, max_rows: int | None, seed: int) -> SplitPart:
        """This part limited to ``max_rows`` of its labelled rows drawn with ``seed`` (the same
        rows every epoch and every run on the same file); itself when it holds no more."""
        total = sum(self.labelled)
        if max_rows is None or total <= max_rows:
            return self
        positions = sample_positions(total, max_rows, seed)
        bounds = np.cumsum([0, *self.labelled])
        cuts = np.searchsorted(positions, bounds)
        return replace(self, chosen=[positions[a:b] - start for a, b, start in zip(cuts[:-1], cuts[1:], bounds[:-1])])

    def frame(self, file: pq.ParquetFile, group: int) -> pd.DataFrame:
        """The labelled (and drawn) rows of row ``group`` of ``file`` (this part's, opened), in file order."""
        frame = file.read_row_group(group, columns=self.columns).to_pandas()
        # A group without the nulls of its column would come back int64 (unless the file's pandas metadata says Int64).
        frame = frame.astype({c: "float64" for c in self.as_float if isinstance(frame[c].dtype, np.dtype) and frame[c].dtype.kind in "iu"})
        # Rows without a label teach and score nothing (validation may accept a few).
        frame = frame[frame[self.label].notna()]
        return frame.iloc[self.chosen[group]] if self.chosen is not None else frame

    def frames(self, order: Iterable[int] | None = None) -> Iterator[pd.DataFrame]:
        """``frame`` of each row group, in ``order`` (file order by default), empty ones skipped."""
        with pq.ParquetFile(self.path) as file:
            for group in range(len(self.labelled)) if order is None else order:
                if self.chosen[group].size if self.chosen is not None else self.labelled[group]:
                    yield self.frame(file, group)


def _null_counts(file: pq.ParquetFile, columns: list[str]) -> dict[str, int]:
    """Nulls per column from the row groups' statistics, for the columns all of whose row groups have them."""
    names = [file.metadata.schema.column(i).path for i in range(file.metadata.num_columns)]
    counts = {}
    for column in columns:
        index, total = names.index(column), 0
        for group in range(file.num_row_groups):
            stats = file.metadata.row_group(group).column(index).statistics
            if stats is None or not stats.has_null_count:
                break
            total += stats.null_count
        else:
            counts[column] = total
    return counts


class StreamedSplit(IterableDataset[Batch]):
    """Batches of ``batch_size`` rows of a split part, encoded as the model reads them. With a
    ``seed``, each pass (epoch) is in another order, the same for the same seed and epoch: the
    row groups in a permuted order, rows shuffled within a buffer of ``SHUFFLE_GROUPS`` row
    groups; without one, file order. Every row once per pass; the last batch may be short."""

    def __init__(self, part: SplitPart, encoding: Encoding, batch_size: int, seed: int | None = None, epoch: int = 0):
        super().__init__()
        self.part, self.encoding, self.batch_size, self.seed = part, encoding, batch_size, seed
        self.epoch = epoch  # of the next pass; a pass moves it on

    def __len__(self) -> int:
        return -(-self.part.rows // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.seed is None:
            yield from self._batches(self.part.frames(), None, 1)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            yield from self._batches(self.part.frames(rng.permutation(len(self.part.labelled))), rng, SHUFFLE_GROUPS)

    def _batches(self, frames: Iterator[pd.DataFrame], rng: np.random.Generator | None, groups: int) -> Iterator[Batch]:
        label = self.part.label
        held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        done = False
        while not done:
            for _ in range(groups):
                frame = next(frames, None)
                if frame is None:
                    done = True
                    break
                held.append((self.encoding.categorical_indices(frame), self.encoding.numeric_values(frame), frame[label].to_numpy("float32")))
            if not held:
                return
            cat, num, target = (np.concatenate(arrays) for arrays in zip(*held))
            if rng is not None:
                order = rng.permutation(len(target))
                cat, num, target = cat[order], num[order], target[order]
            full = len(target) if done else len(target) - len(target) % self.batch_size
            for start in range(0, full, self.batch_size):
                end = min(start + self.batch_size, full)
                yield torch.from_numpy(cat[start:end]), torch.from_numpy(num[start:end]), torch.from_numpy(target[start:end])
            held = [(cat[full:], num[full:], target[full:])] if full < len(target) else []


class TabularDataModule(pl.LightningDataModule):
    """The train/val/test splits of one project, streamed by parquet row group; the encoding comes
    from train. ``max_rows``: train on at most this many of the train split's labelled rows, drawn
    with ``seed`` (which also orders each epoch's batches); val and test are read whole, in file order."""

    def __init__(self, split_paths: dict[str, Path], dataset: DatasetConfig, batch_size: int, seed: int = 0, max_rows: int | None = None):
        super().__init__()
        self.split_paths = split_paths
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.max_rows = max_rows
        self.encoding: Encoding | None = None
        self.parts: dict[str, SplitPart] = {}

    def prepare_data(self) -> None:
        missing = [str(p) for p in self.split_paths.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(f"split files missing: {missing}; run the split stage (dvc repro split) first")

    def setup(self, stage: str | None = None) -> None:
        if self.encoding is not None:
            return
        parts = {name: SplitPart.open(path, self.dataset) for name, path in self.split_paths.items()}
        parts["train"] = parts["train"].sample(self.max_rows, self.seed)
        self.encoding = Encoding.fit_streaming(parts["train"].frames(), self.dataset)
        self.parts = parts

    @property
    def train_rows(self) -> dict[str, int]:
        """The train split's labelled rows and those trained on (fewer when ``max_rows`` drew a sample)."""
        return {"split": sum(self.parts["train"].labelled), "trained": self.parts["train"].rows}

    def _loader(self, part: str, seed: int | None = None) -> DataLoader[Batch]:
        assert self.encoding is not None, "setup() first"
        epoch = self.trainer.current_epoch if self.trainer is not None else 0  # a resumed run goes on where it stopped
        # batch_size=None: the dataset yields whole batches; no worker processes (one reader, row group by row group).
        return DataLoader(StreamedSplit(self.parts[part], self.encoding, self.batch_size, seed, epoch), batch_size=None)

    def train_dataloader(self) -> DataLoader[Batch]:
        return self._loader("train", self.seed)

    def val_dataloader(self) -> DataLoader[Batch]:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader[Batch]:
        return self._loader("test")
