import pandas as pd
import pytest

from pipelines.data.replay import month_batch
from pipelines.data.split import LabelCoverageError, run, split_by_hash, split_by_time, split_paths
from pipelines.data.versioning import data_version, version_split
from tests.conftest import make_project


def write_raw(config, *months, rows=2000):
    raw = config.path(config.dataset.raw_path)
    raw.parent.mkdir(parents=True, exist_ok=True)
    pd.concat([month_batch(m, rows=rows) for m in months]).to_parquet(raw, index=False)
    return raw


def test_time_split_puts_every_test_row_after_every_train_row():
    flights = month_batch("2013-05", rows=3000)

    parts = split_by_time(flights, "time_hour", "flight_id", train=0.7, val=0.15)

    times = {name: pd.to_datetime(part["time_hour"]) for name, part in parts.items()}
    # no leakage: the model never trains on a moment later than one it is scored on
    assert times["train"].max() < times["val"].min() <= times["val"].max() < times["test"].min()
    assert sum(len(p) for p in parts.values()) == len(flights)
    assert set(parts["train"]["flight_id"]).isdisjoint(parts["test"]["flight_id"])
    assert 0.6 < len(parts["train"]) / len(flights) < 0.8


def test_too_little_data_to_cut_is_a_clear_error():
    one_hour = month_batch("2013-05", rows=3000).assign(time_hour="2013-05-01T12:00:00Z")

    with pytest.raises(ValueError, match="the train/val split is empty.*land more batches"):
        split_by_time(one_hour, "time_hour", "flight_id", train=0.7, val=0.15)


def test_dvc_split_reruns_only_when_raw_data_changes(project):
    write_raw(project, "2013-01", "2013-02")

    first = version_split(project)
    again = version_split(project)
    write_raw(project, "2013-01", "2013-02", "2013-03")
    grown = version_split(project)

    assert not first["cache_hit"] and again["cache_hit"] and not grown["cache_hit"]
    assert again["data_version"] == first["data_version"]
    assert grown["data_version"]["data/flights/raw.parquet"] != first["data_version"]["data/flights/raw.parquet"]
    assert grown["data_version"] == data_version(project)
    # every version is pushed to the remote: its cache holds the train split's hash
    train_md5 = grown["data_version"]["data/flights/split/train.parquet"]
    remote = project.home / project.versioning.remote
    assert any(train_md5[2:] in p.name for p in remote.rglob("*"))


def test_split_without_raw_data_names_the_missing_file(project):
    with pytest.raises(FileNotFoundError, match="data/flights/raw.parquet: no raw dataset yet"):
        version_split(project)


def test_hash_split_keeps_each_row_in_its_part_as_the_data_grows():
    january = month_batch("2013-01", rows=3000)
    grown = pd.concat([january, month_batch("2013-02", rows=3000)])

    before = split_by_hash(january, "flight_id", seed=13, train=0.7, val=0.15)
    after = split_by_hash(grown, "flight_id", seed=13, train=0.7, val=0.15)

    for part in ("train", "val", "test"):
        assert set(before[part]["flight_id"]) <= set(after[part]["flight_id"]), part
    assert sum(len(p) for p in after.values()) == len(grown)
    assert 0.65 < len(after["train"]) / len(grown) < 0.75
    # another seed is another split
    reseeded = split_by_hash(grown, "flight_id", seed=14, train=0.7, val=0.15)
    assert set(reseeded["test"]["flight_id"]) != set(after["test"]["flight_id"])


def test_two_projects_version_their_data_in_their_own_repositories(tmp_path):
    flights = make_project(tmp_path, name="flights")
    no_time = make_project(tmp_path, {"dataset": {"time_column": None}}, name="hashed")
    write_raw(flights, "2013-01", "2013-02")
    write_raw(no_time, "2013-03")

    versions = {config.name: version_split(config) for config in (flights, no_time)}

    assert set(versions["flights"]["data_version"]) == {f"data/flights/{p}" for p in ("raw.parquet", "split/train.parquet", "split/val.parquet", "split/test.parquet", "split/summary.json")}
    assert all(path.startswith("data/hashed/") for path in versions["hashed"]["data_version"])
    assert (tmp_path / "data" / "flights" / "dvc.lock").is_file() and (tmp_path / "data" / "hashed" / "dvc.lock").is_file()
    # the project without a time column was split by hash: its test rows are not the latest ones
    test = pd.read_parquet(tmp_path / "data" / "hashed" / "split" / "test.parquet")
    train = pd.read_parquet(tmp_path / "data" / "hashed" / "split" / "train.parquet")
    assert test["time_hour"].min() < train["time_hour"].max()
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
