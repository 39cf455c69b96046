"""How a batch is read and typed: the one reading that validation, the raw data, the split and
``flywheel init`` share, so that nothing validation accepts can break a later step.

* **Reading.** A CSV batch is read with only an empty cell as a missing value
  (``keep_default_na=False``): a text such as ``n/a`` in a numeric column stays text and is
  refused by name, instead of passing as a blank. A column named twice in the header is refused
  (pandas would rename the second one). A parquet batch is rendered as the CSV pandas would
  write of it, so both are validated by the same suite.
* **Typing.** After validation a batch is typed as every later step reads it: the time column as
  UTC timestamps (any ISO 8601 form, offsets applied; other date text through dateutil), numeric
  features as float64, the label as a number (int64 for a classification label without blanks),
  categorical features as text. A value that does not parse as its column's type refuses the
  batch, naming the column and sample values; the raw data holds typed values only.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pandas as pd
from pandas.api import types

from pipelines.config import DatasetConfig, FeatureType, Task

PARQUET_SUFFIXES = (".parquet", ".pq")
SHOWN = 5  # sample values quoted in a message


class BatchReadError(ValueError):
    """A batch file cannot be read as a table (duplicated header column, not a CSV or parquet file)."""


def read_batch_file(path: Path) -> pd.DataFrame:
    """The batch at ``path`` (``.csv``, optionally compressed, or ``.parquet``) as a frame of
    the values a CSV carries. ``BatchReadError`` for a column named twice; pandas' and pyarrow's
    own errors for a file that is not a table."""
    if path.name.lower().endswith(PARQUET_SUFFIXES):
        return as_csv(pd.read_parquet(path))
    header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise BatchReadError(f"the header names {', '.join(map(repr, repeated))} more than once; each column must appear once")
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def as_csv(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as it reads back from CSV: the types a CSV batch of the same values would have."""
    text = frame.to_csv(index=False)  # timestamps as pandas writes them: 2013-01-01 05:00:00+00:00
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""])


def parse_times(values: pd.Series) -> pd.Series:
    """UTC timestamps (``datetime64[ns, UTC]``) of ``values``: any ISO 8601 form, offsets applied
    and a time without one read as UTC; other date text through dateutil. NaT where a value is
    not a date/time (pandas ``to_datetime``, formats "ISO8601" then "mixed")."""
    if types.is_datetime64_any_dtype(values):
        return pd.to_datetime(values, utc=True)
    try:
        return pd.to_datetime(values, utc=True, format="ISO8601")
    except (ValueError, TypeError):
        with warnings.catch_warnings():  # dateutil's "parsing without a format" notices
            warnings.simplefilter("ignore", UserWarning)
            return pd.to_datetime(values, utc=True, format="mixed", errors="coerce")


def typed(frame: pd.DataFrame, dataset: DatasetConfig) -> tuple[pd.DataFrame, list[str]]:
    """``frame``'s dataset columns typed as the later steps read them, and one line per column
    whose values do not parse as its type (naming how many rows and sample values). A column
    ``frame`` lacks is left out (validation names it)."""
    out, problems = frame.copy(), []

    def refuse(column: str, bad: pd.Series, expected: str, hint: str) -> None:
        samples = ", ".join(repr(v) for v in pd.unique(frame.loc[bad, column])[:SHOWN])
        problems.append(f"{column}: {int(bad.sum()):,} of {len(frame):,} values are not {expected} (e.g. {samples}); {hint}")

    time = dataset.time_column
    if time and time in frame:
        out[time] = parse_times(frame[time])
        bad = frame[time].notna() & out[time].isna()
        if bad.any():
            refuse(time, bad, "dates/times", "expected ISO 8601 text such as 2013-01-01T10:00:00Z")
    numeric = [*dataset.columns_of(FeatureType.numeric), dataset.label.column]
    for column in (c for c in numeric if c in frame):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column].notna() & numbers.isna()
        if bad.any():
            refuse(column, bad, "numbers (text in a numeric column)", "leave a missing value empty")
        whole_label = column == dataset.label.column and dataset.label.task == Task.classification and numbers.notna().all()
        out[column] = numbers.astype("int64" if whole_label else "float64")
    for column in (c for c in dataset.columns_of(FeatureType.categorical) if c in frame):
        out[column] = frame[column].map(_text, na_action="ignore").astype(object)
    return out, problems


def _text(value: object) -> str:
    """A category as text: a whole number read as a float (a column with blanks) loses its ``.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
