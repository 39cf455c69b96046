"""Nightly ingestion of the batches in ``landing/``.

Each ``*.csv`` or ``*.parquet`` batch (``*.partial`` files are still being written and are left
alone) is read and validated against the dataset's expectation suite, then typed as the later
steps read it (``pipelines.data.schema``):

* a passing batch joins the raw dataset as its own parquet part, typed (``pipelines.data.raw``:
  a re-sent row replaces the older copy, found by reading only the ids of history), then is moved
  to the archive;
* a failing, unreadable or unparseable batch is moved into its own folder in quarantine, with the
  validation result and its Data Docs page. Nothing is deleted;
* while a version is served, a passing batch is first scored by it (``pipelines.data.label_check``):
  one on whose labels it keeps implausibly little of its test skill (shuffled, shifted or
  mis-joined labels) is held for review in its own quarantine folder with the evidence
  (``label_check.json``) instead of joining the raw data, until a run confirms it by name.

The batch's part is written (and older copies of its rows removed) before the batch leaves
landing, so a crash at any point leaves the batch in landing and the next run redoes it under the
same name without duplicating rows.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pipelines.artifacts import DOCS_FILE, LABEL_CHECK_FILE, RESULT_FILE
from pipelines.config import BATCH, ROW_ID, DatasetConfig, MetricsConfig, ProjectConfig
from pipelines.data import label_check, raw
from pipelines.data.batches import LOCK_WAIT_S, data_lock, held_batches, reverted_sources
from pipelines.data.batches import record as record_batch
from pipelines.data.schema import read_batch_file, typed
from pipelines.data.validation import BatchValidator, Outcome
from pipelines.errors import NotRetryable
from pipelines.lineage import Record, write_json
from pipelines.metrics import Sample, emit
from pipelines.serving.repository import served_version

log = logging.getLogger(__name__)
BATCH_SUFFIXES = (".csv", ".parquet")


class BatchValidationError(NotRetryable):
    """One or more batches failed validation and were quarantined; ``summary`` says what happened to each."""

    def __init__(self, message: str, summary: Record) -> None:
        super().__init__(message)
        self.summary = summary


def free_name(directory: Path, name: str) -> Path:
    """``directory/name``, or if taken the first free of ``<stem>.2<suffix>``, ``<stem>.3<suffix>``, ..."""
    target, copy = directory / name, 2
    while target.exists():
        target, copy = directory / f"{Path(name).stem}.{copy}{Path(name).suffix}", copy + 1
    return target


def move_into(path: Path, directory: Path) -> Path:
    """Move a file into a directory without overwriting: a second ``x.csv`` becomes ``x.2.csv``."""
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(path, free_name(directory, path.name)))


def quarantine_folder(root: Path, batch: Path) -> Path:
    """The batch's own folder: the first of ``<stem>``, ``<stem>.2``, ... that holds no batch file
    yet (a folder left half-made by a crash, reports without the batch, is completed, not abandoned)."""
    folder, copy = root / batch.stem, 2
    # Taken: it holds this batch, or another batch of the same stem (x.csv beside x.parquet).
    while folder.is_dir() and any(p.suffix.lower() in BATCH_SUFFIXES for p in folder.iterdir()):
        folder, copy = root / f"{batch.stem}.{copy}", copy + 1
    return folder


def append_to_raw(dataset: DatasetConfig, batch: pd.DataFrame, name: str) -> int:
    """Add a typed batch (``schema.typed``) to the raw dataset as the part of its archived file
    ``name``, each row marked with it (newer copies of an id win: ``raw.append``); returns the
    raw dataset's row count."""
    rows = batch[dataset.columns]
    if dataset.id_column is None:
        rows = rows.assign(**{ROW_ID: raw.row_ids(rows)})
    return raw.append(dataset, rows.assign(**{BATCH: name}), name)


def land_file(dataset: DatasetConfig, source: Path) -> Path:
    """Copy a CSV or parquet batch into the dataset's landing folder under its own name,
    atomically: written as ``<name>.partial`` (never read), then renamed, so ingestion never reads
    half a batch. ``FileNotFoundError`` / ``ValueError`` for a missing ``source`` or another kind of file."""
    if not source.is_file():
        raise FileNotFoundError(f"project {dataset.name}: {source}: no such file")
    suffix = source.suffix.lower()
    if suffix not in BATCH_SUFFIXES:
        raise ValueError(
            f"project {dataset.name}: {source}: batches land as CSV files with a header row or as parquet files, "
            f"got a {suffix or 'suffix-less'} file"
        )
    landing = dataset.landing_dir
    landing.mkdir(parents=True, exist_ok=True)
    target = landing / f"{source.stem}{suffix}"
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    partial.replace(target)
    return target


def read_batch(path: Path, columns: list[str]) -> pd.DataFrame | str:
    """The batch as a frame (``schema.read_batch_file``), or the reason it cannot be read
    (naming the ``columns`` expected)."""
    try:
        return read_batch_file(path)
    except ValueError as exc:  # pandas' and pyarrow's parse errors, a repeated column, bytes that are not UTF-8
        kind = "parquet file" if path.suffix.lower() == ".parquet" else "CSV"
        reason = f"{type(exc).__name__}: {str(exc).strip()}"
        return f"not a readable {kind} ({reason}); expected a CSV with a header row, or a parquet file, with at least the columns {columns}"


def quarantine(dataset: DatasetConfig, batch: Path, result: Record, docs_page: Path | None) -> Path:
    """Move ``batch`` into its own folder of the quarantine with its validation ``result`` (and
    Data Docs page); returns the folder. Reports first, then the batch: a crash in between leaves
    the batch in landing, to be redone."""
    folder = quarantine_folder(dataset.quarantine_dir, batch)
    write_json(folder / RESULT_FILE, result)
    if docs_page is not None:
        shutil.copyfile(docs_page, folder / DOCS_FILE)
    move_into(batch, folder)
    return folder


def hold(dataset: DatasetConfig, batch: Path, evidence: Record) -> Path:
    """Move ``batch`` into its own folder of the quarantine with the label check's ``evidence``
    (``label_check.json``); returns the folder. The evidence first, then the batch, as ``quarantine``."""
    folder = quarantine_folder(dataset.quarantine_dir, batch)
    write_json(folder / LABEL_CHECK_FILE, evidence)
    move_into(batch, folder)
    return folder


def return_confirmed(config: ProjectConfig, confirmed: Sequence[str]) -> dict[str, str]:
    """Move the held batches that ``confirmed`` names (as they landed) from their quarantine
    folders back into landing, each confirmation recorded in the ledger; returns the landed name
    of each (``x.2.csv`` where landing holds another ``x.csv``) -> the name confirmed. A batch an
    earlier run already moved back is found in landing. ``NotRetryable`` naming the held batches,
    before anything moves, for a name that is neither held nor in landing, or whose file left its
    folder. Call it holding the data lock."""
    landing, held = config.dataset.landing_dir, held_batches(config)
    unknown = [name for name in confirmed if name not in held and not (landing / name).is_file()]
    if unknown:
        raise NotRetryable(f"project {config.name}: confirmed batches {unknown} are not held for review; the batches held are {sorted(held) or 'none'}")
    returned: dict[str, str] = {}
    for name in dict.fromkeys(confirmed):
        folder = config.path(Path(held[name]["quarantine"])) if name in held else None
        if folder is not None and (folder / name).is_file():
            landing.mkdir(parents=True, exist_ok=True)
            landed = Path(shutil.move(folder / name, free_name(landing, name)))
        elif (landing / name).is_file():
            landed = landing / name  # moved back by an earlier run that stopped before ingesting it
        else:
            raise NotRetryable(f"project {config.name}: held batch {name} is no longer in its quarantine folder {folder}, nor in {landing}")
        if name in held:
            record_batch(config, "confirmed", batch=name, quarantine=held[name]["quarantine"], landed_as=landed.name)
        returned[landed.name] = name
        log.warning("%s: held by the label check, confirmed: ingested without it as %s", name, landed.name)
    return returned


def ingest_landing(config: ProjectConfig, confirmed: Sequence[str] = ()) -> Record:
    """Validate every complete batch in landing; returns the batches seen, passed, quarantined
    and held (by the label check), the rows of each, each batch's label check in a line
    (``label_checks``) and the raw dataset's rows. Raises ``BatchValidationError`` after handling
    all of them if any failed or was held (the passing ones are ingested all the same);
    ``SuiteError`` for a broken suite, before any batch moves.

    ``confirmed``: names (as they landed) of batches held before whose labels a person has
    checked: they are moved back from quarantine into landing first (``return_confirmed``), then
    validated as any batch and ingested without the label check."""
    dataset = config.dataset
    landing = dataset.landing_dir
    returned: dict[str, str] = {}
    if confirmed:
        with data_lock(config.data_dir, f"confirmation of {list(confirmed)}", LOCK_WAIT_S):
            returned = return_confirmed(config, confirmed)
    batches = sorted(p for p in landing.iterdir() if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES) if landing.is_dir() else []
    summary: Record = {
        "batches": [b.name for b in batches], "passed": [], "quarantined": [], "held": [], "confirmed": sorted(returned),
        "rows_ingested": 0, "rows_quarantined": 0, "rows_held": 0, "label_checks": {},
    }
    if not batches:
        log.info("No new batches in %s", landing)
        return {**summary, "raw_rows": raw.rows(dataset)}

    # One writer of the raw data at a time: a revert (pipelines.data.batches) waits for this.
    with data_lock(config.data_dir, f"ingestion of {[b.name for b in batches]}", LOCK_WAIT_S):
        raw.migrate_legacy(dataset)
        validator = BatchValidator(dataset, config.home, config.data)  # a broken suite stops here, before any batch moves
        reverted = reverted_sources(config)  # the ledger alone: no read of the raw data
        served = served_version(config.model_dir)
        champion = config.model_dir / str(served) if served is not None else None
        problems: list[str] = []
        held: list[str] = []
        for batch in batches:
            frame = read_batch(batch, dataset.columns)
            if isinstance(frame, str):
                record = {
                    "success": False,
                    "batch": batch.name,
                    "error": frame,
                    "expected_columns": dataset.columns,
                    "checked_at": datetime.now(timezone.utc).isoformat(),
                }
                outcome, rows = Outcome(False, record, [frame]), 0
            else:
                outcome, rows = validator.validate(frame, batch.stem), len(frame)
                missing = [c for c in dataset.columns if c not in frame.columns]
                if missing:
                    outcome.failures.insert(0, f"missing required columns {missing}; expected {dataset.columns}")
                # Typed as the later steps read it: a value that does not parse refuses the batch here.
                frame, unparsed = typed(frame, dataset)
                if unparsed:
                    result = {**outcome.result, "success": False, "unparsed_columns": unparsed}
                    outcome = Outcome(False, result, [*unparsed, *outcome.failures], outcome.docs_page)

            if outcome.success and not isinstance(frame, str):
                if batch.name in returned:
                    evidence: Record = {"status": label_check.CONFIRMED, "reason": f"{returned[batch.name]} was held by it, then confirmed"}
                else:
                    evidence = label_check.check(dataset, config.performance, champion, frame)
                summary["label_checks"][batch.name] = label_check.describe(evidence)
                if evidence["status"] == label_check.HELD:
                    folder = hold(dataset, batch, {"batch": batch.name, **evidence})
                    record_batch(config, "held", batch=batch.name, rows=rows, quarantine=config.portable(folder), label_check=evidence)
                    summary["held"].append(batch.name)
                    summary["rows_held"] += rows
                    held.append(f"- {batch.name} -> {folder} ({LABEL_CHECK_FILE})\n    {label_check.describe(evidence)}")
                    log.error("%s passed validation but is held for review: %s", batch.name, label_check.describe(evidence))
                    continue
                archived = free_name(dataset.archive_dir, batch.name)  # the batch's name in the raw data and the ledger
                total = append_to_raw(dataset, frame, archived.name)
                move_into(batch, dataset.archive_dir)  # to `archived`: the data lock keeps other writers out
                record_batch(config, "ingested", batch=archived.name, source=batch.name, rows=rows, label_check=evidence)
                if batch.name in reverted:
                    log.warning("%s was reverted before (%s); it is ingested again as %s", batch.name, reverted[batch.name], archived.name)
                summary["passed"].append(batch.name)
                summary["rows_ingested"] += rows
                log.info("%s: %d rows passed validation; raw dataset now has %d rows", batch.name, rows, total)
                continue

            folder = quarantine(dataset, batch, outcome.result, outcome.docs_page)
            summary["quarantined"].append(batch.name)
            summary["rows_quarantined"] += rows
            lines = "\n".join(f"    {line}" for line in outcome.failures)
            problems.append(f"- {batch.name} -> {folder} ({RESULT_FILE}, {DOCS_FILE if outcome.docs_page else 'no Data Docs'})\n{lines}")
            log.error("%s failed validation, moved to %s:\n%s", batch.name, folder, lines)

    summary["raw_rows"] = raw.rows(dataset)
    report(config.metrics, config.identity, summary)  # before raising, so a quarantine reaches Prometheus
    if problems or held:
        parts = []
        if problems:
            parts.append(
                f"{len(problems)} of {len(batches)} landing batch(es) failed validation against "
                f"{dataset.expectation_suite} and were moved to quarantine:\n" + "\n".join(problems)
            )
        if held:
            parts.append(
                f"{len(held)} of {len(batches)} landing batch(es) passed validation but were held for review: the served "
                "model keeps implausibly little of its test skill on their labels (shuffled, shifted or mis-joined labels?):\n"
                + "\n".join(held)
                + f"\nIf their labels are right, ingest them without the check: trigger retrain__{config.name} with the Param "
                f"confirm_batches {json.dumps(summary['held'])}"
            )
        message = "\n".join(parts)
        if summary["passed"]:
            message += f"\nBatches that passed were ingested: {summary['passed']}"
        raise BatchValidationError(message, summary)
    return summary


def report(metrics: MetricsConfig, identity: dict[str, str], summary: Record) -> None:
    """Rows and batches that passed or were quarantined in this run (``summary``, as
    ``ingest_landing`` returns it), for Prometheus, labelled with the project's ``identity``.
    Batches the label check held count as quarantined (they are, and the run fails the same way).
    Only a run that validated batches reports (like a drift check with a verdict): an empty
    landing leaves the previous verdict in place. A metrics outage is logged, never the run's failure."""
    samples = []
    for result, rows, batches in (
        ("passed", summary["rows_ingested"], summary["passed"]),
        ("quarantined", summary["rows_quarantined"] + summary["rows_held"], summary["quarantined"] + summary["held"]),
    ):
        samples.append(Sample("flywheel_validation_rows", "Rows of the latest ingestion run's batches, by validation result.", float(rows), {"result": result}))
        samples.append(Sample("flywheel_validation_batches", "Batches of the latest ingestion run, by validation result.", float(len(batches)), {"result": result}))
    try:
        emit(metrics, identity, "validate", samples)
    except Exception:  # the batches are already handled; the error raised next matters more
        log.exception("could not report the validation metrics of %s", summary["batches"])
