"""``flywheel init``: a new tabular project profiled from one sample file.

From a sample (CSV or parquet) and the name of its label column, infer the task, the
features and their types, and write the project's two reviewed files:

* ``<home>/projects/<name>/params.yaml``: the dataset's roles (label, id, time, features)
  and the house defaults for split, model, training and the gate;
* ``<home>/projects/<name>/expectations.json``: a Great Expectations suite that accepts
  batches like the sample and rejects the usual upstream faults (a missing column, a flood
  of unseen categories, values far out of range, a column that went blank).

The sample is read as ingestion reads a batch (``pipelines.data.schema.read_batch_file``: only
an empty cell is missing, a parquet file as the CSV of its values), so the types the suite
expects are the ones CSV gives (whole numbers read as int64, any blank in a numeric column
turns it into float64). Anything the sample cannot support (a missing or
constant label, a label that is not a binary 0/1 for classification, a time column that does
not parse, an id that repeats) is refused with a ``ProfileError`` that names the file or
column and what was expected, before anything is written.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from pandas.api import types

from pipelines.config import PARAMS_FILE, PROJECT_NAME, ROW_ID, SUITE_FILE
from pipelines.data.schema import PARQUET_SUFFIXES, parse_times, read_batch_file
from pipelines.lineage import Record

CLASSIFICATION, REGRESSION = "classification", "regression"
LABEL_NULLS_MAX = 0.05  # a label blank in more rows than this is not a label column yet
RANGE_MARGIN = 1.0  # numeric bounds: the sample's range widened by this share of it on each side
# ... which a rare outlier may cross (at most 1 row in 1000: real data has a few, e.g. a diamond
# 31.8 mm wide), but no value may cross the hard bounds, the range widened by 10x its width:
# a unit error or a value 1000x off fails the batch even in one row.
RANGE_MOSTLY = 0.999
HARD_MARGIN = 10.0
FEW_VALUES = 20  # a categorical column with at most this many values is a closed set
FEW_VALUES_MOSTLY = 0.999  # a closed set tolerates a rare value the sample missed (1 row in 1,000), no more
MANY_VALUES_MOSTLY = 0.99  # a larger set tolerates 1% unseen values (a new route, a new product)
MAX_LISTED_VALUES = 1000  # beyond this (or more values than half the rows) no value set is written
NULLS_SLACK = 0.05  # a column blank in p of the sample may be blank in up to max(2p, p + 0.05) of a batch
RMSE_FLOOR_SHARE = 0.95  # regression floor: 0.95 x the label's std (a mean predictor scores ~1.0 x)
SAMPLE_SHOWN = 5  # values quoted in an error or a summary line

SPLIT = {"train": 0.7, "val": 0.15, "test": 0.15, "seed": 13}
MODEL: Record = {"embedding_dim": 8, "hidden_sizes": [64, 32], "dropout": 0.1}
TRAIN = {"max_epochs": 8, "batch_size": 1024, "learning_rate": 0.003, "patience": 2, "seed": 13}
CLASSIFICATION_GATE = {"metric": "roc_auc", "min_improvement": 0.002, "floor": 0.55}

# A date, optionally a time (T or a space), fractions, and Z or an offset: any ISO 8601 form, as
# ingestion parses it (pipelines.data.schema.parse_times). A sample in ISO 8601 gets this check.
ISO_8601 = r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}:?\d{2})?$"
# Otherwise, tried in this order; the first that every sample value fits becomes the suite's strftime check.
# ISO 8601 first; month-first before day-first, as pandas guesses.
TIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%SZ",
    "%Y-%m-%dT%H:%M:%S.%fZ",
    "%Y-%m-%dT%H:%M:%S%z",
    "%Y-%m-%dT%H:%M:%S.%f%z",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%dT%H:%M:%S.%f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M:%S%z",
    "%Y-%m-%d %H:%M:%S.%f%z",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M:%S.%f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d",
    "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y",
    "%d/%m/%Y",
    "%d.%m.%Y",
)


class ProfileError(ValueError):
    """A user mistake: the message names the file or column and what was expected."""


@dataclass(frozen=True)
class Profile:
    params: Record  # the project's params.yaml content: kind, dataset, split, model, train, gate
    suite: Record  # GE suite JSON: {"name": <project>, "expectations": [{"type", "kwargs", "notes"}, ...]}
    summary: list[str]  # human lines of what was inferred: one per column, plus the label's task and id/time choice


def profile(
    frame: pd.DataFrame,
    project: str,
    label: str,
    task: str | None = None,
    time_column: str | None = None,
    id_column: str | None = None,
    exclude: Sequence[str] = (),
) -> Profile:
    """Infer a project from a sample: rows x columns in, ``Profile`` out; ``ProfileError`` on user mistakes.

    ``task`` is ``classification`` (a binary 0/1 or true/false label) or ``regression``
    (a numeric label); without it, a 0/1 label is classification and another numeric one
    regression. Every column not named as label, id, time or excluded is a feature: numeric
    dtypes are numeric, text, bool and category are categorical.
    """
    _check_name(project)
    if frame.empty:
        raise ProfileError("the sample has no rows: profile from a file with some data in it")
    columns = [str(c) for c in frame.columns]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise ProfileError(f"the sample names column(s) {', '.join(map(repr, repeated))} more than once; columns need distinct names")
    frame = frame.set_axis(columns, axis=1)
    exclude = list(dict.fromkeys([exclude] if isinstance(exclude, str) else exclude))
    if label not in columns:
        raise ProfileError(f"label column {label!r} is not in the sample; its columns are: {', '.join(columns)}")
    for option, names in (("--time", [time_column]), ("--id", [id_column]), ("--exclude", exclude)):
        missing = [n for n in names if n is not None and n not in columns]
        if missing:
            raise ProfileError(f"{option} names {', '.join(map(repr, missing))}, not in the sample; its columns are: {', '.join(columns)}")
    roles = [("label", label), ("--time", time_column), ("--id", id_column), *(("--exclude", n) for n in exclude)]
    seen: dict[str, str] = {}
    for role, name in roles:
        if name is None:
            continue
        if name in seen:
            raise ProfileError(f"column {name!r} is given as both {seen[name]} and {role}; a column has one role")
        seen[name] = role
    if ROW_ID in columns and seen.get(ROW_ID) not in ("--id", "--exclude"):
        raise ProfileError(
            f"column {ROW_ID!r} is the name Flywheel gives the row id it derives when there is no --id: "
            f"pass --id {ROW_ID} if it identifies rows, or --exclude it"
        )

    expectations: list[Record] = [
        _expect(
            "expect_table_columns_to_match_set",
            {"column_set": columns, "exact_match": True},
            "A batch carries exactly the sample's columns (id, time, features, label and the excluded ones): "
            "a missing one breaks training, an extra one means the upstream export changed.",
        ),
        _expect(
            "expect_table_row_count_to_be_between",
            {"min_value": 1, "max_value": None},
            "A batch may be small (a quiet hour, a backfill of a few rows), so any size passes except none: "
            "an empty file is a failed export.",
        ),
    ]
    summary = [f"sample: {len(frame):,} rows x {len(columns)} columns"]

    task, label_lines, label_expectations, gate = _label(frame[label], label, task)
    summary += label_lines
    expectations += label_expectations

    dataset: Record = {}
    if id_column is not None:
        lines, exps = _id(frame[id_column], id_column)
        dataset["id_column"] = id_column
        summary += lines
        expectations += exps
    else:
        summary.append("id: none given; each row is identified by a hash of its values")
    if time_column is not None:
        lines, exps = _time(frame[time_column], time_column)
        dataset["time_column"] = time_column
        summary += lines
        expectations += exps
    else:
        summary.append("time: none given; train/val/test are cut by a seeded hash of each row, not by time")

    features = []
    for name in columns:
        if name in seen and seen[name] != "--exclude":
            continue
        if name in exclude:
            summary.append(f"excluded {name}: not a feature, no checks; still expected in every batch (the column set)")
            continue
        kind, lines, exps = _feature(frame[name], name)
        features.append({"name": name, "type": kind})
        summary += lines
        expectations += exps
    if not features:
        raise ProfileError(
            f"no feature is left: every column of the sample is the label, id, time or excluded ({', '.join(columns)})"
        )

    dataset["label"] = {"column": label, "task": task}
    dataset["features"] = features
    params = {
        "kind": "tabular",
        "dataset": dataset,
        "split": dict(SPLIT),
        "model": {**MODEL, "hidden_sizes": list(MODEL["hidden_sizes"])},
        "train": dict(TRAIN),
        "gate": gate,
    }
    return Profile(params=params, suite={"name": project, "expectations": expectations}, summary=summary)


def read_sample(path: Path) -> pd.DataFrame:
    """The sample at ``path`` (``.csv``, optionally compressed, or ``.parquet``), read as ingestion reads a batch.

    ``ProfileError`` names the file when it is missing, of another kind, unreadable or has no rows.
    """
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise ProfileError(f"{path}: no such file (expected a .csv or .parquet sample)")
    try:
        if name.endswith(PARQUET_SUFFIXES) or re.search(r"\.csv(\.(gz|bz2|zip|xz|zst))?$", name):
            frame = read_batch_file(path)
        else:
            raise ProfileError(f"{path}: expected a .csv or .parquet sample")
    except ProfileError:
        raise
    except pd.errors.EmptyDataError:
        raise ProfileError(f"{path}: the file is empty (expected a header line and rows)") from None
    except Exception as exc:  # any reader failure is the file's fault, said with its name
        raise ProfileError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if frame.empty:
        raise ProfileError(f"{path}: has columns ({', '.join(map(str, frame.columns))}) but no rows")
    return frame


def init_project(
    home: Path,
    project: str,
    sample: Path,
    label: str,
    task: str | None = None,
    time_column: str | None = None,
    id_column: str | None = None,
    exclude: Sequence[str] = (),
    force: bool = False,
) -> tuple[Path, Profile]:
    """Profile ``sample`` and write ``<home>/projects/<project>/{params.yaml,expectations.json}``.

    Returns the project folder and the profile. Each file is written beside its final name and
    renamed (the suite first, params.yaml last, so a project only looks initialised when both
    exist). ``ProfileError``, before anything is written: a bad project name, a missing home,
    an existing params.yaml without ``force``, or any refusal of ``read_sample``/``profile``.
    """
    import yaml

    _check_name(project)
    home = Path(home)
    if not home.is_dir():
        raise ProfileError(f"{home}: the deployment home does not exist (set FLYWHEEL_HOME or create it)")
    folder = home / "projects" / project
    params_path, suite_path = folder / PARAMS_FILE, folder / SUITE_FILE
    if params_path.exists() and not force:
        raise ProfileError(f"{params_path} exists: project {project!r} is already set up; pass --force to profile it again")
    sample = Path(sample)
    result = profile(read_sample(sample), project, label, task, time_column, id_column, exclude)

    header = (
        f"# Flywheel project {project}, profiled by `flywheel init` from {sample.resolve()}.\n"
        f"# Edit freely: roles, feature types, training and the gate are yours to change; the\n"
        f"# Great Expectations suite beside it ({SUITE_FILE}) checks every batch before ingestion.\n"
    )
    body = yaml.safe_dump(result.params, sort_keys=False, default_flow_style=None, width=120)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(suite_path, json.dumps(result.suite, indent=2) + "\n")
    _write_atomically(params_path, header + body)
    return folder, result


# -- the label ----------------------------------------------------------------------------------


def _label(column: pd.Series, name: str, task: str | None) -> tuple[str, list[str], list[Record], Record]:
    """The task, summary lines, expectations and gate for the label column."""
    if task not in (None, CLASSIFICATION, REGRESSION):
        raise ProfileError(f"--task {task!r}: expected {CLASSIFICATION} (a binary 0/1 label) or {REGRESSION} (a numeric label)")
    nulls = float(column.isna().mean())
    values = column.dropna()
    if values.empty:
        raise ProfileError(f"label column {name!r} is blank in every row of the sample")
    if nulls > LABEL_NULLS_MAX:
        raise ProfileError(
            f"label column {name!r} is blank in {nulls:.1%} of the sample's rows (at most {LABEL_NULLS_MAX:.0%} allowed): "
            "drop unlabelled rows from the sample, or choose another label"
        )
    distinct = values.unique()
    if len(distinct) == 1:
        raise ProfileError(f"label column {name!r} holds one value ({_show(distinct)}) in every row: nothing to learn")
    boolean = types.is_bool_dtype(values) or all(isinstance(v, bool) for v in distinct)
    numeric = not boolean and types.is_numeric_dtype(values)
    binary = boolean or (numeric and set(distinct.tolist()) <= {0, 1})
    if task is None:
        if binary:
            task = CLASSIFICATION
        elif numeric:
            task = REGRESSION
        else:
            two = len(distinct) == 2
            raise ProfileError(
                f"label column {name!r} holds text (e.g. {_show(distinct)}), which neither task takes: {CLASSIFICATION} "
                f"here means a binary 0/1 (or true/false) label and {REGRESSION} a numeric one; "
                + (f"recode it as 0/1 in the sample and the batches (e.g. {_show(distinct[:1])} -> 1)" if two else "recode it first")
            )
        how = "inferred"
    else:
        how = "given"
    if task == CLASSIFICATION and not binary:
        raise ProfileError(
            f"label column {name!r} holds {len(distinct)} distinct values (e.g. {_show(distinct)}); "
            f"{CLASSIFICATION} here means a binary 0/1 (or true/false) label: recode it, or use --task {REGRESSION}"
        )
    if task == REGRESSION and not numeric:
        raise ProfileError(
            f"label column {name!r} is not numeric (dtype {column.dtype}, e.g. {_show(distinct)}); "
            f"{REGRESSION} needs a numeric label"
        )

    blank_note = (
        f"; {int(column.isna().sum()):,} rows ({nulls:.1%}) of the sample have no label: drop them upstream, "
        "the suite rejects a batch with an unlabelled row"
        if nulls
        else ""
    )
    expectations = [
        _expect(
            "expect_column_values_to_not_be_null",
            {"column": name, "mostly": 1.0},
            f"{name} is the label: a row without one cannot be trained on or scored.",
        )
    ]
    if task == CLASSIFICATION:
        positive = float(values.astype(float).mean())
        lines = [
            f"label {name}: {CLASSIFICATION} ({how}; binary, {positive:.1%} of the labelled rows are 1){blank_note}",
            (
                f"gate: roc_auc, at least {CLASSIFICATION_GATE['min_improvement']:g} over the model in service, "
                f"floor {CLASSIFICATION_GATE['floor']:g}"
            ),
        ]
        expectations.append(
            _expect(
                "expect_column_values_to_be_in_set",
                {"column": name, "value_set": [0, 1]},
                f"{name} is a binary label; any value other than 0/1 would corrupt training.",
            )
        )
        return task, lines, expectations, dict(CLASSIFICATION_GATE)

    std = float(values.astype(float).std())
    floor = _significant(RMSE_FLOOR_SHARE * std, 3)
    low, high = _bounds(values)
    lines = [
        f"label {name}: {REGRESSION} ({how}; {_range_text(values)}, mean {values.mean():.4g}, std {std:.4g}){blank_note}",
        (
            f"gate: rmse must not rise over the model in service, floor {floor:g} = {RMSE_FLOOR_SHARE:g} x the label's "
            "std (a model that predicts the mean scores about the std and fails)"
        ),
    ]
    expectations += _numeric_checks(column, name, low, high, "label")
    return task, lines, expectations, {"metric": "rmse", "min_improvement": 0.0, "floor": floor}


# -- id and time ----------------------------------------------------------------------------------


def _id(column: pd.Series, name: str) -> tuple[list[str], list[Record]]:
    blanks = int(column.isna().sum())
    if blanks:
        raise ProfileError(f"--id column {name!r} is blank in {blanks:,} rows of the sample; an id must be on every row")
    repeats = column[column.duplicated(keep=False)]
    if not repeats.empty:
        raise ProfileError(
            f"--id column {name!r} is not unique in the sample: {repeats.nunique():,} values repeat "
            f"(e.g. {_show(repeats.unique())}); an id must name one row"
        )
    expectations = []
    if types.is_integer_dtype(column):
        expectations.append(
            _expect(
                "expect_column_values_to_be_of_type",
                {"column": name, "type_": "int64"},
                f"{name} is a whole-number id; a batch where it reads as float64 or text (a blank, a stray string) "
                "would not match the ids already ingested.",
            )
        )
    expectations += [
        _expect(
            "expect_column_values_to_not_be_null",
            {"column": name, "mostly": 1.0},
            f"{name} is the row id ingestion de-duplicates on; a row without one cannot be kept.",
        ),
        _expect(
            "expect_column_values_to_be_unique",
            {"column": name},
            f"{name} names one row; a repeated id within a batch is an upstream export bug.",
        ),
    ]
    return [f"id {name}: unique in all {len(column):,} rows ({column.dtype}); re-sent rows replace older copies"], expectations


def _time(column: pd.Series, name: str) -> tuple[list[str], list[Record]]:
    blanks = int(column.isna().sum())
    if blanks:
        raise ProfileError(f"--time column {name!r} is blank in {blanks:,} rows of the sample; the time split needs a time on every row")
    if types.is_numeric_dtype(column) or types.is_bool_dtype(column):
        raise ProfileError(
            f"--time column {name!r} holds numbers (e.g. {_show(column.unique())}), not dates: "
            "expected date/time text such as 2013-01-01T10:00:00Z"
        )
    text = _as_csv_text(column)
    distinct = pd.Series(text.unique())
    parsed = parse_times(distinct)
    bad = distinct[parsed.isna()]
    if not bad.empty:
        raise ProfileError(
            f"--time column {name!r} does not parse as dates/times in {int(text.isin(set(bad)).sum()):,} rows "
            f"(e.g. {_show(bad)}); expected date/time text such as 2013-01-01T10:00:00Z"
        )
    iso = distinct.str.fullmatch(ISO_8601).all()
    fmt = None if iso else _strftime_format(distinct.tolist())
    expectations = [
        _expect(
            "expect_column_values_to_not_be_null",
            {"column": name, "mostly": 1.0},
            f"{name} orders the rows for the time split; a row without it would fall out of every split.",
        )
    ]
    if iso:
        expectations.append(
            _expect(
                "expect_column_values_to_match_regex",
                {"column": name, "regex": ISO_8601},
                f"Every {name} in the sample is ISO 8601, which ingestion parses in any of its forms (Z, fractions, "
                "offsets, T or a space): a batch in another format means the export changed.",
            )
        )
        how = "ISO 8601"
    elif fmt:
        expectations.append(
            _expect(
                "expect_column_values_to_match_strftime_format",
                {"column": name, "strftime_format": fmt},
                f"Every {name} in the sample has the format {fmt}; another format means the export changed, "
                "and the time split would parse or order it wrongly.",
            )
        )
        how = f"format {fmt}"
    else:
        expectations.append(
            _expect(
                "expect_column_values_to_be_dateutil_parseable",
                {"column": name},
                f"{name} mixes date formats in the sample, so only parseability is checked: a value that is not a "
                "date at all would fall out of the time split.",
            )
        )
        how = "mixed formats, checked as parseable only"
    return [f"time {name}: {parsed.min()} .. {parsed.max()} ({how}); train/val/test are cut by time"], expectations


def _strftime_format(values: list[str]) -> str | None:
    """The first of ``TIME_FORMATS`` that every value fits, as GE's check parses (``datetime.strptime``)."""

    def fits(fmt: str, sample: list[str]) -> bool:
        try:
            for value in sample:
                datetime.strptime(value, fmt)  # only the format is checked
        except (TypeError, ValueError):
            return False
        return True

    head = values[:200]
    return next((f for f in TIME_FORMATS if fits(f, head) and fits(f, values)), None)


def _as_csv_text(column: pd.Series) -> pd.Series:
    """The column's values as a CSV batch would carry them (a parquet timestamp becomes its CSV text)."""
    if types.is_object_dtype(column) and all(isinstance(v, str) for v in column.dropna()):
        return column
    rendered = column.to_frame().to_csv(index=False)
    return pd.read_csv(io.StringIO(rendered), dtype=str, keep_default_na=False).iloc[:, 0]


# -- features --------------------------------------------------------------------------------------


def _feature(column: pd.Series, name: str) -> tuple[str, list[str], list[Record]]:
    """The feature's type, its summary line and its expectations."""
    nulls = float(column.isna().mean())
    values = column.dropna()
    if values.empty:
        raise ProfileError(f"column {name!r} is blank in every row of the sample: --exclude it, or profile a fuller sample")
    if types.is_datetime64_any_dtype(column) or types.is_timedelta64_dtype(column):
        raise ProfileError(f"column {name!r} holds timestamps ({column.dtype}): pass it as --time, or --exclude it")
    distinct = values.unique()
    if len(distinct) == 1:
        raise ProfileError(
            f"column {name!r} holds one value ({_show(distinct)}) in every row of the sample: it cannot teach the model "
            "anything, and a batch with another value would be rejected; --exclude it, or profile a wider sample"
        )
    null_check = _not_null(name, nulls)
    numeric = types.is_numeric_dtype(column) and not types.is_bool_dtype(column)
    if numeric:
        low, high = _bounds(values)
        whole = types.is_integer_dtype(values) or bool((values == values.round()).all())
        codes = (
            f"; {len(distinct)} distinct whole values, kept numeric (make it categorical in params.yaml if they are codes)"
            if whole and len(distinct) <= FEW_VALUES
            else ""
        )
        if whole and len(distinct) == len(values) > FEW_VALUES:
            codes = "; every value is a distinct whole number: if it is a row id, pass it as --id (later ids fall outside this range)"
        line = (
            f"feature {name}: numeric ({column.dtype}), {_range_text(values)}, nulls {nulls:.1%}"
            f" -> expected within [{low:g}, {high:g}]{codes}"
        )
        return "numeric", [line], [null_check, *_numeric_checks(column, name, low, high, "feature")]

    shown = sorted(distinct.tolist(), key=str)
    if len(distinct) > MAX_LISTED_VALUES or (len(distinct) > FEW_VALUES and len(distinct) > len(values) / 2):
        line = (
            f"feature {name}: categorical ({column.dtype}), {len(distinct):,} distinct values in {len(values):,} rows, "
            f"nulls {nulls:.1%} -> too many to list, so no value-set check (is it an id or free text? --exclude it if so)"
        )
        return "categorical", [line], [null_check]
    few = len(distinct) <= FEW_VALUES
    mostly = FEW_VALUES_MOSTLY if few else MANY_VALUES_MOSTLY
    why = (
        f"{name} took {len(distinct)} values in the sample, a closed set. mostly={FEW_VALUES_MOSTLY} so that a rare value "
        "the sample happened to miss passes (1 row in 1,000), while typos or a new code list in more rows are reviewed."
        if few
        else f"{name} took {len(distinct)} values in the sample. mostly={MANY_VALUES_MOSTLY} so that a few new values "
        "(a new route, a new product) pass, while a flood of unknown ones (a shifted column, a renamed code list) fails."
    )
    listing = ", ".join(map(str, shown[:8])) + (", ..." if len(shown) > 8 else "")
    line = (
        f"feature {name}: categorical ({column.dtype}), {len(distinct)} values ({listing}), nulls {nulls:.1%}"
        f" -> expected in that set (mostly {mostly})"
    )
    in_set = _expect("expect_column_values_to_be_in_set", {"column": name, "value_set": shown, "mostly": mostly}, why)
    return "categorical", [line], [null_check, in_set]


def _numeric_checks(column: pd.Series, name: str, low: float, high: float, role: str) -> list[Record]:
    """A type check (int64 only where the sample had whole numbers and no blank) and the range check."""
    if types.is_integer_dtype(column) and not column.isna().any():
        typed = _expect(
            "expect_column_values_to_be_of_type",
            {"column": name, "type_": "int64"},
            f"{name} was whole numbers without blanks in the sample; a batch where it reads as float64 or text "
            "(a stray decimal, a blank, a string) would be silently cast downstream.",
        )
    else:
        typed = _expect(
            "expect_column_values_to_be_in_type_list",
            {"column": name, "type_list": ["float64", "int64"]},
            f"{name} is numeric (a batch without decimals or blanks reads as int64); a column read as text means "
            "a stray string or shifted columns.",
        )
    share = f"{RANGE_MARGIN:.0%}"
    bound = "; never below 0, since the sample never was" if low == 0 else ""
    ranged = _expect(
        "expect_column_values_to_be_between",
        {"column": name, "min_value": low, "max_value": high, "mostly": RANGE_MOSTLY},
        f"The sample's range of the {role} {name}, widened by {share} of it on each side{bound}: ordinary "
        f"variation passes, and so does a rare outlier (at most {1 - RANGE_MOSTLY:.1%} of the rows); a shifted range does not.",
    )
    hard_low, hard_high = _bounds(column.dropna(), HARD_MARGIN)
    hard = _expect(
        "expect_column_values_to_be_between",
        {"column": name, "min_value": hard_low, "max_value": hard_high},
        f"No value of the {role} {name} may lie beyond the sample's range widened by {HARD_MARGIN:g}x its width: "
        "a unit error or a value off by orders of magnitude fails the batch even in one row.",
    )
    return [typed, ranged, hard]


def _not_null(name: str, nulls: float) -> Record:
    """Blanks allowed in a batch: none if the sample had none, else max(2p, p + 0.05), capped below all."""
    if nulls == 0:
        return _expect(
            "expect_column_values_to_not_be_null",
            {"column": name, "mostly": 1.0},
            f"{name} was never blank in the sample; a blank means the upstream join or export lost data.",
        )
    allowed = min(max(2 * nulls, nulls + NULLS_SLACK), (1 + nulls) / 2)
    mostly = max(math.floor((1 - allowed) * 1000) / 1000, 0.001)
    return _expect(
        "expect_column_values_to_not_be_null",
        {"column": name, "mostly": mostly},
        f"{name} was blank in {nulls:.1%} of the sample; a batch may be blank in up to max(2x, +5 points) of that "
        f"(mostly {mostly:g}), but not wholesale: a column that went blank means the export lost it.",
    )


# -- helpers ---------------------------------------------------------------------------------------


def _bounds(values: pd.Series, share: float = RANGE_MARGIN) -> tuple[float, float]:
    """The non-null values' range widened by ``share`` of it on each side, not crossing 0
    where the sample did not; whole numbers for an integer column, else rounded outward."""
    lo, hi = float(values.min()), float(values.max())
    margin = share * (hi - lo)
    low, high = lo - margin, hi + margin
    if lo >= 0:
        low = max(low, 0.0)
    if hi <= 0:
        high = min(high, 0.0)
    if types.is_integer_dtype(values):
        return math.floor(low), math.ceil(high)
    exponent = math.floor(math.log10(high - low)) - 3  # four significant digits of the span
    step, digits = 10.0**exponent, max(0, -exponent)
    return round(math.floor(low / step) * step, digits), round(math.ceil(high / step) * step, digits)


def _range_text(values: pd.Series) -> str:
    return f"{values.min():g} .. {values.max():g}"


def _significant(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def _show(values: Iterable[object]) -> str:
    """A few values for a message, as Python literals."""
    values = list(values)
    shown = ", ".join(repr(_native(v)) for v in values[:SAMPLE_SHOWN])
    return shown + (", ..." if len(values) > SAMPLE_SHOWN else "")


def _native(value: object) -> object:
    return value.item() if hasattr(value, "item") else value


def _expect(kind: str, kwargs: Record, notes: str) -> Record:
    clean = {k: ([_native(v) for v in value] if isinstance(value, list) else _native(value)) for k, value in kwargs.items()}
    return {"type": kind, "kwargs": clean, "notes": notes}


def _check_name(project: str) -> None:
    if not isinstance(project, str) or not re.fullmatch(PROJECT_NAME, project):
        raise ProfileError(
            f"project name {project!r}: expected lowercase letters, digits and underscores, starting with a letter"
        )


def _write_atomically(path: Path, text: str) -> None:
    """Write beside ``path`` and rename: a reader sees the old file or the new one, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
