"""The one way a step marks what a retry cannot fix, for every DAG."""

import pytest
from airflow.exceptions import AirflowFailException

from pipelines import steps
from pipelines.config import ConfigError
from pipelines.errors import NotRetryable
from tests.conftest import make_project


def test_a_not_retryable_error_fails_the_task_at_once_with_its_message():
    def refuse():
        raise ConfigError("projects/x/params.yaml: train.max_epoch: Extra inputs are not permitted")

    with pytest.raises(AirflowFailException, match=r"train\.max_epoch: Extra inputs are not permitted \[ConfigError: not retried") as failed:
        steps.run(refuse)
    assert isinstance(failed.value.__cause__, NotRetryable)


def test_a_transient_error_keeps_the_tasks_retries():
    def flaky():
        raise ConnectionRefusedError("Triton at 127.0.0.1:8000 is not reachable")

    with pytest.raises(ConnectionRefusedError):
        steps.run(flaky)


def test_a_broken_project_config_fails_the_first_task_without_retries(tmp_path, monkeypatch):
    config = make_project(tmp_path)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    params = config.project_dir / "params.yaml"
    params.write_text(params.read_text().replace("max_epochs:", "max_epoch:"))

    with pytest.raises(AirflowFailException, match=r"train\.max_epoch"):
        steps.run(steps.check_params, config.name, False, "")


def test_an_unknown_project_is_named_with_the_known_ones(tmp_path, monkeypatch):
    make_project(tmp_path)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))

    with pytest.raises(AirflowFailException, match=r"projects/boats/params.yaml: no such file; the projects of .* are \['flights'\]"):
        steps.run(steps.validate, "boats")


def test_a_run_trains_only_on_new_data_or_when_a_param_asks(project, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(project.home))
    from pipelines.lineage import write_json
    from pipelines.serving.publish import run_record_path

    version = {"data/flights/raw.parquet": "a", "data/flights/split/train.parquet": "t"}
    none_set = {"reason": "", "force_publish": False, "force_reason": "", "max_epochs": None, "learning_rate": None, "hyperparameters": {}, "confirm_batches": []}  # the form's defaults
    assert steps.needs_training("flights", version, none_set) == {"train": True, "reason": "no run has trained this project yet"}

    record = {"data_version": version, "airflow": {"run_id": "night1"}, "created_at": "2026-11-30T02:00:00+00:00", "gate": {"decision": "promoted"}}
    write_json(run_record_path(project.artifacts_dir, "night1"), record)

    same = steps.needs_training("flights", version, none_set)
    assert not same["train"] and "nothing new: run night1 (2026-11-30T02:00:00+00:00) trained on these splits" in same["reason"]
    # a batch re-sent as it was changes the raw data, not the splits: still nothing new
    assert not steps.needs_training("flights", version | {"data/flights/raw.parquet": "b"}, none_set)["train"]
    changed = version | {"data/flights/split/train.parquet": "u"}
    assert steps.needs_training("flights", changed, none_set) == {"train": True, "reason": "the data changed since run night1"}
    assert steps.needs_training("flights", version, none_set | {"max_epochs": 3}) == {"train": True, "reason": "the run's Params set ['max_epochs']"}
    assert steps.needs_training("flights", version, none_set | {"hyperparameters": {"dropout": 0.2}})["train"]  # what tune__flights proposes


# --- the audit trail of a person's runs ------------------------------------------------------

MANUAL = {"dag_id": "rollback__flights", "run_id": "manual__2026-11-30T10:00:00+00:00", "run_type": "manual", "logical_date": None, "user": "oncall-alice"}


@pytest.fixture
def two_versions(tmp_path, monkeypatch):
    """flights with versions 1 and 2 in its repository, 2 serving after 1 (no Triton: the repository only)."""
    from pipelines.artifacts import MODEL_FILE
    from pipelines.serving import live, repository

    config = make_project(tmp_path)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    model = tmp_path / MODEL_FILE
    model.write_bytes(b"stands for a model: a rollback without Triton switches the config only")
    for version in (1, 2):
        repository.add_version(config.model_dir, {MODEL_FILE: model, **repository.BACKEND_FILES}, {"export": {}})
        repository.write_model_config(config.model_dir, repository.model_config(config.model_dir, config.serving, config.dataset, version))
        live.record(config, "publish", version, version - 1 or None, {**MANUAL, "dag_id": "retrain__flights"})
    return config


def test_a_persons_retrain_is_audited_with_the_user_airflow_names_and_a_scheduled_one_is_not(tmp_path, monkeypatch):
    from pipelines import audit

    config = make_project(tmp_path)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    run = {**MANUAL, "dag_id": "retrain__flights"}

    steps.check_params("flights", False, "", {**run, "run_type": "scheduled", "user": None}, "")
    steps.check_params("flights", False, "", run, "dest drifted after the timetable change")

    (entry,) = audit.read(config)[0]
    assert (entry["action"], entry["user"], entry["reason"], entry["run_id"]) == ("retrain", "oncall-alice", "dest drifted after the timetable change", run["run_id"])


def test_a_persons_rollback_is_audited_with_its_outcome_a_refused_one_as_failed_and_an_alerts_not_at_all(two_versions):
    from pipelines import audit
    from pipelines.serving.rollback import RollbackRefused

    steps.rollback("flights", 1, MANUAL, "v2 misroutes late flights")
    steps.rollback("flights", 1, MANUAL, "  ")  # a retry, say: the version already serves, and no reason was given
    steps.rollback("flights", 2, {**MANUAL, "run_id": "alert__0f3a__2026-11-30T10_01_00Z", "user": "admin"}, "FlywheelCanaryErrors: ...")  # Alertmanager's, not a person's
    with pytest.raises(RollbackRefused):
        steps.rollback("flights", 7, MANUAL, "a version that does not exist")

    done, again, refused = audit.read(two_versions)[0]
    assert again["reason"] == steps.NO_REASON and again["outcome"]
    assert (done["action"], done["user"], done["reason"], done["outcome"]) == ("rollback", "oncall-alice", "v2 misroutes late flights", "v1 serves (was v2)")
    assert refused["outcome"].startswith("failed: RollbackRefused:") and "7" in refused["outcome"]


def test_an_approval_names_who_answered_for_the_audit_trail_and_nobody_on_a_timeout():
    response = {"chosen_options": ["Approve"], "responded_by_user": {"id": "7", "name": "bob"}, "responded_at": "2026-11-30T10:05:00+00:00", "params_input": {"comment": "card reviewed"}}
    approval = steps.approval_record(response)
    assert approval["user"] == "bob" and approval["summary"] == "Approve by bob at 2026-11-30T10:05:00+00:00: card reviewed"
    assert steps.approval_record({"chosen_options": ["Reject"], "responded_by_user": None})["user"] is None
