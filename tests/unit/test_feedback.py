"""Feedback: true labels keyed by request id are joined to the inference log, checked row by row
(unknown, duplicate, out-of-set, late), written as labelled production rows or quarantined with a
reason; a file that cannot be read is refused whole, naming the file and the column. Nothing is
lost: every row read is labelled or quarantined. No Triton: the log is written here in the
server's layout (pipelines.serving), from real flights."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.artifacts import RESULT_FILE
from pipelines.config import FeatureType, ProjectConfig
from pipelines.data import raw
from pipelines.data.replay import month_batch
from pipelines.feedback import labels
from pipelines.feedback.labels import FeedbackFileError, ingest_feedback, land_feedback, read_labelled

ROWS = 120
DAY = datetime(2026, 3, 1, tzinfo=timezone.utc)
NOW = DAY + timedelta(days=3)
LOG_COLUMNS = ["prediction", "label", "request_id", "model", "model_version", "served_at", "latency_ms"]


def flights(rows: int = ROWS, seed: int = 0) -> pd.DataFrame:
    """Real January flights, each with the request id a client gave it: zero-padded, so leading zeros matter."""
    batch = month_batch("2013-01", rows=rows, seed=seed)
    return batch.assign(request_id=batch["flight_id"].map("{:08d}".format))


def serve(config: ProjectConfig, rows: pd.DataFrame, served_at: pd.Series | datetime, version: int = 1) -> None:
    """Write ``rows`` as Triton's side logs its answers: the features as sent, the answer, the
    request id, one part a day of ``served_at`` (``<inference_log>/<model>/date=.../part-*.parquet``)."""
    dataset = config.dataset
    times = pd.Series(pd.to_datetime(served_at, utc=True), index=rows.index) if isinstance(served_at, datetime) else pd.to_datetime(served_at, utc=True)
    columns: dict[str, pa.Array] = {}
    for feature in dataset.features:
        values = rows[feature.name]
        columns[feature.name] = pa.array(values.astype(str) if feature.type == FeatureType.categorical else values.astype("float32"))
    predictions = np.random.default_rng(len(rows)).uniform(0, 1, len(rows)).astype("float32")
    columns |= {
        "prediction": pa.array(predictions),
        "label": pa.array((predictions > 0.5).astype("int32")),
        "request_id": pa.array(rows["request_id"], pa.string()),
        "model": pa.array([config.served_model] * len(rows)),
        "model_version": pa.array(np.full(len(rows), version, dtype="int64")),
        "served_at": pa.array(times, pa.timestamp("us", tz="UTC")),
        "latency_ms": pa.array(np.full(len(rows), 2.5)),
    }
    table = pa.table(columns)
    days = times.dt.strftime("%Y-%m-%d").to_numpy()
    for day in sorted(set(days)):
        folder = config.serving.inference_log / config.served_model / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(pa.array(days == day)), folder / f"part-{len(list(folder.iterdir())):05d}.parquet")


def send_feedback(config: ProjectConfig, name: str, frame: pd.DataFrame, tmp_path: Path) -> Path:
    """Land a feedback file as a client would: written elsewhere, then ``land_feedback``."""
    source = tmp_path / "outbox" / name
    source.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".parquet"):
        frame.to_parquet(source, index=False)
    else:
        frame.to_csv(source, index=False)
    return land_feedback(config, source)


def truth(rows: pd.DataFrame, observed_at: datetime | pd.Series | None = None) -> pd.DataFrame:
    """Feedback of ``rows``: their real ``arr_delayed``, observed at ``observed_at``."""
    frame = pd.DataFrame({"request_id": rows["request_id"], "label": rows["arr_delayed"]})
    if observed_at is not None:
        frame["observed_at"] = pd.Series(pd.to_datetime(observed_at, utc=True), index=rows.index).map(lambda t: t.isoformat())
    return frame.reset_index(drop=True)


def labelled(config: ProjectConfig) -> pd.DataFrame:
    folder = config.feedback.labelled_dir
    parts = sorted(folder.glob("date=*/part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()


def quarantined_rows(config: ProjectConfig) -> pd.DataFrame:
    parts = sorted(config.feedback.quarantine_dir.glob(f"*/{labels.ROWS_FILE}"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame(columns=["request_id", "reason"])


def assert_nothing_lost(config: ProjectConfig, summary: dict, sent: int) -> None:
    """Every row sent is labelled or quarantined, in the summary and on disk."""
    assert summary["rows"] == sent == summary["labelled"] + sum(summary["quarantined"].values())
    assert len(labelled(config)) + len(quarantined_rows(config)) == sent


def test_labels_join_their_served_rows_and_are_written_by_served_day(project, tmp_path):
    # Given 120 real flights answered on two days, and their true arr_delayed a day later
    rows = flights()
    served_at = pd.Series([DAY + timedelta(hours=int(h)) for h in np.arange(ROWS) % 48], index=rows.index)
    serve(project, rows, served_at)
    send_feedback(project, "2026-03-03.csv", truth(rows, served_at + timedelta(days=1)), tmp_path)
    writing = project.feedback.landing_dir / "2026-03-04.csv.partial"  # still being written: left alone
    writing.write_text("request_id,label\n")

    # When the feedback is ingested
    summary = ingest_feedback(project, now=NOW)

    # Then every label found its row, by served day, with the log's columns and the truth
    assert summary == {
        "files": ["2026-03-03.csv"],
        "refused": [],
        "rows": ROWS,
        "labelled": ROWS,
        "quarantined": {},
        "windows": [["2026-03-01T00:00:00+00:00", "2026-03-02T00:00:00+00:00"], ["2026-03-02T00:00:00+00:00", "2026-03-03T00:00:00+00:00"]],
    }
    out = labelled(project)
    features = [f.name for f in project.dataset.features]
    assert list(out.columns) == [*features, *LOG_COLUMNS, "arr_delayed", "observed_at", "feedback_file"]
    assert sorted(p.parent.name for p in project.feedback.labelled_dir.glob("date=*/part-*.parquet")) == ["date=2026-03-01", "date=2026-03-02"]
    joined = out.set_index("request_id").loc[rows["request_id"]]
    assert (joined["arr_delayed"].to_numpy() == rows["arr_delayed"].to_numpy()).all()
    assert (joined["distance"].to_numpy() == rows["distance"].to_numpy(dtype="float32")).all()
    assert (joined["observed_at"] - joined["served_at"] == pd.Timedelta(days=1)).all()
    assert out["feedback_file"].eq("2026-03-03.csv").all()
    # the file is archived; the day windows read back the labelled rows
    assert [p.name for p in project.feedback.archive_dir.iterdir()] == ["2026-03-03.csv"]
    assert list(project.feedback.landing_dir.iterdir()) == [writing]
    assert len(read_labelled(project, DAY, DAY + timedelta(days=1))) == (served_at < DAY + timedelta(days=1)).sum() == 72
    metrics = (project.metrics.textfile_dir / "feedback.prom").read_text()
    assert f'flywheel_feedback_rows{{model="flights_delay",outcome="labelled",project="flights"}} {float(ROWS)}' in metrics
    assert_nothing_lost(project, summary, ROWS)


def test_unknown_request_ids_are_quarantined_with_the_reason(project, tmp_path):
    # Given feedback of 100 served flights and of 20 flights no model answered
    rows = flights()
    serve(project, rows.iloc[:100], DAY)
    send_feedback(project, "f.csv", truth(rows, DAY + timedelta(hours=5)), tmp_path)

    summary = ingest_feedback(project, now=NOW)

    assert summary["labelled"] == 100 and summary["quarantined"] == {"unknown_request_id": 20}
    bad = quarantined_rows(project)
    assert set(bad["request_id"]) == set(rows["request_id"].iloc[100:]) and bad["reason"].eq("unknown_request_id").all()
    folder = next(project.feedback.quarantine_dir.iterdir())
    assert folder.name == f"f-{NOW:%Y%m%dT%H%M%SZ}"
    result = json.loads((folder / RESULT_FILE).read_text())
    assert result["file"] == "f.csv" and result["quarantined"] == {"unknown_request_id": 20} and result["success"] is False
    failed = [r for r in result["results"] if not r["success"]]
    assert [(r["expectation_config"]["type"], r["expectation_config"]["kwargs"]["column"], r["result"]["unexpected_count"]) for r in failed] == [
        ("expect_column_values_to_not_be_null", "served_at", 20)
    ]
    assert_nothing_lost(project, summary, ROWS)


def test_duplicates_in_a_file_and_against_earlier_files_are_quarantined(project, tmp_path):
    # Given a first file labelling 60 flights, then a file that labels 20 of them again and
    # names 5 other flights twice (with different labels: which is right is unknown)
    rows = flights()
    serve(project, rows, DAY)
    observed = DAY + timedelta(hours=6)
    send_feedback(project, "1-first.csv", truth(rows.iloc[:60], observed), tmp_path)
    first = ingest_feedback(project, now=NOW)
    second = truth(pd.concat([rows.iloc[40:120], rows.iloc[100:105].assign(arr_delayed=lambda r: 1 - r["arr_delayed"])]), observed)
    send_feedback(project, "2-second.csv", second, tmp_path)

    summary = ingest_feedback(project, now=NOW)

    assert first["labelled"] == 60
    assert summary["labelled"] == 55 and summary["quarantined"] == {"already_labelled": 20, "duplicate_in_file": 10}
    bad = quarantined_rows(project).set_index("request_id")["reason"]
    assert set(bad[bad == "already_labelled"].index) == set(rows["request_id"].iloc[40:60])
    assert sorted(bad[bad == "duplicate_in_file"].index) == sorted(2 * list(rows["request_id"].iloc[100:105]))
    out = labelled(project)
    assert out["request_id"].is_unique and len(out) == 115
    assert summary["rows"] == len(second) == summary["labelled"] + sum(summary["quarantined"].values())


def test_labels_outside_the_suites_set_or_not_numbers_are_quarantined(project, tmp_path):
    # Given feedback whose labels are mostly 0/1 (the flights suite's set for arr_delayed), but
    # some 2, some text, some blank
    rows = flights()
    serve(project, rows, DAY)
    feedback = truth(rows, DAY + timedelta(hours=2)).astype({"label": object})
    feedback.loc[0:4, "label"] = 2
    feedback.loc[5:7, "label"] = "yes"
    feedback.loc[8:9, "label"] = None
    send_feedback(project, "labels.csv", feedback, tmp_path)

    summary = ingest_feedback(project, now=NOW)

    assert summary["quarantined"] == {"label_not_allowed": 5, "label_not_a_number": 5}
    bad = quarantined_rows(project)
    assert sorted(bad.loc[bad["reason"] == "label_not_allowed", "label"]) == ["2"] * 5
    assert sorted(bad.loc[bad["reason"] == "label_not_a_number", "label"].fillna("")) == ["", "", "yes", "yes", "yes"]
    assert set(labelled(project)["arr_delayed"]) == {0.0, 1.0}
    assert_nothing_lost(project, summary, ROWS)


def test_labels_observed_before_serving_or_beyond_the_horizon_are_quarantined(project, tmp_path):
    # Given flights served on day 1 and labels observed: in time (a day later), 8 days later
    # (horizon 168 h), before the answer; and a second file observed 30 days later, whose
    # horizon's days do not reach day 1 (the join reads only those, then looks the rest up);
    # one observed_at is not a time
    rows = flights()
    serve(project, rows, DAY)
    late, early, very_late = rows.index[:10], rows.index[10:15], rows.index[100:]
    observed = pd.Series(DAY + timedelta(days=1), index=rows.index)
    observed[late] = DAY + timedelta(days=8)
    observed[early] = DAY - timedelta(minutes=1)
    first = truth(rows.loc[:99], observed.loc[:99])
    first.loc[99, "observed_at"] = "not a time"
    send_feedback(project, "1-timing.csv", first, tmp_path)
    send_feedback(project, "2-month-later.csv", truth(rows.loc[very_late], DAY + timedelta(days=30)), tmp_path)

    summary = ingest_feedback(project, now=DAY + timedelta(days=31))

    # Then the late ones are called late, not unknown, and the early ones observed before served
    assert summary["quarantined"] == {"late": 30, "observed_before_served": 5, "bad_observed_at": 1}
    bad = quarantined_rows(project).set_index("request_id")["reason"]
    assert set(bad[bad == "late"].index) == set(rows.loc[late.union(very_late), "request_id"])
    assert set(bad[bad == "observed_before_served"].index) == set(rows.loc[early, "request_id"])
    assert_nothing_lost(project, summary, ROWS)


def test_a_csv_with_a_bom_and_crlf_line_ends_reads_like_plain_utf8(project):
    # Given a feedback CSV written by a spreadsheet: a UTF-8 BOM, CRLF line ends, zero-padded ids, no observed_at
    rows = flights(20)
    serve(project, rows, NOW - timedelta(hours=3))
    lines = ["request_id,label", *(f"{r},{y}" for r, y in zip(rows["request_id"], rows["arr_delayed"]))]
    project.feedback.landing_dir.mkdir(parents=True)
    (project.feedback.landing_dir / "excel.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")

    summary = ingest_feedback(project, now=NOW)

    # Then the first column is request_id (not "\ufeffrequest_id"), ids keep their zeros, and
    # observed_at is when the file was processed
    assert summary["labelled"] == 20 and summary["quarantined"] == {}
    out = labelled(project)
    assert sorted(out["request_id"]) == sorted(rows["request_id"]) and out["request_id"].str.startswith("0").all()
    assert out["observed_at"].eq(pd.Timestamp(NOW)).all()
    assert_nothing_lost(project, summary, 20)


def test_an_empty_file_and_a_file_without_label_are_refused_naming_file_and_column(project, tmp_path):
    # Given an empty file, a file without the label column, and a good parquet file
    rows = flights()
    serve(project, rows, DAY)
    landing = project.feedback.landing_dir
    landing.mkdir(parents=True)
    (landing / "a-empty.csv").write_bytes(b"")
    (landing / "b-nolabel.csv").write_text("request_id,truth\n00000001,1\n")
    (landing / "c-header-only.csv").write_text("request_id,label\n")
    send_feedback(project, "d-good.parquet", truth(rows, DAY + timedelta(hours=1)), tmp_path)

    with pytest.raises(FeedbackFileError) as refused:
        ingest_feedback(project, now=NOW)

    # Then each refused file is named with why, and moved to its quarantine folder with its result
    message = str(refused.value)
    assert "3 of 4 feedback file(s) refused" in message
    assert "a-empty.csv: the file is empty" in message
    assert "b-nolabel.csv: no column 'label' (the file has ['request_id', 'truth'])" in message
    assert "c-header-only.csv: a header but no rows" in message
    result = json.loads((project.feedback.quarantine_dir / f"b-nolabel-{NOW:%Y%m%dT%H%M%SZ}" / RESULT_FILE).read_text())
    assert result["file"] == "b-nolabel.csv" and result["column"] == "label" and "request_id and label" in result["expected"]
    assert (project.feedback.quarantine_dir / f"a-empty-{NOW:%Y%m%dT%H%M%SZ}" / "a-empty.csv").is_file()
    # and the good file was joined all the same
    summary = refused.value.summary
    assert summary["refused"] == ["a-empty.csv", "b-nolabel.csv", "c-header-only.csv"]
    assert summary["labelled"] == ROWS and list(landing.iterdir()) == []
    assert_nothing_lost(project, summary, ROWS)


def test_a_rerun_after_a_crash_rewrites_the_same_parts_and_quarantine_folder(project, tmp_path, monkeypatch):
    # Given a file whose labelled rows and quarantined rows were written, but the worker died
    # before the file left landing
    rows = flights()
    serve(project, rows.iloc[:100], DAY)
    send_feedback(project, "f.csv", truth(rows, DAY + timedelta(hours=5)), tmp_path)
    real = labels.move_into

    def crash(path, directory):
        raise OSError("simulated crash")

    monkeypatch.setattr(labels, "move_into", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ingest_feedback(project, now=NOW)
    assert (project.feedback.landing_dir / "f.csv").is_file()
    monkeypatch.setattr(labels, "move_into", real)

    # When the next run redoes it
    summary = ingest_feedback(project, now=NOW + timedelta(hours=1))

    # Then its own rows are not duplicates of themselves, and nothing is doubled
    assert summary["labelled"] == 100 and summary["quarantined"] == {"unknown_request_id": 20}
    assert len(list(project.feedback.labelled_dir.glob("date=*/part-*.parquet"))) == 1
    assert len(list(project.feedback.quarantine_dir.iterdir())) == 1
    assert [p.name for p in project.feedback.archive_dir.iterdir()] == ["f.csv"]
    assert_nothing_lost(project, summary, ROWS)


def test_a_request_id_logged_twice_gets_the_answer_before_the_observation(project, tmp_path):
    # Given a client that reused its request ids: the same ids answered on day 1 and again on day 3
    rows = flights(10)
    serve(project, rows, DAY, version=1)
    serve(project, rows, DAY + timedelta(days=2), version=2)
    send_feedback(project, "f.csv", truth(rows, DAY + timedelta(days=1)), tmp_path)

    summary = ingest_feedback(project, now=NOW)

    # Then each label belongs to the answer it could have been about: the one before it was observed
    assert summary["labelled"] == 10
    assert labelled(project)["model_version"].eq(1).all()


def test_a_label_the_suite_does_not_bound_is_checked_against_the_raw_datas_values(project, tmp_path):
    # Given a suite without the set of arr_delayed, and raw data whose labels are 0 and 1
    suite = json.loads(project.dataset.expectation_suite.read_text())
    suite["expectations"] = [e for e in suite["expectations"] if e["kwargs"].get("column") != "arr_delayed"]
    project.dataset.expectation_suite.write_text(json.dumps(suite))
    raw.write_part(raw.part_path(project.dataset, "2013-01.csv"), month_batch("2013-01", rows=200), project.dataset)
    rows = flights(20)
    serve(project, rows, DAY)
    feedback = truth(rows, DAY + timedelta(hours=1))
    feedback.loc[:2, "label"] = 7
    send_feedback(project, "f.csv", feedback, tmp_path)

    summary = ingest_feedback(project, now=NOW)

    assert summary["quarantined"] == {"label_not_allowed": 3} and summary["labelled"] == 17
