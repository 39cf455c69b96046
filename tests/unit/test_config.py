from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, FeatureType, Task, load_config
from tests.conftest import REPO, make_project


def write_params(home: Path, mutate) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(params)
    home.mkdir(parents=True, exist_ok=True)
    (home / "params.yaml").write_text(yaml.safe_dump(params))
    return home


def test_committed_params_load_into_typed_sections():
    config = load_config(REPO)

    assert config.dataset.label.task is Task.classification
    assert config.dataset.columns_of(FeatureType.categorical) == ["carrier", "origin", "dest"]
    assert config.model_dir == REPO / "model_repository" / "flights_delay"


def test_a_misspelt_key_is_an_error_that_names_it(tmp_path):
    home = write_params(tmp_path, lambda p: p["train"].update(max_epoch=3))

    with pytest.raises(ConfigError, match=r"train\.max_epoch: Extra inputs are not permitted"):
        load_config(home)


def test_split_fractions_must_sum_to_one(tmp_path):
    home = write_params(tmp_path, lambda p: p["split"].update(test=0.3))

    with pytest.raises(ConfigError, match="must be 1, got 1.15"):
        load_config(home)


def test_a_metric_of_the_wrong_task_is_refused(tmp_path):
    home = write_params(tmp_path, lambda p: p["gate"].update(metric="rmse"))

    with pytest.raises(ConfigError, match="'rmse' does not apply to a classification label"):
        load_config(home)


def test_the_label_cannot_also_be_a_feature(tmp_path):
    home = write_params(tmp_path, lambda p: p["dataset"]["features"].append({"name": "arr_delayed", "type": "numeric"}))

    with pytest.raises(ConfigError, match=r"must not include the id, time or label column: \['arr_delayed'\]"):
        load_config(home)


def test_a_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}/params.yaml: no such file"):
        load_config(tmp_path)


def test_relative_paths_resolve_against_the_project_home(tmp_path):
    config = make_project(tmp_path / "elsewhere")

    assert config.path(config.dataset.raw_path) == tmp_path / "elsewhere" / "data/raw/flights.parquet"


def test_the_compose_deployment_overrides_serving_and_metrics_and_keeps_the_rest(tmp_path, monkeypatch):
    from pipelines.config import OVERRIDES_ENV, ServingProfile

    plain = load_config(REPO)
    # docker-compose.yml's inline `flywheel-params` config, which its Airflow containers mount
    overrides = tmp_path / "params.compose.yaml"
    overrides.write_text(yaml.safe_load((REPO / "docker-compose.yml").read_text())["configs"]["flywheel-params"]["content"])
    monkeypatch.setenv(OVERRIDES_ENV, str(overrides))

    config = load_config(REPO)

    assert config.serving.profile is ServingProfile.gpu
    assert config.serving.triton.url == "triton:8000" and config.metrics.pushgateway == "pushgateway:9091"
    # untouched keys of a changed section, and whole other sections, stay as params.yaml has them
    assert config.serving.triton.metrics_port == 8002 and config.serving.max_batch_size == plain.serving.max_batch_size
    assert config.model_dump(exclude={"serving", "metrics"}) == plain.model_dump(exclude={"serving", "metrics"})


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"serving": {"profil": "gpu"}}, r"serving\.profil: Extra inputs are not permitted"),
        ({"serving": {"profile": "tpu"}}, r"serving\.profile: Input should be 'cpu' or 'gpu'"),
        ({"split": {"train": 0.8}}, r"split cannot be overridden \(DVC reads them from .*params.yaml\)"),
        ({"dataset": {"raw_path": "x"}}, r"dataset cannot be overridden"),
    ],
)
def test_a_bad_override_is_an_error_that_names_the_override_file_and_the_key(tmp_path, monkeypatch, overrides, error):
    from pipelines.config import OVERRIDES_ENV

    file = tmp_path / "overrides.yaml"
    file.write_text(yaml.safe_dump(overrides))
    monkeypatch.setenv(OVERRIDES_ENV, str(file))

    with pytest.raises(ConfigError, match=f"{file}: {error}"):
        load_config(REPO)


def test_a_missing_override_file_is_named(tmp_path, monkeypatch):
    from pipelines.config import OVERRIDES_ENV

    monkeypatch.setenv(OVERRIDES_ENV, str(tmp_path / "nope.yaml"))

    with pytest.raises(ConfigError, match=f"{tmp_path}/nope.yaml: no such file; {OVERRIDES_ENV} names it"):
        load_config(REPO)
