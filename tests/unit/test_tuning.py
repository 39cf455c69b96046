"""The Optuna search of tune__<project>, without a scheduler: refusals before any trial, lanes on a
shared SQLite study, pruning, failed trials, and the best trial proposed as hyperparameters."""

import json

import optuna
import pytest

from pipelines.data.split import split_paths
from pipelines.data.versioning import version_split
from pipelines.training.train import with_hyperparameters
from pipelines.tuning import TuneError, best, check, run_lane, settings
from tests.conftest import make_project
from tests.unit.test_split import write_raw

RUN = {"dag_id": "tune__flights", "run_id": "manual__t1", "run_type": "manual", "logical_date": None}
# Small and quick: 2 epochs a trial, two dimensions.
SPACE = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "hidden_sizes": {"type": "categorical", "choices": [[16], [64, 32]]},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    config = make_project(tmp_path_factory.mktemp("tune") / "home", {"tune": {"max_epochs": 2, "pruner": {"n_startup_trials": 1}}})
    write_raw(config, "2013-01", rows=2500)
    version_split(config)
    return config


def run_all(config, params, run=RUN):
    lanes = check(config, params, run)
    results = [run_lane(config, lane, run) for lane in lanes]  # Airflow runs these in parallel
    return lanes, results, best(config, lanes[0], run)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"space": {"learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}}, "low < high"),
        ({"space": {"learning_rate": {"type": "float", "low": 0, "high": 0.1, "log": True}}}, "low > 0"),
        ({"space": {"hidden_sizes": {"type": "categorical", "choices": []}}}, "non-empty `choices`"),
        ({"space": {"momentum": {"type": "float", "low": 0.1, "high": 0.9}}}, "not tunable"),
        ({"space": {"dropout": {"type": "float", "low": 0.1, "high": 1.5}}}, "space.dropout allows 1.5"),
        ({"space": {"batch_size": {"type": "categorical", "choices": [64, "big"]}}}, "space.batch_size allows 'big'"),
        ({"space": {"batch_size": {"type": "float", "low": 256, "high": 2048}}}, "space.batch_size allows 853.33"),
        ({"n_trials": 0}, "n_trials"),
        ({"timeout_minutes": 0}, "timeout_minutes"),
        ({"parallelism": 0}, "parallelism"),
        ({"study": "../etc"}, "study name '../etc'"),
    ],
)
def test_a_bad_run_is_refused_before_any_trial_naming_what_is_wrong(project, params, expected):
    with pytest.raises(TuneError, match=expected):
        check(project, {"space": SPACE, "study": "refused"} | params, RUN)
    assert "refused" not in studies(project)  # refused before the study was made


def studies(config):
    db = config.home / "artifacts" / "optuna.db"
    return {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{db}")} if db.exists() else set()


def test_an_empty_configured_space_is_refused(project):
    empty = project.model_copy(update={"tune": project.tune.model_copy(update={"space": {}})})
    with pytest.raises(TuneError, match="search space is empty"):
        settings(empty, {})


def test_trials_run_in_lanes_on_one_study_and_the_best_is_proposed_as_hyperparameters(project):
    lanes, results, proposal = run_all(project, {"n_trials": 5, "parallelism": 2, "space": SPACE, "study": "lanes"})

    # 5 trials over 2 lanes: 3 and 2, every trial in the one study
    assert [lane["lane"] for lane in lanes] == [[0, 3], [1, 2]]
    assert sorted(n for r in results for n in map(int, r["trials"])) == [0, 1, 2, 3, 4]
    study = optuna.load_study(study_name="lanes", storage=f"sqlite:///{project.home / 'artifacts' / 'optuna.db'}")
    assert len(study.trials) == 5 and study.user_attrs["flywheel.space"] == SPACE
    # trial 0 is params.yaml's own settings, so the search is measured against them
    assert study.trials[0].params == {"learning_rate": project.train.learning_rate, "hidden_sizes": json.dumps(list(project.model.hidden_sizes))}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    top = min(complete, key=lambda t: t.value)
    assert proposal["hyperparameters"]["learning_rate"] == top.params["learning_rate"]
    assert proposal["hyperparameters"]["hidden_sizes"] == json.loads(top.params["hidden_sizes"])  # a list again, as training takes it
    with_hyperparameters(project, proposal["hyperparameters"])  # what retrain's Param receives trains
    assert f"best trial #{top.number}" in proposal["reason"] and "params.yaml" in proposal["reason"]
    record = json.loads((project.home / proposal["lineage"]).read_text())
    assert record["best"]["trial"] == top.number and record["baseline"]["trial"] == 0
    assert len(record["trials"]) == 5 and record["storage"] == "sqlite"
    assert sum(record["this_run"].values()) == 5


def test_a_trial_worse_than_the_median_at_an_epoch_is_pruned(project):
    # Forced: after the baseline (params.yaml's settings, trial 0) come three trials whose learning
    # rate barely moves the weights, so their first epoch's val_loss is above the baseline's, the
    # median of the completed trials (the fixture's pruner starts after 1 completed trial).
    storage = f"sqlite:///{project.home / 'artifacts' / 'optuna.db'}"
    lanes = check(project, {"n_trials": 4, "parallelism": 1, "space": SPACE, "study": "pruning"}, RUN)
    study = optuna.load_study(study_name="pruning", storage=storage)
    for rate in (1e-6, 1e-6, 1e-6):
        study.enqueue_trial({"learning_rate": rate, "hidden_sizes": json.dumps([16])})
    run_lane(project, lanes[0], RUN)

    states = [t.state.name for t in optuna.load_study(study_name="pruning", storage=storage).trials]
    assert states == ["COMPLETE", "PRUNED", "PRUNED", "PRUNED"], states
    assert best(project, lanes[0], RUN)["counts"]["PRUNED"] >= 1


def test_a_failing_trial_is_recorded_and_the_others_go_on_and_none_completing_fails_the_run(project):
    val = split_paths(project.split.output_dir)["val"]
    kept = val.read_bytes()
    run = RUN | {"run_id": "manual__broken"}
    lanes = check(project, {"n_trials": 2, "parallelism": 2, "space": SPACE, "study": "failing"}, run)
    try:
        val.write_bytes(b"not parquet")  # a real fault: the split is unreadable while lane 0 runs
        first = run_lane(project, lanes[0], run)
    finally:
        val.write_bytes(kept)
    second = run_lane(project, lanes[1], run)

    assert list(first["trials"].values()) == ["FAIL"] and list(second["trials"].values()) == ["COMPLETE"]
    assert best(project, lanes[0], run)["counts"] == {"COMPLETE": 1, "PRUNED": 0, "FAIL": 1, "RUNNING": 0, "WAITING": 0}

    # a run whose every trial fails says so, with the first error
    again = RUN | {"run_id": "manual__all_broken"}
    lanes = check(project, {"n_trials": 1, "parallelism": 1, "space": SPACE, "study": "failing"}, again)
    try:
        val.write_bytes(b"not parquet")
        run_lane(project, lanes[0], again)
    finally:
        val.write_bytes(kept)
    with pytest.raises(TuneError, match=r"no trial of this run completed .*first failure: .*"):
        best(project, lanes[0], again)


def test_a_study_name_that_exists_with_another_space_is_refused_and_the_same_space_adds_trials(project):
    run_all(project, {"n_trials": 1, "parallelism": 1, "space": SPACE, "study": "reused"})
    other = {"dropout": {"type": "float", "low": 0.0, "high": 0.3}}

    with pytest.raises(TuneError, match="study 'reused' exists with another space"):
        check(project, {"n_trials": 1, "space": other, "study": "reused"}, RUN | {"run_id": "manual__t2"})

    again = RUN | {"run_id": "manual__t3"}
    run_lane(project, check(project, {"n_trials": 1, "parallelism": 1, "space": SPACE, "study": "reused"}, again)[0], again)
    study = optuna.load_study(study_name="reused", storage=f"sqlite:///{project.home / 'artifacts' / 'optuna.db'}")
    assert len(study.trials) == 2  # the baseline is queued once, for the new study only


def test_a_retried_lane_runs_only_the_trials_its_killed_try_did_not(project):
    run = RUN | {"run_id": "manual__retried"}
    lanes = check(project, {"n_trials": 2, "parallelism": 1, "space": SPACE, "study": "retried"}, run)
    storage = f"sqlite:///{project.home / 'artifacts' / 'optuna.db'}"
    study = optuna.load_study(study_name="retried", storage=storage)
    # what a killed try leaves: its first trial still RUNNING
    stale = study.ask()
    stale.set_user_attr("flywheel.airflow_run", run["run_id"])
    stale.set_user_attr("flywheel.lane", 0)

    result = run_lane(project, lanes[0], run)

    states = {t.number: t.state.name for t in optuna.load_study(study_name="retried", storage=storage).trials}
    assert states[stale.number] == "FAIL" and len(states) == 2 and result["trials"] == states


def test_no_split_is_refused_with_what_to_run_first(tmp_path):
    config = make_project(tmp_path / "home")
    with pytest.raises(TuneError, match="run retrain__flights first"):
        check(config, {"space": SPACE}, RUN)


def test_a_retrains_hyperparameters_param_overrides_params_yaml_and_bad_ones_are_refused(project):
    from pipelines.config import ConfigError
    from pipelines.steps import hyperparameters

    settings_, architecture = with_hyperparameters(project, {"hidden_sizes": [16], "learning_rate": 0.01, "dropout": None})
    assert architecture.hidden_sizes == (16,) and settings_.learning_rate == 0.01 and architecture.dropout == project.model.dropout
    with pytest.raises(ConfigError, match=r"unknown hyperparameters \['momentum'\]"):
        with_hyperparameters(project, {"momentum": 0.9})
    with pytest.raises(ConfigError, match="dropout"):
        with_hyperparameters(project, {"dropout": 1.5})
    # the form's max_epochs / learning_rate join the object; two different values for one setting are refused
    assert hyperparameters({"hyperparameters": {"dropout": 0.2}, "max_epochs": 3, "learning_rate": None}) == {"dropout": 0.2, "max_epochs": 3}
    with pytest.raises(ConfigError, match="max_epochs=3 and hyperparameters.max_epochs=5 disagree"):
        hyperparameters({"hyperparameters": {"max_epochs": 5}, "max_epochs": 3})
