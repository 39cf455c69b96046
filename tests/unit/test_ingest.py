"""Ingestion of landing batches: passing ones reach the raw dataset and the archive,
failing ones reach quarantine with their reports, and a crash never loses a batch."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipelines.config import BATCH, ProjectConfig
from pipelines.data import ingest
from pipelines.data import raw as raw_data
from pipelines.data.ingest import BatchValidationError, ingest_landing
from pipelines.data.replay import land, month_batch
from pipelines.data.schema import typed
from pipelines.data.validation import SuiteError

ROWS = 200


def landing(config: ProjectConfig):
    return config.path(config.dataset.landing_dir)


def raw(config: ProjectConfig) -> pd.DataFrame:
    return raw_data.read(config.dataset)


def snapshot(config: ProjectConfig) -> dict[str, bytes]:
    """The raw data's parts, by name, as bytes."""
    return {p.name: p.read_bytes() for p in raw_data.parts(config.dataset)}


def quarantine(config: ProjectConfig, stem: str):
    return config.path(config.dataset.quarantine_dir) / stem


def seed_raw(config: ProjectConfig, month: str = "2013-01") -> dict[str, bytes]:
    """A raw dataset from an earlier night, its part written directly (no validation: it is quicker)."""
    rows, problems = typed(month_batch(month, rows=ROWS), config.dataset)
    assert not problems
    ingest.append_to_raw(config.dataset, rows, f"{month}.csv")
    return snapshot(config)


class CrashOnce:
    """Stands in for ``ingest.move_into`` and fails its first call, like a killed worker."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = ingest.move_into

    def __call__(self, path, directory):
        self.calls += 1
        if self.calls == 1:
            raise OSError("simulated crash")
        return self.real(path, directory)


def test_no_new_batches_is_a_normal_night(project):
    # Given an empty landing directory (it does not even exist yet)
    # When ingestion runs
    summary = ingest_landing(project)

    # Then it reports nothing to do instead of failing the nightly DAG
    assert summary == {
        "batches": [], "passed": [], "quarantined": [], "held": [], "confirmed": [],
        "rows_ingested": 0, "rows_quarantined": 0, "rows_held": 0, "label_checks": {}, "raw_rows": 0,
    }


def test_passing_batch_is_appended_to_raw_and_archived(project):
    # Given a good batch in landing and a raw dataset from an earlier night
    seed_raw(project, "2013-01")
    land(project.dataset, "2013-02", rows=ROWS)

    # When ingestion runs
    summary = ingest_landing(project)

    # Then its rows join the raw dataset, and the file leaves landing for the archive
    assert summary == {
        "batches": ["2013-02.csv"],
        "passed": ["2013-02.csv"],
        "quarantined": [],
        "held": [],
        "confirmed": [],
        "rows_ingested": ROWS,
        "rows_quarantined": 0,
        "rows_held": 0,
        "label_checks": {"2013-02.csv": "label check not run: no version is served yet: there is no model to check the labels against"},
        "raw_rows": 2 * ROWS,
    }
    assert set(raw(project)["month"]) == {1, 2}
    assert list(landing(project).iterdir()) == []
    assert (project.path(project.dataset.archive_dir) / "2013-02.csv").is_file()
    assert list(raw(project).columns) == [*project.dataset.columns, BATCH]
    assert raw(project).query("month == 2")[BATCH].eq("2013-02.csv").all()  # each row names its batch


def test_resent_batch_replaces_older_rows_instead_of_duplicating(project):
    # Given a batch already ingested, then re-sent with one row corrected upstream
    land(project.dataset, "2013-03", rows=ROWS)
    ingest_landing(project)
    resent = land(project.dataset, "2013-03", rows=ROWS)
    batch = pd.read_csv(resent)
    corrected_id = int(batch.loc[0, "flight_id"])
    batch.loc[0, "arr_delayed"] = 1 - batch.loc[0, "arr_delayed"]
    batch.to_csv(resent, index=False)

    # When ingestion runs again
    summary = ingest_landing(project)

    # Then each flight is in raw once, with the newer copy's value
    rows = raw(project)
    assert summary["raw_rows"] == ROWS == len(rows)
    assert rows["flight_id"].is_unique
    assert rows.set_index("flight_id").loc[corrected_id, "arr_delayed"] == batch.loc[0, "arr_delayed"]
    # and both copies of the file are kept: archiving never overwrites
    archive = project.path(project.dataset.archive_dir)
    assert sorted(p.name for p in archive.iterdir()) == ["2013-03.2.csv", "2013-03.csv"]


def test_partial_files_are_left_for_the_writer_to_finish(project):
    # Given a batch still being written (replay writes *.partial, then renames)
    landing(project).mkdir(parents=True)
    partial = landing(project) / "2013-04.csv.partial"
    partial.write_text("flight_id,time_hour\n1,")

    summary = ingest_landing(project)

    assert summary["batches"] == [] and partial.exists()


def test_failing_batch_is_quarantined_with_its_reports_and_raw_untouched(project):
    # Given a raw dataset and a batch an upstream bug has broken (negative distances,
    # unknown origin, missing carrier)
    raw_before = seed_raw(project)
    land(project.dataset, "2013-03", rows=ROWS, broken=True)

    # When ingestion runs
    with pytest.raises(BatchValidationError) as failure:
        ingest_landing(project)

    # Then the batch is moved, not deleted, into its own quarantine folder with the
    # validation result and the Data Docs page, and nothing reached the raw dataset
    folder = quarantine(project, "2013-03")
    assert sorted(p.name for p in folder.iterdir()) == ["2013-03.csv", "data_docs.html", "validation_result.json"]
    assert len(pd.read_csv(folder / "2013-03.csv")) == ROWS
    negative = min(pd.read_csv(folder / "2013-03.csv")["distance"])
    result = json.loads((folder / "validation_result.json").read_text())
    assert result["success"] is False and result["meta"]["run_id"]["run_name"] == "2013-03"
    page = (folder / "data_docs.html").read_text()
    assert "2013-03" in page and f">{negative}<" in page
    assert list(landing(project).iterdir()) == []
    assert snapshot(project) == raw_before
    # and the error says which batch, which expectation on which column, a bad value, and where it went
    message = str(failure.value)
    assert "2013-03.csv" in message and str(folder) in message
    assert "expect_column_values_to_be_between(distance)" in message and str(negative) in message
    assert "expect_column_values_to_be_in_set(origin)" in message and "'XXX'" in message
    assert "expect_column_values_to_not_be_null(carrier)" in message
    assert failure.value.summary["quarantined"] == ["2013-03.csv"]


def test_binary_garbage_is_quarantined_as_unreadable(project):
    # Given a file that is not text at all
    landing(project).mkdir(parents=True)
    (landing(project) / "2013-05.csv").write_bytes(bytes(range(256)) * 4)

    with pytest.raises(BatchValidationError, match=r"2013-05.csv[\s\S]*not a readable CSV \(UnicodeDecodeError") as failure:
        ingest_landing(project)

    # Then it is quarantined with a record of why, and the message says what was expected
    folder = quarantine(project, "2013-05")
    assert (folder / "2013-05.csv").read_bytes() == bytes(range(256)) * 4
    record = json.loads((folder / "validation_result.json").read_text())
    assert record["success"] is False and record["expected_columns"] == project.dataset.columns
    assert "expected a CSV with a header row, or a parquet file, with at least the columns ['flight_id', 'time_hour'" in str(failure.value)


def test_csv_with_broken_row_structure_is_quarantined_as_unreadable(project):
    # Given a CSV where a row has more fields than the header (a shifted or garbled export)
    path = land(project.dataset, "2013-06", rows=ROWS)
    lines = path.read_text().splitlines()
    lines[5] += ",extra,fields"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(BatchValidationError, match=r"2013-06.csv[\s\S]*not a readable CSV \(ParserError: .*line 6"):
        ingest_landing(project)

    assert (quarantine(project, "2013-06") / "2013-06.csv").is_file()
    assert not raw_data.parts(project.dataset)


def test_batch_missing_a_required_column_is_quarantined_naming_it_and_the_expected_ones(project):
    # Given a batch whose export dropped the dest column
    path = land(project.dataset, "2013-07", rows=ROWS)
    pd.read_csv(path).drop(columns=["dest"]).to_csv(path, index=False)

    with pytest.raises(BatchValidationError) as failure:
        ingest_landing(project)

    message = str(failure.value)
    assert "missing required columns ['dest']; expected ['flight_id', 'time_hour', 'carrier'" in message
    assert "expect_table_columns_to_match_set: observed {'missing': ['dest']}" in message
    assert (quarantine(project, "2013-07") / "data_docs.html").is_file()


def test_mixed_night_ingests_the_good_batches_and_quarantines_the_bad(project):
    # Given a good batch and a broken one in the same night
    land(project.dataset, "2013-08", rows=ROWS)
    land(project.dataset, "2013-09", rows=ROWS, broken=True)

    # When ingestion runs, it handles both before failing
    with pytest.raises(BatchValidationError, match=r"1 of 2 landing batch\(es\) failed[\s\S]*2013-09.csv") as failure:
        ingest_landing(project)

    # Then the good one is in raw and archived, the bad one quarantined
    assert set(raw(project)["month"]) == {8}
    assert (project.path(project.dataset.archive_dir) / "2013-08.csv").is_file()
    assert (quarantine(project, "2013-09") / "2013-09.csv").is_file()
    assert list(landing(project).iterdir()) == []
    assert failure.value.summary["passed"] == ["2013-08.csv"]
    assert failure.value.summary["rows_ingested"] == failure.value.summary["rows_quarantined"] == ROWS
    assert "2013-08.csv" not in str(failure.value).split("Batches that passed")[0]


def test_crash_after_raw_write_leaves_the_batch_in_landing_and_the_rerun_does_not_duplicate(project, monkeypatch):
    # Given a crash between writing raw and archiving the landing file
    land(project.dataset, "2013-10", rows=ROWS)
    monkeypatch.setattr(ingest, "move_into", CrashOnce())
    with pytest.raises(OSError, match="simulated crash"):
        ingest_landing(project)
    assert (landing(project) / "2013-10.csv").is_file()

    # When the next run redoes it
    summary = ingest_landing(project)

    # Then the rows are in raw once, and the batch is archived
    assert summary["raw_rows"] == ROWS == len(raw(project))
    assert (project.path(project.dataset.archive_dir) / "2013-10.csv").is_file()


def test_crash_while_quarantining_leaves_the_batch_in_landing_and_the_rerun_completes_its_folder(
    project, monkeypatch
):
    # Given a crash after the reports are written but before the batch is moved to quarantine
    land(project.dataset, "2013-11", rows=ROWS, broken=True)
    monkeypatch.setattr(ingest, "move_into", CrashOnce())
    with pytest.raises(OSError, match="simulated crash"):
        ingest_landing(project)
    assert (landing(project) / "2013-11.csv").is_file()

    # When the next run redoes it
    with pytest.raises(BatchValidationError):
        ingest_landing(project)

    # Then the half-made folder is completed, not abandoned for a second one
    quarantined = sorted(p.name for p in project.path(project.dataset.quarantine_dir).iterdir())
    assert quarantined == ["2013-11"]
    assert (quarantine(project, "2013-11") / "2013-11.csv").is_file()


def test_resent_bad_batch_gets_a_new_quarantine_folder_keeping_the_first(project):
    # Given a bad batch quarantined, then re-sent still bad
    land(project.dataset, "2013-12", rows=ROWS, broken=True)
    with pytest.raises(BatchValidationError):
        ingest_landing(project)
    land(project.dataset, "2013-12", rows=ROWS, broken=True)

    with pytest.raises(BatchValidationError, match="2013-12.2"):
        ingest_landing(project)

    # Then both copies are kept for the investigation
    assert (quarantine(project, "2013-12") / "2013-12.csv").is_file()
    assert (quarantine(project, "2013-12.2") / "2013-12.csv").is_file()


def test_missing_suite_stops_before_touching_any_batch(project):
    # Given a project whose suite file is gone: the project is broken, not the data
    land(project.dataset, "2013-01", rows=ROWS)
    project.path(project.dataset.expectation_suite).unlink()

    with pytest.raises(SuiteError, match="projects/flights/expectations.json: expectation suite file not found"):
        ingest_landing(project)

    # Then the batch waits in landing for the fix instead of being quarantined
    assert (landing(project) / "2013-01.csv").is_file()
    assert not project.path(project.dataset.quarantine_dir).exists()


def test_without_an_id_column_a_resent_row_replaces_itself_and_a_changed_row_is_new(tmp_path):
    from pipelines.config import ROW_ID
    from tests.conftest import make_project

    # Given a project that names no id column (its suite does not require flight_id either)
    config = make_project(tmp_path, {"dataset": {"id_column": None}})
    suite_file = config.path(config.dataset.expectation_suite)
    suite = json.loads(suite_file.read_text())
    suite["expectations"] = [e for e in suite["expectations"] if e["kwargs"].get("column") != "flight_id"]
    for expectation in suite["expectations"]:
        if expectation["type"] == "expect_table_columns_to_match_set":
            expectation["kwargs"]["column_set"].remove("flight_id")
    suite_file.write_text(json.dumps(suite))
    batch = month_batch("2013-01", rows=ROWS).drop(columns="flight_id")
    landing(config).mkdir(parents=True)
    batch.to_csv(landing(config) / "first.csv", index=False)
    ingest_landing(config)

    # When the same rows arrive again, one of them changed
    again = batch.copy()
    again.loc[0, "distance"] += 1
    again.to_csv(landing(config) / "again.csv", index=False)
    ingest_landing(config)

    # Then each row has a derived id, the identical rows were not doubled, the changed one is a new row
    stored = raw(config)
    assert ROW_ID in stored.columns and stored[ROW_ID].is_unique
    assert len(stored) == ROWS + 1


# -- what validation accepts, the later steps can read (issue: inputs from the field) -----------


def landed_csv(config: ProjectConfig, name: str, batch: pd.DataFrame):
    landing(config).mkdir(parents=True, exist_ok=True)
    batch.to_csv(landing(config) / name, index=False)
    return landing(config) / name


def test_a_batch_mixing_iso_8601_forms_is_stored_as_utc_timestamps_and_the_split_runs(project):
    # Given real flights whose time_hour mixes three ISO 8601 forms (Z, milliseconds, an offset):
    # each passes the suite's pattern, and pandas' inferred format used to wedge the split on them
    batch = month_batch("2013-02", rows=ROWS)
    instants = pd.to_datetime(batch["time_hour"], utc=True)
    forms = [
        instants.dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        instants.dt.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        instants.dt.tz_convert("America/New_York").dt.strftime("%Y-%m-%dT%H:%M:%S%z"),
    ]
    batch["time_hour"] = [forms[i % 3].iloc[i] for i in range(len(batch))]
    assert batch["time_hour"].iloc[2].endswith("-0500")
    landed_csv(project, "2013-02.csv", batch)

    assert ingest_landing(project)["passed"] == ["2013-02.csv"]

    # Then the raw data holds typed values: the same instants, in UTC, and numbers as numbers
    rows = raw(project).set_index("flight_id").loc[batch["flight_id"]]
    assert str(rows["time_hour"].dtype) == "datetime64[ns, UTC]"
    assert (rows["time_hour"].to_numpy() == instants.to_numpy()).all()
    assert rows["distance"].dtype == "float64" and rows["carrier"].map(type).eq(str).all()
    # and the split, the step that used to fail on them, cuts the batch by time
    from pipelines.data.split import run as split

    summary = split(project.dataset, project.split)
    assert sum(part["rows"] for part in summary.values()) == ROWS
    assert summary["train"]["to"] < summary["test"]["from"]


def test_a_value_the_later_steps_cannot_parse_quarantines_the_batch_naming_the_column_and_values(project):
    # Given a batch whose time matches the suite's pattern but is no date (February 30th)
    raw_before = seed_raw(project)
    batch = month_batch("2013-02", rows=ROWS)
    batch.loc[[3, 7], "time_hour"] = "2013-02-30T11:00:00Z"
    landed_csv(project, "2013-02.csv", batch)

    with pytest.raises(BatchValidationError) as failure:
        ingest_landing(project)

    # Then it is quarantined with the column, the count and the values, and raw is untouched
    assert "time_hour: 2 of 200 values are not dates/times" in str(failure.value)
    assert "'2013-02-30T11:00:00Z'" in str(failure.value)
    record = json.loads((quarantine(project, "2013-02") / "validation_result.json").read_text())
    assert record["success"] is False and record["unparsed_columns"][0].startswith("time_hour: 2 of 200")
    assert snapshot(project) == raw_before


def test_messages_say_what_the_file_holds(project):
    # Text in a numeric column: named as text with its values, not as blanks
    batch = month_batch("2013-02", rows=ROWS).astype({"distance": object})
    batch["distance"] = "n/a"
    landed_csv(project, "text.csv", batch)
    # A label that is not a number
    batch = month_batch("2013-03", rows=ROWS).astype({"arr_delayed": object})
    batch.loc[0, "arr_delayed"] = "yes"
    landed_csv(project, "label.csv", batch)
    # A column named twice in the header (pandas would call the second one distance.1)
    batch = month_batch("2013-04", rows=ROWS)
    (landing(project) / "twice.csv").write_text(batch.to_csv(index=False).replace("sched_arr_time,distance", "distance,distance", 1))

    with pytest.raises(BatchValidationError) as failure:
        ingest_landing(project)

    message = str(failure.value)
    assert "distance: 200 of 200 values are not numbers (text in a numeric column)" in message and "'n/a'" in message
    assert "null" not in message.split("text.csv")[1].split("- ")[0]  # not "200 of 200 rows are null"
    assert "arr_delayed: 1 of 200 values are not numbers" in message and "'yes'" in message
    assert "observed None" not in message
    assert "the header names 'distance' more than once" in message and "distance.1" not in message


def test_parquet_batches_land_are_validated_and_quarantined_like_csv(project):
    # Given one good and one broken month, landed as parquet files, and one still being written
    good, bad = month_batch("2013-02", rows=ROWS), month_batch("2013-03", rows=ROWS)
    bad["distance"] = -bad["distance"]
    incoming = project.home / "incoming"
    incoming.mkdir()
    for name, batch in (("2013-02", good), ("2013-03", bad)):
        batch.to_parquet(incoming / f"{name}.parquet", index=False)
    landed = [ingest.land_file(project.dataset, incoming / f"{m}.parquet") for m in ("2013-02", "2013-03")]
    (landing(project) / "2013-04.parquet.partial").write_bytes(b"PAR1")

    with pytest.raises(BatchValidationError, match=r"2013-03.parquet[\s\S]*expect_column_values_to_be_between\(distance\)") as failure:
        ingest_landing(project)

    assert [p.name for p in landed] == ["2013-02.parquet", "2013-03.parquet"]
    assert failure.value.summary["passed"] == ["2013-02.parquet"] and failure.value.summary["quarantined"] == ["2013-03.parquet"]
    assert sorted(raw(project)["flight_id"]) == sorted(good["flight_id"])
    assert (project.path(project.dataset.archive_dir) / "2013-02.parquet").is_file()
    assert (quarantine(project, "2013-03") / "2013-03.parquet").is_file()
    assert sorted(p.name for p in landing(project).iterdir()) == ["2013-04.parquet.partial"]
    (incoming / "2013-05.json").write_text("{}")
    with pytest.raises(ValueError, match="as CSV files with a header row or as parquet files, got a .json file"):
        ingest.land_file(project.dataset, incoming / "2013-05.json")


def test_a_csv_and_a_parquet_batch_of_one_name_get_quarantine_folders_of_their_own(project):
    bad = month_batch("2013-03", rows=ROWS).assign(distance=-1)
    landed_csv(project, "2013-03.csv", bad)
    bad.to_parquet(landing(project) / "2013-03.parquet", index=False)

    with pytest.raises(BatchValidationError):
        ingest_landing(project)

    folders = sorted(p.name for p in project.dataset.quarantine_dir.iterdir())
    assert folders == ["2013-03", "2013-03.2"]
    for folder in folders:  # each keeps its own batch and its own report
        files = sorted(p.name for p in (project.dataset.quarantine_dir / folder).iterdir())
        assert len([f for f in files if f.startswith("2013-03.")]) == 1 and "validation_result.json" in files


# -- the raw data as parts (issue: a night's cost that does not grow with history) ---------------


def typed_month(config: ProjectConfig, month: str, rows: int, seed: int = 0) -> pd.DataFrame:
    frame, problems = typed(month_batch(month, rows=rows, seed=seed), config.dataset)
    assert not problems
    return frame


def test_parts_hold_what_the_single_file_held_after_the_same_batches(project, tmp_path):
    # Given batches ingested one after another: two months, then a re-send of some January rows
    # (two corrected, one sent twice in the same batch) and a February row, then March
    from bench.inmemory import append_to_raw as append_to_one_file

    january, february = typed_month(project, "2013-01", 300), typed_month(project, "2013-02", 300)
    resent = pd.concat([january.iloc[[5, 6, 7, 7]], february.iloc[[0]]], ignore_index=True)
    resent.loc[[0, 1], "distance"] += 100.0
    batches = [("2013-01.csv", january), ("2013-02.csv", february), ("fix.csv", resent), ("2013-03.csv", typed_month(project, "2013-03", 300))]

    # When each goes into the parts and, as before, into one file
    one_file = tmp_path / "old" / "raw.parquet"
    for name, batch in batches:
        total = ingest.append_to_raw(project.dataset, batch, name)
        assert total == append_to_one_file(one_file, project.dataset, batch, name)

    # Then the rows are the same, each id once with its newest copy, and each knows its batch
    new, old = raw(project), pd.read_parquet(one_file).reset_index(drop=True)
    pd.testing.assert_frame_equal(new, old)
    assert new.set_index("flight_id").loc[january.loc[5, "flight_id"], "distance"] == january.loc[5, "distance"] + 100.0
    assert raw_data.batch_rows(project.dataset) == {"2013-01.csv": 297, "2013-02.csv": 299, "2013-03.csv": 300, "fix.csv": 4}


def test_a_batch_rewrites_only_the_parts_holding_the_ids_it_resends(project):
    # Given three months in the raw data
    for month in ("2013-01", "2013-02", "2013-03"):
        ingest.append_to_raw(project.dataset, typed_month(project, month, 200), f"{month}.csv")
    before = snapshot(project)

    # When a batch re-sends two February rows
    ingest.append_to_raw(project.dataset, typed_month(project, "2013-02", 200).iloc[:2], "fix.csv")

    # Then February's part lost them, the other months' parts are byte for byte as they were
    after = snapshot(project)
    assert after["2013-01.csv.parquet"] == before["2013-01.csv.parquet"] and after["2013-03.csv.parquet"] == before["2013-03.csv.parquet"]
    assert raw_data.batch_rows(project.dataset)["2013-02.csv"] == 198


def test_a_legacy_single_file_raw_dataset_becomes_one_part_per_batch(project):
    # Given raw data written by an older Flywheel: one raw.parquet beside where the parts go,
    # its first rows from before rows carried their batch, times as text
    legacy = project.path(project.dataset.raw_path).with_name("raw.parquet")
    legacy.parent.mkdir(parents=True, exist_ok=True)
    old = pd.concat([month_batch("2013-01", rows=50).assign(**{BATCH: None}), month_batch("2013-02", rows=50).assign(**{BATCH: "2013-02.csv"})])
    old.to_parquet(legacy, index=False)

    # When the next batch is ingested
    land(project.dataset, "2013-03", rows=ROWS)
    summary = ingest_landing(project)

    # Then the legacy file is gone, its rows are in parts by batch, typed, and the new batch joined them
    assert not legacy.exists()
    assert raw_data.batch_rows(project.dataset) == {"2013-02.csv": 50, "2013-03.csv": ROWS, raw_data.UNBATCHED: 50}
    assert summary["raw_rows"] == 100 + ROWS
    assert str(raw(project)["time_hour"].dtype) == "datetime64[ns, UTC]"
