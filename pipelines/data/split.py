"""The DVC ``split`` stage: cut the raw dataset into train/val/test by time.

Cut by time, not at random: every test row is later than every training row, as it is
for the model in service, so the test score is not flattered by leakage from the future.
Run by ``dvc repro`` (see ``dvc.yaml``) as ``python -m pipelines.data.split`` in the
project home.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipelines.config import ProjectConfig, load_config
from pipelines.lineage import write_json

PARTS = ("train", "val", "test")


def split_paths(config: ProjectConfig) -> dict[str, Path]:
    directory = config.path(config.split.output_dir)
    return {part: directory / f"{part}.parquet" for part in PARTS}


def raw_path(config: ProjectConfig) -> Path:
    """The raw dataset's path; an error that names it when nothing was ingested yet."""
    path = config.path(config.dataset.raw_path)
    if not path.exists():
        raise FileNotFoundError(
            f"{config.dataset.raw_path}: no raw dataset yet; land a batch and let the validate task ingest it"
        )
    return path


def split_by_time(frame: pd.DataFrame, time_column: str, id_column: str, train: float, val: float) -> dict[str, pd.DataFrame]:
    """Cut at two moments so that train < val < test in time; rows of one moment stay together."""
    ordered = frame.sort_values([time_column, id_column], kind="stable").reset_index(drop=True)
    times = pd.to_datetime(ordered[time_column], utc=True)
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


def summarise(parts: dict[str, pd.DataFrame], time_column: str, label: str) -> dict:
    return {
        name: {
            "rows": len(part),
            "from": str(part[time_column].min()),
            "to": str(part[time_column].max()),
            "label_mean": round(float(part[label].mean()), 6),
        }
        for name, part in parts.items()
    }


def run(config: ProjectConfig) -> dict:
    """Split the raw dataset and write the parts and ``summary.json`` (DVC's metric)."""
    parts = split_by_time(
        pd.read_parquet(raw_path(config)), config.dataset.time_column, config.dataset.id_column, config.split.train, config.split.val
    )
    paths = split_paths(config)
    for name, part in parts.items():
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        partial = paths[name].with_name(f".{paths[name].name}.partial")
        part.to_parquet(partial, index=False)
        os.replace(partial, paths[name])
    summary = summarise(parts, config.dataset.time_column, config.dataset.label.column)
    write_json(config.path(config.split.output_dir) / "summary.json", summary)
    return summary


if __name__ == "__main__":
    # DVC runs this in the project home (the directory of dvc.yaml), whatever FLYWHEEL_HOME says.
    run(load_config(Path.cwd()))
