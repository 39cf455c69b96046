"""The batches of a tabular project's raw data: where each row came from, a ledger of what
happened to each batch, a lock on the raw data, and taking a batch back.

* Every raw row carries the batch it came from (``BATCH``: the batch's file name in the
  archive, unique even when a batch of the same name is sent twice).
* ``artifacts/<project>/batches.jsonl`` is the ledger: one line per event (``ingested``,
  ``versioned``: the data version that first holds it, ``reverted``: why, by whom, how many
  rows; ``held``: a batch the label check kept out of the raw data, with its evidence and
  quarantine folder; ``confirmed``: a held batch a person sent on). ``flywheel batches
  <project>`` reads it with the raw data.
* ``data_lock`` serialises what writes the raw data's parts or reads them as a whole (ingestion,
  the DVC split, a revert) across processes on one machine or a shared home: a revert that meets a
  running retrain waits, then refuses naming the holder.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from pipelines.config import ProjectConfig
from pipelines.errors import DataLocked, NotRetryable
from pipelines.lineage import Record, write_json
from pipelines.locks import Held, holding

LOCK_FILE = ".flywheel.lock"
LOCK_WAIT_S = 600  # how long a nightly step waits for the raw data; then DataLocked, and its retries
LEDGER_FILE = "batches.jsonl"
REVERTED_FILE = "reverted.json"


class UnknownBatch(NotRetryable, ValueError):
    """The batch named is not in the raw data."""


@contextlib.contextmanager
def data_lock(data_dir: Path, what: str, timeout: float) -> Iterator[None]:
    """Hold the raw data of the project whose DVC repository is ``data_dir`` while ``what`` runs;
    ``DataLocked`` after ``timeout`` seconds, naming the holder."""
    try:
        with holding(data_dir / LOCK_FILE, timeout, what=what):
            yield
    except Held as held:
        who = held.holder
        by = f"{who.get('what', 'another step')} (pid {who.get('pid', '?')} on {who.get('host', '?')}, since {who.get('since', '?')})"
        raise DataLocked(f"the raw data in {data_dir} is held by {by}; waited {timeout:g} s. Try again when it has finished") from None


def ledger_path(config: ProjectConfig) -> Path:
    return config.artifacts_dir / LEDGER_FILE


def record(config: ProjectConfig, event: str, **details: object) -> None:
    """Append an event to the project's batch ledger."""
    path = ledger_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps({"time": _now(), "event": event, **details}, default=str) + "\n")


def events(config: ProjectConfig) -> list[Record]:
    path = ledger_path(config)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _ledger(config: ProjectConfig) -> dict[str, Record]:
    """The batches as the ledger alone tells them (``list_batches`` without the raw data's counts)."""
    batches: dict[str, Record] = {}
    for event in events(config):
        if event["event"] == "ingested":
            batches[event["batch"]] = {
                "batch": event["batch"], "source": event.get("source"), "ingested_at": event["time"],
                "rows_ingested": event["rows"], "rows": 0, "data_version": None, "status": "in raw",
            }
        elif event["event"] == "versioned":
            for name in event["batches"]:
                if name in batches and batches[name]["data_version"] is None:
                    batches[name]["data_version"] = event["data_version"]
        elif event["event"] == "reverted" and event["batch"] in batches:
            batches[event["batch"]] |= {"status": "reverted", "reason": event["reason"], "reverted_at": event["time"]}
    return batches


def held_batches(config: ProjectConfig) -> dict[str, Record]:
    """The batches the label check holds for review and no one has confirmed yet, by the name
    they landed with: the ``held`` event of each (``quarantine``: its folder, relative to the
    home; ``rows``; ``label_check``: the evidence). From the ledger alone."""
    held: dict[str, Record] = {}
    for event in events(config):
        if event["event"] == "held":
            held[event["batch"]] = event
        elif event["event"] == "confirmed":
            held.pop(event["batch"], None)
    return held


def list_batches(config: ProjectConfig) -> list[Record]:
    """Every batch ingested, oldest first: ``batch`` (its archived file name), ``source`` (its
    name when it landed), ``ingested_at``, ``rows_ingested``, ``rows`` (in the raw data now),
    ``data_version`` (of the raw data that first held it; None until versioned) and ``status``:
    ``in raw``, ``replaced`` (a later batch re-sent every one of its rows) or ``reverted`` (with
    the reason and time). Then the batches held for review (``held_batches``), never in the raw
    data: ``batch`` and ``source`` their landed name, ``status`` ``held``, ``held_at`` and
    ``quarantine``."""
    from pipelines.data import raw

    batches = _ledger(config)
    counts = raw.batch_rows(config.dataset)  # each batch's part's footer: no rows read
    if batches and counts:
        for name, entry in batches.items():
            entry["rows"] = counts.get(name, 0)
            if entry["rows"] == 0 and entry["status"] == "in raw":
                entry["status"] = "replaced"
    held = [
        {
            "batch": name, "source": name, "held_at": event["time"], "rows_ingested": 0, "rows": 0,
            "data_version": None, "status": "held", "quarantine": event["quarantine"],
        }
        for name, event in held_batches(config).items()
    ]
    return [*batches.values(), *held]


def reverted_sources(config: ProjectConfig) -> dict[str, str]:
    """The landed names of the batches taken back, with the reason; from the ledger alone."""
    return {b["source"]: b["reason"] for b in _ledger(config).values() if b["status"] == "reverted"}


def unversioned(config: ProjectConfig) -> list[str]:
    """Batches ingested that no data version holds yet."""
    return [b["batch"] for b in list_batches(config) if b["data_version"] is None and b["status"] == "in raw"]


def revert(config: ProjectConfig, batch: str, reason: str, by: Record, timeout: float) -> Record:
    """Take ``batch`` back: its rows leave the raw data (a new data version, versioned and pushed
    by DVC), its archived file goes back to quarantine with ``reason``, and the ledger records who
    (``by``: a person or an Airflow run) and why. Returns the rows removed, the quarantine
    folder and the new data version.

    ``ValueError`` without a reason; ``UnknownBatch`` naming the batches there are;
    ``DataLocked`` when another step holds the raw data for more than ``timeout`` seconds.
    """
    from pipelines.data import raw
    from pipelines.data.ingest import move_into, quarantine_folder
    from pipelines.data.versioning import version_split

    if not reason.strip():
        raise ValueError("a revert needs a reason: it is recorded with the batch in quarantine and in the ledger")
    dataset = config.dataset
    with data_lock(config.data_dir, f"revert of {batch}", timeout):
        raw.migrate_legacy(dataset)
        removed = raw.remove(dataset, batch)  # the batch's part: its rows, and only its rows
        if not removed:
            listed = {b["batch"]: b for b in list_batches(config)}
            if batch in listed and listed[batch]["status"] != "in raw":
                why = f" ({listed[batch]['reason']})" if "reason" in listed[batch] else ""
                raise UnknownBatch(f"project {config.name}: batch {batch!r} has no rows left in the raw data: it was {listed[batch]['status']}{why}")
            known = sorted(name for name in raw.batch_rows(dataset) if name != raw.UNBATCHED)
            raise UnknownBatch(f"project {config.name}: batch {batch!r} has no rows in the raw data; its batches are {known}")
        # Recorded as soon as the rows are gone: the ledger never tells of rows the raw data lacks.
        record(config, "reverted", batch=batch, reason=reason, by=by, rows_removed=removed)
        archived = dataset.archive_dir / batch
        folder = quarantine_folder(dataset.quarantine_dir, archived)
        write_json(folder / REVERTED_FILE, {"batch": batch, "reason": reason, "by": by, "rows_removed": removed, "reverted_at": _now()})
        if archived.exists():
            move_into(archived, folder)
    versioned = version_split(config)
    return {"batch": batch, "rows_removed": removed, "quarantine": config.portable(folder), "data_version": versioned["data_version"]}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
