"""A version's performance reference: its test split as its own ``model.onnx`` scored it at publish.

``model_repository/<model>/<N>/performance_reference.parquet`` holds, for at most
``REFERENCE_ROWS`` labelled test rows (a seeded sample when the split is larger): the feature
columns as the test split has them, ``<dataset.label.column>`` (the truth, float64) and
``prediction`` (float32, what the version answers for the row). It is what production is
compared with: the version's own test metric and its standard error (``pipelines.feedback.
performance``), the calibration of CBPE and the loss model of DLE (``pipelines.feedback.
estimate``), and the label check of a labelled batch. A version published before the file
existed has none: readers get None and say so instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.artifacts import OUTPUT, PERFORMANCE_REFERENCE_FILE
from pipelines.config import DatasetConfig
from pipelines.lineage import Record

REFERENCE_ROWS = 50_000  # bounds the file (a few MB) and the bootstrap of the test metric


class PerformanceReferenceError(ValueError):
    """A performance reference that lacks a column its readers need."""


def write_reference(test: Path, dataset: DatasetConfig, model_file: Path, seed: int, folder: Path, rows: int = REFERENCE_ROWS) -> Record:
    """Score the labelled rows of the test split ``test`` (a parquet file) with ``model_file`` and
    write them to ``folder/performance_reference.parquet``: the features, the truth (float64) and
    ``prediction`` (float32), at most ``rows`` rows drawn with ``seed``. Returns ``files`` (name ->
    path, for the new version) and ``rows`` / ``test_rows`` (written, labelled in the split)."""
    from pipelines.evaluation.gate import predict_onnx

    label, features = dataset.label.column, [f.name for f in dataset.features]
    frame = pd.read_parquet(test, columns=[*features, label])
    labelled = frame[frame[label].notna()]
    sample = labelled.sample(n=rows, random_state=seed) if len(labelled) > rows else labelled
    sample = sample.reset_index(drop=True)
    scored = sample[features].assign(**{label: sample[label].to_numpy("float64"), OUTPUT: predict_onnx(model_file, sample).astype(np.float32)})
    path = folder / PERFORMANCE_REFERENCE_FILE
    scored.to_parquet(path, index=False)
    return {"files": {PERFORMANCE_REFERENCE_FILE: path}, "rows": len(scored), "test_rows": len(labelled)}


def read_reference(version_dir: Path, dataset: DatasetConfig) -> pd.DataFrame | None:
    """The performance reference of the version in ``version_dir``, or None when it has none
    (published before the file existed; ``missing``). ``PerformanceReferenceError`` names a file that lacks
    the truth, ``prediction`` or a feature column."""
    path = version_dir / PERFORMANCE_REFERENCE_FILE
    if not path.is_file():
        return None
    frame = pd.read_parquet(path)
    wanted = [*(f.name for f in dataset.features), dataset.label.column, OUTPUT]
    lacking = [c for c in wanted if c not in frame.columns]
    if lacking:
        raise PerformanceReferenceError(f"{path}: no column {', '.join(map(repr, lacking))}; expected the features, {dataset.label.column!r} (truth) and {OUTPUT!r}")
    return frame


def missing(version: int) -> str:
    """What a reader says of a version without a performance reference."""
    return f"not available: version {version} has no {PERFORMANCE_REFERENCE_FILE}"
