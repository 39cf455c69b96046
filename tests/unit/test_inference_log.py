"""The inference log's writer without a server: when chunks are written, what a failed write
keeps, what it drops, and the rendering that makes a version log (tests/serving has Triton's)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.artifacts import REQUEST_ID
from pipelines.config import ServingProfile
from pipelines.data.replay import month_batch
from pipelines.monitoring.check import read_window
from pipelines.serving import repository
from pipelines.serving.backend.inference_log import STANDARD, InferenceLogWriter, request_keys
from pipelines.serving.client import log_columns, log_dir, read_log, write_log

COLUMNS = {"carrier": pa.string(), "prediction": pa.float32(), "label": pa.int32()}


def rows(n: int, first: int = 0) -> dict:
    return {"carrier": np.array(["AA"] * n, dtype=object), "prediction": np.arange(first, first + n, dtype=np.float32).reshape(-1, 1)}


def chunks(folder) -> list:
    return sorted(folder.rglob("part-*.parquet"))


def wait_for(condition, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_chunk_is_written_at_flush_rows_and_the_rest_at_close(tmp_path):
    writer = InferenceLogWriter(tmp_path, "m", COLUMNS, flush_rows=5, flush_seconds=3600)

    writer.append(rows(3), request_keys("a", 3), 1, time.time(), 2.0)
    time.sleep(0.2)
    assert chunks(tmp_path) == []  # 3 rows < flush_rows, and far from flush_seconds
    writer.append(rows(2, 3), request_keys("b", 2), 1, time.time(), 2.0)
    assert wait_for(lambda: len(chunks(tmp_path)) == 1)
    writer.append(rows(1, 5), ["c"], 2, time.time(), 1.0)
    writer.close()

    logged = pa.concat_tables([pq.read_table(c) for c in chunks(tmp_path)]).to_pandas()
    assert list(logged[REQUEST_ID]) == ["a/0", "a/1", "a/2", "b/0", "b/1", "c"]
    assert list(logged["prediction"]) == [0, 1, 2, 3, 4, 5] and logged["label"].isna().all()  # no label given: blank
    assert list(logged["model_version"]) == [1] * 5 + [2] and set(logged["model"]) == {"m"}
    assert pq.read_schema(chunks(tmp_path)[0]) == pa.schema([*COLUMNS.items(), *STANDARD.items()])
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no partial file left


def test_a_row_waits_at_most_flush_seconds(tmp_path):
    writer = InferenceLogWriter(tmp_path, "m", COLUMNS, flush_rows=1000, flush_seconds=0.2)
    writer.append(rows(1), ["only"], 1, time.time())

    assert wait_for(lambda: len(chunks(tmp_path)) == 1, timeout=3)  # written without close
    writer.close()


def test_rows_are_partitioned_by_the_utc_day_they_were_served(tmp_path):
    midnight = datetime(2026, 3, 2, tzinfo=timezone.utc)
    with InferenceLogWriter(tmp_path, "m", COLUMNS, flush_rows=1000, flush_seconds=3600) as writer:
        writer.append(rows(2), request_keys("late", 2), 1, (midnight - timedelta(seconds=1)).timestamp())
        writer.append(rows(1), ["early"], 1, midnight.timestamp())

    assert sorted(p.parent.name for p in chunks(tmp_path)) == ["date=2026-03-01", "date=2026-03-02"]
    window = read_window(tmp_path, midnight - timedelta(hours=1), midnight + timedelta(hours=1))
    assert sorted(window[REQUEST_ID]) == ["early", "late/0", "late/1"]


def test_a_failed_write_is_kept_and_written_on_the_next_try(tmp_path, monkeypatch):
    writer = InferenceLogWriter(tmp_path, "m", COLUMNS, flush_rows=2, flush_seconds=0.1)
    real, failures = writer.write_chunk, []

    def full_disk_once(day, table):
        if not failures:
            failures.append(day)
            raise OSError(28, "No space left on device")
        return real(day, table)

    monkeypatch.setattr(writer, "write_chunk", full_disk_once)
    writer.append(rows(2), request_keys("x", 2), 1, time.time())

    assert wait_for(lambda: len(chunks(tmp_path)) == 1)
    writer.close()
    assert failures and writer.lost == 0
    assert list(pq.read_table(chunks(tmp_path)[0])[REQUEST_ID].to_pylist()) == ["x/0", "x/1"]


def test_rows_that_cannot_be_written_are_kept_up_to_a_bound_then_counted_lost(tmp_path, monkeypatch):
    writer = InferenceLogWriter(tmp_path, "m", COLUMNS, flush_rows=2, flush_seconds=0.05)
    writer.max_rows = 6
    monkeypatch.setattr(writer, "write_chunk", lambda day, table: (_ for _ in ()).throw(OSError(5, "I/O error")))

    for i in range(5):  # 10 rows, never written
        writer.append(rows(2, 2 * i), request_keys(f"r{i}", 2), 1, time.time())
        time.sleep(0.1)
    writer.close()

    assert writer.lost == 10  # the oldest dropped beyond the bound, the rest at close; every loss counted and logged
    assert chunks(tmp_path) == []


def test_append_never_raises_into_the_request_and_counts_what_it_could_not_take(tmp_path):
    writer = InferenceLogWriter(tmp_path, "m", COLUMNS, flush_rows=10, flush_seconds=3600)

    writer.append(rows(2), ["only one key"], 1, time.time())  # 2 rows, 1 key
    writer.append(rows(1), ["fine"], 1, time.time())
    writer.close()
    writer.append(rows(1), ["after close"], 1, time.time())

    assert writer.lost == 2  # one a key: the mismatched request's, and the one after close
    assert pq.read_table(chunks(tmp_path)[0])[REQUEST_ID].to_pylist() == ["fine"]


def test_written_through_each_append_is_on_disk_when_it_returns(tmp_path):
    writer = InferenceLogWriter(tmp_path, "m", COLUMNS, flush_rows=1000, flush_seconds=3600)
    writer.append(rows(1), ["buffered"], 1, time.time())

    writer.write_through()  # what a SIGTERM does in Triton's backend (model.py)
    assert wait_for(lambda: len(chunks(tmp_path)) == 1)  # the buffer, at once
    writer.append(rows(1), ["answered"], 1, time.time())

    assert len(chunks(tmp_path)) == 2  # no wait: written before append returned
    writer.close()


def test_a_request_s_keys():
    assert request_keys("abc", 1) == ["abc"]
    assert request_keys("abc", 3) == ["abc/0", "abc/1", "abc/2"]
    made = request_keys("", 2)
    assert made[0].endswith("/0") and len(made[0]) == 34 and made[0][:32] == made[1][:32] != request_keys("", 1)[0]


@pytest.mark.parametrize(
    ("profile", "writer_beside", "logged", "answers_keys", "logs"),
    [
        (ServingProfile.cpu, True, True, True, True),
        (ServingProfile.cpu, True, False, True, False),  # the smoke test's rendering
        (ServingProfile.cpu, False, True, False, False),  # a version published before the server logged
        (ServingProfile.gpu, True, True, False, False),  # onnxruntime_onnx: no Python step to log
    ],
)
def test_a_version_logs_in_the_cpu_rendering_where_its_writer_is_beside_it(project, profile, writer_beside, logged, answers_keys, logs):
    files = repository.BACKEND_FILES if writer_beside else {repository.BACKEND_MODEL.name: repository.BACKEND_MODEL}
    version = repository.add_version(project.model_dir, files, {"model": project.model.name})
    serving = project.serving.model_copy(update={"profile": profile})

    rendering = repository.model_config(project.model_dir, serving, project.dataset, version, logged=logged)

    assert (REQUEST_ID in [o.name for o in rendering.output]) == answers_keys
    parameters = {name: value.string_value for name, value in rendering.parameters.items()}
    assert bool(parameters) == logs
    if logs:
        assert parameters == {
            "inference_log": str(log_dir(project.serving, "flights_delay")),
            "inference_log_model": "flights_delay",
            "inference_log_flush_rows": str(project.serving.log.flush_rows),
            "inference_log_flush_seconds": str(project.serving.log.flush_seconds),
        }


def test_the_project_writes_a_window_in_the_server_s_schema(project):
    served_at = datetime(2026, 3, 2, 5, tzinfo=timezone.utc)
    flights = month_batch("2013-02", 30)

    write_log(project, flights.assign(prediction=0.25, label=pd.array([1, None] * 15, dtype="Int32")), 3, served_at)

    logged = read_log(project.serving, project.served_model)
    file = next(log_dir(project.serving, project.served_model).rglob("part-*.parquet"))
    assert pq.read_schema(file) == pa.schema([*log_columns(project).items(), *STANDARD.items()])
    assert len(logged) == 30 and logged[REQUEST_ID].nunique() == 30 and set(logged["model_version"]) == {3}
    assert logged["label"].iloc[0] == 1 and pd.isna(logged["label"].iloc[1])
    assert (logged["served_at"] == pd.Timestamp(served_at)).all() and logged["latency_ms"].isna().all()
    np.testing.assert_array_equal(logged["distance"], flights["distance"].astype("float32"))
