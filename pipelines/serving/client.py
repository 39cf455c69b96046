"""The client side of serving: send rows to the served model, and log what it saw.

Every answered request is appended to the inference log, which the drift check reads: the
feature values, the prediction (and the ``label`` of a classifier version that answers one),
the version that answered and when. The log is parquet, partitioned by day
(``<inference_log>/<model>/date=YYYY-MM-DD/part-*.parquet``), written in buffered chunks rather
than one file per request; each chunk appears atomically.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.artifacts import LABEL_OUTPUT, TEXT
from pipelines.config import AnyProject, DatasetConfig, FeatureType, ProjectConfig, ServingConfig
from pipelines.errors import NotRetryable
from pipelines.lineage import Record
from pipelines.serving import live

FLUSH_ROWS = 5000


def log_dir(serving: ServingConfig, model: str) -> Path:
    """The inference log of Triton's ``model``: one ``date=YYYY-MM-DD`` folder a day."""
    return serving.inference_log / model


def input_columns(dataset: DatasetConfig) -> list[str]:
    """What the log keeps of a tabular request: its id and time (when the project has them) and
    features (a text project's log keeps its text)."""
    return [c for c in (dataset.id_column, dataset.time_column) if c] + [f.name for f in dataset.features]


class InferenceLog:
    """Appends what a model saw and answered to the inference log, in buffered parquet chunks.
    Use as a context manager (or call ``flush``) so the last rows reach the log."""

    def __init__(self, config: AnyProject, flush_rows: int = FLUSH_ROWS) -> None:
        self.config = config
        self.flush_rows = flush_rows
        self._buffer: list[pd.DataFrame] = []

    def __enter__(self) -> InferenceLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    def append(self, rows: pd.DataFrame, predictions: npt.NDArray[Any], version: int, served_at: datetime | None = None, labels: npt.NDArray[np.int32] | None = None) -> None:
        """``served_at`` defaults to now; a replay of past traffic passes the time it was served.
        An id or time column the rows do not carry is left out; every feature (or the text) is kept.
        ``predictions``: one a row (a number, or a text project's label); ``labels``: a tabular
        classifier's served ``label``, one a row, where the version answered one (logged as the
        nullable int32 column ``label``: blank for the rows of a version without)."""
        if isinstance(self.config, ProjectConfig):
            dataset = self.config.dataset
            columns, optional = input_columns(dataset), {dataset.id_column, dataset.time_column}
        else:
            columns, optional = [TEXT], set()
        seen = rows[[c for c in columns if c in rows.columns or c not in optional]].reset_index(drop=True)
        seen["prediction"] = predictions
        if labels is not None:
            seen[LABEL_OUTPUT] = pd.array(labels, dtype="Int32")  # nullable: one chunk may hold versions with and without
        seen["model_version"] = version
        seen["served_at"] = pd.Timestamp(served_at or datetime.now(timezone.utc))
        self._buffer.append(seen)
        if sum(len(part) for part in self._buffer) >= self.flush_rows:
            self.flush()

    def flush(self) -> list[Path]:
        """Write the buffered rows, one parquet file for each day partition they fall in."""
        if not self._buffer:
            return []
        chunk = pd.concat(self._buffer, ignore_index=True)
        self._buffer = []
        written = []
        for day, rows in chunk.groupby(chunk["served_at"].dt.strftime("%Y-%m-%d")):
            folder = log_dir(self.config.serving, self.config.served_model) / f"date={day}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"part-{datetime.now(timezone.utc):%H%M%S}-{uuid.uuid4().hex[:8]}.parquet"
            partial = folder / f".{path.name}.partial"
            rows.to_parquet(partial, index=False)
            partial.replace(path)
            written.append(path)
        return written


class ServedModel:
    """Predictions from the model Triton serves, each request logged. Use as a context manager
    (or call ``flush``) so the last rows reach the log."""

    def __init__(self, config: ProjectConfig, flush_rows: int = FLUSH_ROWS) -> None:
        self.config = config
        self.client = live.connect(config.serving.triton)
        self.log = InferenceLog(config, flush_rows)

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    def answer(self, rows: pd.DataFrame) -> live.Answer:
        """The served model's answer for ``rows``: predictions, labels (None from a version without
        a ``label``) and the version; the request is logged."""
        answered = live.answer(self.client, self.config.model.name, self.config.dataset, rows)
        self.log.append(rows, answered.prediction, answered.version, labels=answered.label)
        return answered

    def predict(self, rows: pd.DataFrame) -> npt.NDArray[np.float32]:
        """The served model's predictions for ``rows``, shape (rows,); the request is logged (with its labels)."""
        return self.answer(rows).prediction

    def flush(self) -> list[Path]:
        return self.log.flush()


def read_log(serving: ServingConfig, model: str) -> pd.DataFrame:
    """Everything logged for Triton's ``model`` (the ``date`` partition as a column). Every column
    any chunk has is read (``label`` is blank for the rows of versions without one), not only
    those of the first chunk."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    folder = log_dir(serving, model)
    if not folder.is_dir():
        return pd.DataFrame()
    chunks = ds.dataset(folder, format="parquet", partitioning=ds.HivePartitioning.discover(infer_dictionary=True))
    everything = pa.unify_schemas([chunks.schema, *(chunk.physical_schema for chunk in chunks.get_fragments())])
    return chunks.replace_schema(everything).to_table().to_pandas()


class RequestError(NotRetryable, ValueError):
    """Rows that cannot be sent to a project's model: a missing column, a value of the wrong type."""


def read_requests(project: str, dataset: DatasetConfig, path: Path, rows: int | None = None) -> pd.DataFrame:
    """The rows of a CSV or parquet file (the first ``rows``, if given), checked against the
    project's features: every feature column present, numbers parse as numbers. Extra columns
    (an id, the label) are kept.

    ``RequestError`` names the project, the file, the column and what was expected.
    """
    where = f"project {project}: {path}"
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except FileNotFoundError:
        raise RequestError(f"{where}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - pandas and pyarrow raise many kinds for a bad file
        raise RequestError(f"{where}: not a readable {'parquet' if path.suffix == '.parquet' else 'CSV'} file ({type(exc).__name__}: {exc})") from exc
    features = dataset.features
    missing = [f.name for f in features if f.name not in frame.columns]
    if missing:
        raise RequestError(f"{where}: missing feature columns {missing}; the model expects {[f.name for f in features]}")
    frame = frame.head(rows) if rows is not None else frame
    for feature in dataset.columns_of(FeatureType.numeric):
        numbers = pd.to_numeric(frame[feature], errors="coerce")
        bad = frame[feature][numbers.isna() & frame[feature].notna()]
        if len(bad):
            raise RequestError(f"{where}: column {feature!r} must be numeric, got {bad.astype(str).unique()[:5].tolist()}")
        frame[feature] = numbers
    return frame.reset_index(drop=True)


def send(config: ProjectConfig, rows: pd.DataFrame, batch_size: int = 32) -> Record:
    """Send ``rows`` to the project's served model in client-sized requests, each one logged."""
    with ServedModel(config) as served:
        for start in range(0, len(rows), batch_size):
            served.predict(rows.iloc[start : start + batch_size])
    return {"project": config.name, "rows": len(rows), "requests": -(-len(rows) // batch_size)}
