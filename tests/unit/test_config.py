import re
from pathlib import Path

import pytest
import yaml

from pipelines.config import (
    ROW_ID,
    ConfigError,
    FeatureType,
    ProjectKind,
    Task,
    TextProjectConfig,
    load_config,
    load_deployment,
    load_project,
    project_kinds,
)
from tests.conftest import REPO, make_home, make_project


def write_params(home: Path, mutate, name: str = "flights") -> Path:
    """A deployment home with one project: the repository's flights params, changed by ``mutate``."""
    params = yaml.safe_load((REPO / "projects" / "flights" / "params.yaml").read_text())
    mutate(params)
    make_home(home)
    (home / "projects" / name).mkdir(parents=True, exist_ok=True)
    (home / "projects" / name / "params.yaml").write_text(yaml.safe_dump(params))
    return home


def test_committed_projects_load_into_typed_sections():
    flights = load_config("flights", REPO)
    reviews = load_project("reviews", REPO)

    # (make demo adds a diamonds project beside them in the checkout, ignored by git)
    assert project_kinds(REPO).items() >= {"flights": ProjectKind.tabular, "reviews": ProjectKind.text}.items()
    assert flights.dataset.label.task is Task.classification
    assert flights.dataset.columns_of(FeatureType.categorical) == ["carrier", "origin", "dest"]
    assert flights.model_dir == REPO / "model_repository" / "flights_delay"
    assert isinstance(reviews, TextProjectConfig) and reviews.served_model == "reviews_sentiment"


def test_state_lives_in_folders_named_after_the_project(tmp_path):
    config = make_project(tmp_path, name="taxis")

    assert config.path(config.dataset.landing_dir) == tmp_path / "landing" / "taxis"
    assert config.path(config.dataset.raw_path) == tmp_path / "data" / "taxis" / "raw"
    assert config.path(config.split.output_dir) == tmp_path / "data" / "taxis" / "split"
    assert config.path(config.dataset.expectation_suite) == tmp_path / "projects" / "taxis" / "expectations.json"
    assert config.path(config.artifacts_dir) == tmp_path / "artifacts" / "taxis"
    assert config.dataset.name == "taxis"


def test_a_project_without_id_or_time_keys_rows_by_a_derived_id(tmp_path):
    def no_keys(params):
        del params["dataset"]["id_column"], params["dataset"]["time_column"]

    config = load_config("flights", write_params(tmp_path, no_keys))

    assert config.dataset.key == ROW_ID
    assert config.dataset.columns == [f.name for f in config.dataset.features] + ["arr_delayed"]


def test_a_misspelt_key_is_an_error_that_names_the_file_and_the_key(tmp_path):
    home = write_params(tmp_path, lambda p: p["train"].update(max_epoch=3))

    with pytest.raises(ConfigError, match=r"projects/flights/params.yaml: train\.max_epoch: Extra inputs are not permitted"):
        load_config("flights", home)


def test_split_fractions_must_sum_to_one(tmp_path):
    home = write_params(tmp_path, lambda p: p["split"].update(test=0.3))

    with pytest.raises(ConfigError, match="must be 1, got 1.15"):
        load_config("flights", home)


def test_a_metric_of_the_wrong_task_is_refused(tmp_path):
    home = write_params(tmp_path, lambda p: p["gate"].update(metric="rmse"))

    with pytest.raises(ConfigError, match="'rmse' does not apply to a classification label"):
        load_config("flights", home)


def test_the_label_cannot_also_be_a_feature(tmp_path):
    home = write_params(tmp_path, lambda p: p["dataset"]["features"].append({"name": "arr_delayed", "type": "numeric"}))

    with pytest.raises(ConfigError, match=r"must not include the id, time or label column \(or 'row_id', '_batch'\): \['arr_delayed'\]"):
        load_config("flights", home)


def test_versioned_data_must_stay_inside_the_projects_dvc_repository(tmp_path):
    home = write_params(tmp_path, lambda p: p["dataset"].update(raw_path="elsewhere/raw.parquet"))

    with pytest.raises(ConfigError, match=r"dataset.raw_path: elsewhere/raw.parquet must lie inside data_dir data/flights"):
        load_config("flights", home)


def test_an_unknown_project_names_the_known_ones_and_how_to_add_one(tmp_path):
    home = make_project(tmp_path).home

    with pytest.raises(ConfigError, match=r"projects/taxis/params.yaml: no such file; the projects of .* are \['flights'\]; `flywheel init taxis"):
        load_config("taxis", home)


def test_a_project_name_that_is_not_a_name_is_refused_before_any_path_is_built(tmp_path):
    with pytest.raises(ConfigError, match="a project name is lowercase letters"):
        load_project("../flights", tmp_path)


def test_a_text_project_is_refused_where_a_tabular_one_is_needed():
    with pytest.raises(ConfigError, match="project 'reviews' is a text project; this needs a tabular one"):
        load_config("reviews", REPO)


def test_a_projects_own_setting_wins_over_the_deployment_defaults(tmp_path):
    config = make_project(tmp_path, {"serving": {"max_batch_size": 64}})

    assert config.serving.max_batch_size == 64
    assert load_deployment(tmp_path).serving.max_batch_size == 4096


def test_the_compose_deployment_overrides_serving_and_metrics_and_keeps_the_rest(tmp_path, monkeypatch):
    from pipelines.config import OVERRIDES_ENV, ServingProfile

    plain = load_config("flights", REPO)
    # docker-compose.yml's inline `flywheel-params` config, which its Airflow containers mount
    overrides = tmp_path / "params.compose.yaml"
    content = yaml.safe_load((REPO / "docker-compose.yml").read_text())["configs"]["flywheel-params"]["content"]
    # what compose interpolates: ${VAR:-default} from .env (here: its default), ${VAR:?} a required secret
    content = re.sub(r"\$\{\w+:\?\}", "secret", re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", content))
    overrides.write_text(content)
    monkeypatch.setenv(OVERRIDES_ENV, str(overrides))

    config = load_config("flights", REPO)

    assert config.serving.profile is ServingProfile.gpu
    assert config.serving.triton.url == "triton:8000" and config.metrics.pushgateway == "pushgateway:9091"
    assert load_deployment(REPO).serving.triton.url == "triton:8000"
    # untouched keys of a changed section, and whole other sections, stay as the project files have them
    assert config.serving.triton.metrics_port == 8002 and config.serving.max_batch_size == plain.serving.max_batch_size
    assert config.monitoring.alertmanager == "alertmanager:9093"  # acknowledgements silence drift alerts there
    assert config.monitoring.model_dump(exclude={"alertmanager"}) == plain.monitoring.model_dump(exclude={"alertmanager"})
    # training logs to the mlflow service; studies live in PostgreSQL's optuna database
    assert (config.tracking.uri, config.tracking.ui_url) == ("http://mlflow:5000", "http://localhost:5000")
    assert config.tracking.study_storage == "postgresql+psycopg2://secret:secret@postgres:5432/optuna"
    assert config.model_dump(exclude={"serving", "metrics", "monitoring", "tracking"}) == plain.model_dump(exclude={"serving", "metrics", "monitoring", "tracking"})


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"serving": {"profil": "gpu"}}, r"serving\.profil: Extra inputs are not permitted"),
        ({"serving": {"profile": "tpu"}}, r"serving\.profile: Input should be 'cpu' or 'gpu'"),
        ({"split": {"train": 0.8}}, r"split cannot be overridden \(DVC versions them with the data\)"),
        ({"dataset": {"raw_path": "x"}}, r"dataset cannot be overridden"),
    ],
)
def test_a_bad_override_is_an_error_that_names_the_override_file_and_the_key(tmp_path, monkeypatch, overrides, error):
    from pipelines.config import OVERRIDES_ENV

    file = tmp_path / "overrides.yaml"
    file.write_text(yaml.safe_dump(overrides))
    monkeypatch.setenv(OVERRIDES_ENV, str(file))

    with pytest.raises(ConfigError, match=f"{file}.*{error}"):
        load_config("flights", REPO)


def test_a_missing_override_file_is_named(tmp_path, monkeypatch):
    from pipelines.config import OVERRIDES_ENV

    monkeypatch.setenv(OVERRIDES_ENV, str(tmp_path / "nope.yaml"))

    with pytest.raises(ConfigError, match=f"{tmp_path}/nope.yaml: no such file; {OVERRIDES_ENV} names it"):
        load_config("flights", REPO)


def test_acknowledgements_record_only_unless_an_alertmanager_is_set_and_silence_for_12_hours(tmp_path):
    shipped = load_config("flights", REPO)
    configured = make_project(tmp_path, {"monitoring": {"alertmanager": "alertmanager:9093", "acknowledge_hours": 2.5}})

    assert (shipped.monitoring.alertmanager, shipped.monitoring.acknowledge_hours) == (None, 12)
    assert (configured.monitoring.alertmanager, configured.monitoring.acknowledge_hours) == ("alertmanager:9093", 2.5)


@pytest.mark.parametrize("hours", [0, -1])
def test_an_acknowledgement_silences_for_a_positive_period(tmp_path, hours):
    home = write_params(tmp_path, lambda p: p["monitoring"].update(acknowledge_hours=hours))

    with pytest.raises(ConfigError, match=r"monitoring\.acknowledge_hours: Input should be greater than 0"):
        load_config("flights", home)


@pytest.mark.parametrize(("window", "length"), [("12 months", (12, "months")), ("1 Year", (1, "years")), (" 90 DAYS ", (90, "days")), ("8 week", (8, "weeks"))])
def test_a_training_window_is_a_count_and_a_unit_in_any_case(tmp_path, window, length):
    home = write_params(tmp_path, lambda p: p["split"].update(window=window))

    assert load_config("flights", home).split.window_length == length


@pytest.mark.parametrize("window", ["0 days", "3 fortnights", "months", "-1 years", "1.5 months"])
def test_a_training_window_that_is_not_a_count_and_a_unit_is_refused_naming_the_key(tmp_path, window):
    home = write_params(tmp_path, lambda p: p["split"].update(window=window))

    with pytest.raises(ConfigError, match=rf"split\.window: split\.window must be a count and a unit such as .*got '{re.escape(window)}'"):
        load_config("flights", home)


def test_a_training_window_without_a_time_column_points_to_max_rows_without_a_placeholder_location(tmp_path):
    def no_time(params):
        params["dataset"]["time_column"] = None
        params["split"].update(window="12 months")

    home = write_params(tmp_path, no_time)

    with pytest.raises(ConfigError, match=r"params\.yaml: split\.window '12 months' needs dataset\.time_column; without one, cap training with train\.max_rows$"):
        load_config("flights", home)
