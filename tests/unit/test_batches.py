"""Batches of the raw data: each row names its batch, the ledger lists them, and a batch can be
taken back (rows out as a new data version, file back to quarantine with the reason), waiting
for or refusing against a step that holds the data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipelines.config import BATCH
from pipelines.data.batches import REVERTED_FILE, UnknownBatch, data_lock, list_batches, revert
from pipelines.data.ingest import ingest_landing
from pipelines.data.replay import land
from pipelines.data.versioning import version_split
from pipelines.errors import DataLocked
from tests.conftest import REPO

ROWS = 300
BY = {"user": "on-call", "via": "test"}


@pytest.fixture
def two_batches(project):
    """Real flights of February and March ingested and versioned; March re-sent with one row changed."""
    for month in ("2013-02", "2013-03"):
        land(project.dataset, month, rows=ROWS)
    ingest_landing(project)
    first = version_split(project)["data_version"]
    return project, first


def test_each_row_names_its_batch_and_the_ledger_lists_them_with_their_data_version(two_batches):
    project, version = two_batches
    raw = pd.read_parquet(project.dataset.raw_path)
    assert raw.groupby(BATCH)["month"].unique().map(list).to_dict() == {"2013-02.csv": [2], "2013-03.csv": [3]}

    # A re-sent March replaces the older copies: the rows now belong to the newer batch
    land(project.dataset, "2013-03", rows=ROWS)
    ingest_landing(project)
    later = version_split(project)["data_version"]

    listed = {b["batch"]: b for b in list_batches(project)}
    assert list(listed) == ["2013-02.csv", "2013-03.csv", "2013-03.2.csv"]
    assert [(listed[b]["rows_ingested"], listed[b]["rows"], listed[b]["status"]) for b in listed] == [
        (ROWS, ROWS, "in raw"), (ROWS, 0, "replaced"), (ROWS, ROWS, "in raw")
    ]
    assert listed["2013-03.2.csv"]["source"] == "2013-03.csv"
    assert listed["2013-02.csv"]["data_version"] == version and listed["2013-03.2.csv"]["data_version"] == later


def test_a_reverted_batch_leaves_the_raw_data_as_a_new_version_and_returns_to_quarantine(two_batches):
    project, before = two_batches

    result = revert(project, "2013-03.csv", "March labels were shifted by a day upstream", BY, timeout=5)

    raw = pd.read_parquet(project.dataset.raw_path)
    assert result["rows_removed"] == ROWS and len(raw) == ROWS and set(raw["month"]) == {2}
    assert result["data_version"] != before and result["data_version"] == version_split(project)["data_version"]
    folder = project.home / result["quarantine"]
    assert (folder / "2013-03.csv").is_file() and not (project.dataset.archive_dir / "2013-03.csv").exists()
    reverted = json.loads((folder / REVERTED_FILE).read_text())
    assert reverted["reason"] == "March labels were shifted by a day upstream" and reverted["by"] == BY
    listed = {b["batch"]: b for b in list_batches(project)}
    assert listed["2013-03.csv"]["status"] == "reverted" and listed["2013-03.csv"]["reason"].startswith("March labels")
    # the splits the next retrain trains on hold no row of it
    splits = pd.concat(pd.read_parquet(project.split.output_dir / f"{part}.parquet") for part in ("train", "val", "test"))
    assert set(splits["flight_id"]) == set(raw["flight_id"]) and set(splits["month"]) == {2}
    # a second revert says what became of it
    with pytest.raises(UnknownBatch, match=r"batch '2013-03.csv' has no rows left in the raw data: it was reverted \(March labels"):
        revert(project, "2013-03.csv", "again", BY, timeout=5)


def test_a_revert_names_what_is_wrong(two_batches):
    project, _ = two_batches
    with pytest.raises(UnknownBatch, match=r"batch '2013-09.csv' has no rows in the raw data; its batches are \['2013-02.csv', '2013-03.csv'\]"):
        revert(project, "2013-09.csv", "no such month", BY, timeout=5)
    with pytest.raises(ValueError, match="a revert needs a reason"):
        revert(project, "2013-03.csv", "  ", BY, timeout=5)


def test_a_revert_waits_for_a_step_holding_the_data_then_refuses_naming_it(two_batches):
    project, _ = two_batches
    # Given another process (a retrain's version_data task) holding the project's raw data
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from pipelines.data.batches import data_lock\n"
            "with data_lock(Path(sys.argv[1]), 'the DVC split', 5):\n"
            "    print('held', flush=True); time.sleep(60)"
        ), str(project.data_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(DataLocked, match=rf"held by the DVC split \(pid {holder.pid} on .*\); waited 2 s"):
            revert(project, "2013-03.csv", "March labels were shifted", BY, timeout=2)
        assert time.monotonic() - started >= 2
        assert len(pd.read_parquet(project.dataset.raw_path)) == 2 * ROWS  # nothing was touched
    finally:
        holder.kill()
        holder.wait()
    # Once it lets go, the revert goes through
    assert revert(project, "2013-03.csv", "March labels were shifted", BY, timeout=5)["rows_removed"] == ROWS
    with data_lock(project.data_dir, "a check that the lock is free again", 1):
        pass


def test_the_command_line_lists_and_reverts_batches(two_batches):
    project, _ = two_batches
    env = {**os.environ, "FLYWHEEL_HOME": str(project.home)}

    def flywheel(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    listed = [json.loads(line) for line in flywheel("batches", "flights").stdout.splitlines()]
    assert [(b["batch"], b["rows"], b["status"]) for b in listed] == [("2013-02.csv", ROWS, "in raw"), ("2013-03.csv", ROWS, "in raw")]

    unknown = flywheel("revert-batch", "flights", "2013-09.csv", "--reason", "no such month")
    assert unknown.returncode == 1 and "flywheel revert-batch: project flights: batch '2013-09.csv' has no rows" in unknown.stderr

    done = flywheel("revert-batch", "flights", "2013-02.csv", "--reason", "February came from the test system")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["rows_removed"] == ROWS
    after = [json.loads(line) for line in flywheel("batches", "flights").stdout.splitlines()]
    assert [(b["batch"], b["status"]) for b in after] == [("2013-02.csv", "reverted"), ("2013-03.csv", "in raw")]
