"""The DVC ``split`` stage: cut the raw dataset into train/val/test.

With a time column the cut is by time, not at random: every test row is later than every
training row, as it is for the model in service, so the test score is not flattered by
leakage from the future. Without one the split is a seeded hash of each row's id: stable (a
row keeps its part as the data grows) but with no guarantee against time leakage, since
rows of the same period land on both sides. Run by ``dvc repro`` (see ``dvc.yaml``) as
``python -m pipelines.data.split --home <home> --project <name>`` in the project's DVC repository.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import BATCH, DatasetConfig, SplitConfig, load_config
from pipelines.data.schema import parse_times
from pipelines.errors import NotRetryable
from pipelines.lineage import Record, write_json

PARTS = ("train", "val", "test")


class LabelCoverageError(NotRetryable, ValueError):
    """A class label the model would be evaluated on without ever training on it, or a training
    split with fewer than two labels: no retry changes the data, so training does not start."""


def check_label_coverage(labels: Mapping[str, Iterable[object]], what: str) -> None:
    """``labels``: the class label of each record, by split (train, val, test), of ``what`` (a
    dataset's name). ``LabelCoverageError`` naming every label without training records and its
    count per split, or when training would see fewer than two labels."""
    counts: dict[str, Counter[str]] = {part: Counter(map(str, values)) for part, values in labels.items()}
    every = sorted(set().union(*counts.values()))
    unseen = [label for label in every if not counts.get("train", Counter())[label]]
    problems = [
        f"label {label!r} has no training records ({', '.join(f'{part} {counts[part][label]}' for part in counts)})" for label in unseen
    ]
    if len(every) - len(unseen) < 2:
        problems.append(f"the train split holds {len(every) - len(unseen)} label(s); a classifier needs at least two")
    if problems:
        raise LabelCoverageError(f"{what}: {'; '.join(problems)}. Land more records of each label (or drop the rare one) and run again")


def split_paths(output_dir: Path) -> dict[str, Path]:
    """The parquet file of each part (train, val, test) in a split's ``output_dir``."""
    return {part: output_dir / f"{part}.parquet" for part in PARTS}


def raw_path(dataset: DatasetConfig) -> Path:
    """The raw dataset's path; ``FileNotFoundError`` that names it when nothing was ingested yet."""
    if not dataset.raw_path.exists():
        raise FileNotFoundError(f"{dataset.raw_path}: no raw dataset yet; land a batch and let the validate task ingest it")
    return dataset.raw_path


def split_by_time(frame: pd.DataFrame, time_column: str, id_column: str, train: float, val: float) -> dict[str, pd.DataFrame]:
    """Cut at two moments so that train < val < test in time; rows of one moment stay together."""
    # Ordered by the parsed time (raw data is typed at ingestion; text from older raw data parses the same way).
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
    empty = [name for name, part in parts.items() if part.empty]
    if empty:
        raise ValueError(
            f"cannot cut {len(ordered)} rows spanning {times.nunique()} distinct {time_column} values by time: "
            f"the {'/'.join(empty)} split is empty; land more batches"
        )
    return {name: part.reset_index(drop=True) for name, part in parts.items()}


def split_by_hash(frame: pd.DataFrame, key: str, seed: int, train: float, val: float) -> dict[str, pd.DataFrame]:
    """Each row to train, val or test by a seeded hash of its ``key`` value: the same row always
    lands in the same part, whatever else the data holds (pandas' ``hash_pandas_object``, which
    is stable across runs for the same values and hash key)."""
    # The seed is hashed with the key as a second column (a hash_key would not reach integer keys).
    hashed = pd.util.hash_pandas_object(pd.DataFrame({"key": frame[key].to_numpy(), "seed": seed}), index=False)
    bucket = hashed.to_numpy(np.uint64) / np.float64(2**64)
    ordered = frame.assign(_bucket=bucket)
    parts = {
        "train": ordered[bucket < train],
        "val": ordered[(bucket >= train) & (bucket < train + val)],
        "test": ordered[bucket >= train + val],
    }
    empty = [name for name, part in parts.items() if part.empty]
    if empty:
        raise ValueError(f"cannot split {len(frame)} rows by hash: the {'/'.join(empty)} split is empty; land more rows")
    return {name: part.drop(columns="_bucket").sort_values(key, kind="stable").reset_index(drop=True) for name, part in parts.items()}


def summarise(parts: dict[str, pd.DataFrame], time_column: str | None, label: str) -> Record:
    def span(part: pd.DataFrame) -> dict[str, str]:
        return {"from": str(part[time_column].min()), "to": str(part[time_column].max())} if time_column else {}

    return {
        name: {"rows": len(part), **span(part), "label_mean": round(float(part[label].mean()), 6)}
        for name, part in parts.items()
    }


def run(dataset: DatasetConfig, split: SplitConfig) -> Record:
    """Split the raw dataset (``dataset.raw_path``) and write the parts and ``summary.json``
    (DVC's metric: rows, time span, label mean of each part) into ``split.output_dir``.
    ``FileNotFoundError`` without raw data; ``ValueError`` when a part would be empty."""
    # Where a row came from is the raw data's business: the splits (and their hashes) hold the rows only.
    raw = pd.read_parquet(raw_path(dataset)).drop(columns=[BATCH], errors="ignore")
    if dataset.time_column:
        parts = split_by_time(raw, dataset.time_column, dataset.key, split.train, split.val)
    else:
        parts = split_by_hash(raw, dataset.key, split.seed, split.train, split.val)
    paths = split_paths(split.output_dir)
    for name, part in parts.items():
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        partial = paths[name].with_name(f".{paths[name].name}.partial")
        part.to_parquet(partial, index=False)
        os.replace(partial, paths[name])
    summary = summarise(parts, dataset.time_column, dataset.label.column)
    write_json(split.output_dir / "summary.json", summary)
    return summary


if __name__ == "__main__":
    # DVC runs this in the project's repository; the stage names the home relative to it.
    parser = argparse.ArgumentParser(description="the split stage of one project (run by dvc repro)")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--project", required=True)
    args = parser.parse_args()
    config = load_config(args.project, args.home)
    run(config.dataset, config.split)
