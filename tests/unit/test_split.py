"""The split stage on real flights landed as raw parts: by time or by hash, in bounded memory,
giving exactly what the in-memory split it replaced gave (``bench/inmemory.py``)."""

import pandas as pd
import pytest

from bench import inmemory
from pipelines.data.ingest import append_to_raw
from pipelines.data.replay import month_batch
from pipelines.data.schema import typed
from pipelines.data.split import PARTS, LabelCoverageError, run, split_paths
from pipelines.data.versioning import data_version, version_split
from tests.conftest import make_project

ROWS = 2000


def typed_month(config, month, rows=ROWS):
    """Real flights of ``month`` as ingestion types a passing batch."""
    batch, problems = typed(month_batch(month, rows=rows), config.dataset)
    assert not problems
    return batch


def write_raw(config, *months, rows=ROWS):
    """Each month ingested as its own raw part, as the validate task lands it."""
    for month in months:
        append_to_raw(config.dataset, typed_month(config, month, rows), f"{month}.csv")


def split_files(config):
    return {name: pd.read_parquet(path) for name, path in split_paths(config.split.output_dir).items()}


def old_and_new(config, batches):
    """The parts of the in-memory split on ``batches`` ((name, typed rows) in landing order)
    ingested the old way into one file, and the parts the split stage writes from the same
    batches ingested as parts (read back from its files), with its summary."""
    legacy = config.data_dir / "legacy-raw.parquet"
    for name, batch in batches:
        inmemory.append_to_raw(legacy, config.dataset, batch, name)
        append_to_raw(config.dataset, batch, name)
    old = pd.read_parquet(legacy)
    start = None
    if config.split.window_length:
        count, unit = config.split.window_length
        start = old[config.dataset.time_column].max() - pd.DateOffset(**{unit: count})
        old = old[old[config.dataset.time_column] >= start]
    summary = run(config.dataset, config.split)
    return inmemory.split(old, config.dataset, config.split), split_files(config), summary


def assert_same_parts(expected, got):
    for name in PARTS:
        pd.testing.assert_frame_equal(got[name], expected[name], check_dtype=True, obj=name)


def resending(batch, earlier, rows=1):
    """``batch`` with the first ``rows`` of ``earlier`` sent again, corrected (label flipped)."""
    again = earlier.head(rows).assign(arr_delayed=lambda f: 1 - f["arr_delayed"], distance=lambda f: f["distance"] + 1)
    return pd.concat([batch, again], ignore_index=True)


def test_time_split_gives_the_in_memory_split_on_real_flights(project):
    # Given three months of real flights, with many departures per hour and a January row re-sent in February
    january, february, march = (typed_month(project, m) for m in ("2013-01", "2013-02", "2013-03"))
    assert january["time_hour"].duplicated().any()
    batches = [("2013-01.csv", january), ("2013-02.csv", resending(february, january)), ("2013-03.csv", march)]

    # When both implementations split them
    expected, got, summary = old_and_new(project, batches)

    # Then every part holds the same rows in the same order, of the same types; the re-sent row once, corrected
    assert_same_parts(expected, got)
    assert "_batch" not in got["train"].columns
    resent = pd.concat(got.values()).set_index("flight_id").loc[january["flight_id"].iloc[0]]
    assert isinstance(resent, pd.Series) and resent["arr_delayed"] == 1 - january["arr_delayed"].iloc[0]
    # no leakage: the model never trains on a moment later than one it is scored on
    assert got["train"]["time_hour"].max() < got["val"]["time_hour"].min() <= got["val"]["time_hour"].max() < got["test"]["time_hour"].min()
    assert summary == {
        name: {"rows": len(part), "from": str(part["time_hour"].min()), "to": str(part["time_hour"].max()), "label_mean": round(float(part["arr_delayed"].mean()), 6)}
        for name, part in expected.items()
    }


@pytest.mark.parametrize("dataset", [{"time_column": None}, {"time_column": None, "id_column": None}], ids=["by id", "by row hash"])
def test_hash_split_gives_the_in_memory_split_on_real_flights(tmp_path, dataset):
    # Given real flights of a project without a time column (keyed by its id, or by each row's hash)
    config = make_project(tmp_path, {"dataset": dataset})
    january, february = (typed_month(config, m) for m in ("2013-01", "2013-02"))

    expected, got, _ = old_and_new(config, [("2013-01.csv", january), ("2013-02.csv", resending(february, january))])

    assert_same_parts(expected, got)
    # the corrected row replaces its first copy by id; keyed by the row's hash, it is another row
    corrected_is_new = "id_column" in dataset
    assert sum(map(len, got.values())) == len(january) + len(february) + corrected_is_new


def test_window_splits_only_the_latest_rows_at_the_configured_fractions(tmp_path):
    # Given three months of flights and a one-month window
    config = make_project(tmp_path, {"split": {"window": "1 month"}})
    january, february, march = (typed_month(config, m, rows=1000) for m in ("2013-01", "2013-02", "2013-03"))
    # (calendar months: the newest departure less one month) and two February flights on either side of that bound
    start = march["time_hour"].max() - pd.DateOffset(months=1)
    february.loc[[0, 1], "time_hour"] = [start, start - pd.Timedelta(seconds=1)]
    batches = [("2013-01.csv", january), ("2013-02.csv", february), ("2013-03.csv", march)]

    expected, got, summary = old_and_new(config, batches)

    # Then the parts are the in-memory split of the rows since the bound, and no older row is in any
    assert_same_parts(expected, got)
    every = pd.concat([january, february, march])
    older = every[every["time_hour"] < start]
    split = pd.concat(got.values())
    assert len(older) >= 1999 and not split["flight_id"].isin(older["flight_id"]).any()
    assert february["flight_id"][0] in set(split["flight_id"])
    assert len(split) == len(every) - len(older) and split["time_hour"].min() >= start
    # the fractions apply within the window
    assert 0.6 < summary["train"]["rows"] / len(split) < 0.8


def test_parts_of_differing_label_types_give_what_pandas_concat_gives(project):
    # Given a whole-numbered label in January's part and one with a blank (typed float) in February's
    january = typed_month(project, "2013-01", rows=500)
    february = typed_month(project, "2013-02", rows=500).pipe(lambda f: f.assign(arr_delayed=f["arr_delayed"].where(f.index != 3)))
    assert january["arr_delayed"].dtype == "int64" and february["arr_delayed"].dtype == "float64"

    expected, got, _ = old_and_new(project, [("2013-01.csv", january), ("2013-02.csv", february)])

    assert_same_parts(expected, got)
    assert got["train"]["arr_delayed"].dtype == "float64"


def test_too_little_data_to_cut_by_time_is_a_clear_error(project):
    one_hour = typed_month(project, "2013-05", rows=500).assign(time_hour=pd.Timestamp("2013-05-01T12:00:00Z"))
    append_to_raw(project.dataset, one_hour, "2013-05.csv")

    with pytest.raises(ValueError, match="cannot cut 500 rows spanning 1 distinct time_hour values by time: the train/val split is empty; land more batches"):
        run(project.dataset, project.split)
    assert not any(path.exists() for path in split_paths(project.split.output_dir).values())


def test_too_few_rows_to_split_by_hash_is_a_clear_error(tmp_path):
    config = make_project(tmp_path, {"dataset": {"time_column": None}})
    append_to_raw(config.dataset, typed_month(config, "2013-05", rows=1), "2013-05.csv")

    with pytest.raises(ValueError, match=r"cannot split 1 rows by hash: the \w+/\w+ split is empty; land more rows"):
        run(config.dataset, config.split)


def test_split_without_raw_data_names_the_missing_directory(project):
    with pytest.raises(FileNotFoundError, match="data/flights/raw: no raw dataset yet"):
        run(project.dataset, project.split)


def test_hash_split_keeps_each_row_in_its_part_as_the_data_grows(tmp_path):
    config = make_project(tmp_path, {"dataset": {"time_column": None}})
    write_raw(config, "2013-01")
    run(config.dataset, config.split)
    before = split_files(config)
    write_raw(config, "2013-02")
    run(config.dataset, config.split)
    after = split_files(config)

    for part in PARTS:
        assert set(before[part]["flight_id"]) <= set(after[part]["flight_id"]), part
    assert 0.65 < len(after["train"]) / (2 * ROWS) < 0.75
    # another seed is another split
    reseeded = make_project(tmp_path / "reseeded", {"dataset": {"time_column": None}, "split": {"seed": 14}})
    write_raw(reseeded, "2013-01", "2013-02")
    run(reseeded.dataset, reseeded.split)
    assert set(split_files(reseeded)["test"]["flight_id"]) != set(after["test"]["flight_id"])


def test_dvc_split_reruns_only_when_raw_data_changes(project):
    write_raw(project, "2013-01", "2013-02")

    first = version_split(project)
    again = version_split(project)
    write_raw(project, "2013-03")
    grown = version_split(project)

    assert not first["cache_hit"] and again["cache_hit"] and not grown["cache_hit"]
    assert again["data_version"] == first["data_version"]
    assert grown["data_version"]["data/flights/raw"] != first["data_version"]["data/flights/raw"]
    assert grown["data_version"] == data_version(project)
    # every version is pushed to the remote: its cache holds the train split's hash
    train_md5 = grown["data_version"]["data/flights/split/train.parquet"]
    remote = project.home / project.versioning.remote
    assert any(train_md5[2:] in p.name for p in remote.rglob("*"))


def test_dvc_split_without_raw_data_names_the_missing_directory(project):
    with pytest.raises(FileNotFoundError, match="data/flights/raw: no raw dataset yet"):
        version_split(project)


def test_two_projects_version_their_data_in_their_own_repositories(tmp_path):
    flights = make_project(tmp_path, name="flights")
    no_time = make_project(tmp_path, {"dataset": {"time_column": None}}, name="hashed")
    write_raw(flights, "2013-01", "2013-02")
    write_raw(no_time, "2013-03", "2013-04")

    versions = {config.name: version_split(config) for config in (flights, no_time)}

    assert set(versions["flights"]["data_version"]) == {f"data/flights/{p}" for p in ("raw", "split/train.parquet", "split/val.parquet", "split/test.parquet", "split/summary.json")}
    assert all(path.startswith("data/hashed/") for path in versions["hashed"]["data_version"])
    assert (tmp_path / "data" / "flights" / "dvc.lock").is_file() and (tmp_path / "data" / "hashed" / "dvc.lock").is_file()
    # the project without a time column was split by hash: its test rows are not the latest ones
    test = pd.read_parquet(tmp_path / "data" / "hashed" / "split" / "test.parquet")
    train = pd.read_parquet(tmp_path / "data" / "hashed" / "split" / "train.parquet")
    assert test["month"].min() < train["month"].max()
    # nothing was copied into the home by hand: no stage file at its top
    assert not (tmp_path / "dvc.yaml").exists()


def test_training_refuses_a_class_without_training_rows_naming_its_count_per_split(project):
    # Given real flights split by time, whose train part lost every delayed flight upstream
    from pipelines.training.train import train

    write_raw(project, "2013-01", "2013-02", rows=500)
    run(project.dataset, project.split)
    train_file = split_paths(project.split.output_dir)["train"]
    pd.read_parquet(train_file).query("arr_delayed == 0").to_parquet(train_file, index=False)

    # Then training refuses before fitting, naming the label and where its rows are
    with pytest.raises(LabelCoverageError, match=r"flights: label '1' has no training records \(train 0, val [1-9]\d*, test [1-9]\d*\); the train split holds 1 label"):
        train(project, {})
