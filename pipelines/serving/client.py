"""The client side of serving: send rows to the served model, read what Triton logged.

Triton logs every row it answers itself, whatever the client (``backend/inference_log.py``):
``<inference_log>/<model>/date=YYYY-MM-DD/part-*.parquet``, one row a served row, keyed by
``request_id``; the drift check and the feedback join read it. This client only sends. A log
can also be written from here (``write_log``), with the server's schema: replays of past
traffic and tests.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.artifacts import LABEL, LABEL_OUTPUT, OUTPUT, SCORES, TEXT
from pipelines.config import AnyProject, DatasetConfig, FeatureType, ProjectConfig, ServingConfig
from pipelines.errors import NotRetryable
from pipelines.lineage import Record
from pipelines.serving import live

if TYPE_CHECKING:
    import pyarrow as pa


def log_dir(serving: ServingConfig, model: str) -> Path:
    """The inference log of Triton's ``model``: one ``date=YYYY-MM-DD`` folder a day."""
    return serving.inference_log / model


def log_columns(config: AnyProject) -> dict[str, pa.DataType]:
    """The model's own columns of its inference log, as Triton writes them (the log's own,
    ``request_id`` to ``latency_ms``, follow): a tabular model's features as it receives them
    (categories as strings, numbers as float32), ``prediction`` and ``label``; a text model's
    ``text``, the ``label`` it answered and its ``scores`` (one a label)."""
    import pyarrow as pa

    if isinstance(config, ProjectConfig):
        types = {FeatureType.categorical: pa.string(), FeatureType.numeric: pa.float32()}
        return {**{f.name: types[f.type] for f in config.dataset.features}, OUTPUT: pa.float32(), LABEL_OUTPUT: pa.int32()}
    return {TEXT: pa.string(), LABEL: pa.string(), SCORES: pa.list_(pa.float32())}


def write_log(config: AnyProject, rows: pd.DataFrame, version: int, served_at: datetime | None = None, request_ids: list[str] | None = None) -> None:
    """Append ``rows`` to the project's inference log as if Triton had answered them with
    ``version`` at ``served_at`` (default now): a replay of past traffic, or a test's window.

    ``rows`` holds the model's columns (``log_columns``; a missing one is blank, others are
    ignored; numbers are cast to float32, as Triton receives them); ``request_ids`` defaults to
    one uuid4 hex a row. Written at once through the server's own writer; ``OSError`` if it
    could not be.
    """
    from pipelines.serving.backend.inference_log import InferenceLogWriter, request_keys

    columns = log_columns(config)
    when = (served_at or datetime.now(timezone.utc)).timestamp()
    values = {name: _as_logged(rows[name], kind) for name, kind in columns.items() if name in rows.columns}
    ids = request_ids if request_ids is not None else [request_keys("", 1)[0] for _ in range(len(rows))]
    writer = InferenceLogWriter(log_dir(config.serving, config.served_model), config.served_model, columns, max(1, len(rows)), config.serving.log.flush_seconds)
    writer.append(values, ids, version, when)
    writer.close()
    if writer.lost:
        raise OSError(f"{writer.lost} of {len(rows)} rows could not be written to the inference log {writer.folder}: see the log above")


def _as_logged(column: pd.Series, kind: pa.DataType) -> npt.NDArray[np.generic]:
    """A frame's column as the writer takes it: strings, float32 as Triton receives numbers, or
    Python ints (None where missing: blank in the log)."""
    import pyarrow as pa

    if pa.types.is_string(kind):
        return np.asarray(column.astype(str).to_numpy(object))
    if pa.types.is_floating(kind):
        return np.asarray(column.to_numpy(kind.to_pandas_dtype()))
    return np.asarray(column.astype(object).where(column.notna(), None).to_numpy(object))


class ServedModel:
    """Predictions from the model Triton serves (which logs them itself). Use as a context
    manager so its connection is closed."""

    def __init__(self, config: ProjectConfig) -> None:
        self.config = config
        self.client = live.connect(config.serving.triton)

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def answer(self, rows: pd.DataFrame) -> live.Answer:
        """The served model's answer for ``rows``: predictions, labels (None from a version without
        a ``label``), the version and each row's key in the inference log."""
        return live.answer(self.client, self.config.model.name, self.config.dataset, rows)

    def predict(self, rows: pd.DataFrame) -> npt.NDArray[np.float32]:
        """The served model's predictions for ``rows``, shape (rows,)."""
        return self.answer(rows).prediction


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
    """Send ``rows`` to the project's served model in client-sized requests (Triton logs them)."""
    with ServedModel(config) as served:
        for start in range(0, len(rows), batch_size):
            served.predict(rows.iloc[start : start + batch_size])
    return {"project": config.name, "rows": len(rows), "requests": -(-len(rows) // batch_size)}
