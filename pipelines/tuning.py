"""Hyperparameter search of a tabular project: an Optuna study run as parallel Airflow tasks.

``tune__<project>`` calls, in order:

1. ``check``: the run's settings (``tune`` section under the run's Params) and search space are
   checked, and the study is created or reopened in the study storage (``tracking.study_storage``,
   a real database: SQLite here, PostgreSQL on compose), before any trial. Refused, without a
   retry: an empty or invalid space, zero trials or minutes, a study name that exists with
   another space. A new study's first trial is params.yaml's own settings, so the search reports
   how far it got from them.
2. ``run_lane``, one mapped task per lane (``parallelism`` lanes, Airflow dynamic task mapping),
   each running its share of the trials one after another against the shared study: Optuna's
   TPE sampler proposes, a MedianPruner stops a trial whose epoch's validation loss is worse than
   the median of the completed trials' at that epoch (``PruneOnValLoss``). A trial that raises is
   recorded as FAIL and the lane goes on; no trial starts after the run's deadline.
3. ``best``: the best completed trial, recorded in the project's lineage
   (``artifacts/<p>/tune/<study>/<run>.json``) and in the study's MLflow run, and proposed to
   ``retrain__<project>`` as its ``hyperparameters`` Param: the candidate it trains goes through
   the normal gate, never straight to serving.

The objective is the best validation loss of the trial's fit (the same Lightning training as a
retrain, on the current DVC-versioned splits). Each trial is an MLflow run nested under the
study's run. Sources: Optuna (Akiba et al., KDD 2019; docs of ``optuna.samplers.TPESampler``,
``optuna.pruners.MedianPruner``, ``optuna.storages.RDBStorage``); TPE: Bergstra et al., NeurIPS 2011.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl

from pipelines import tracking
from pipelines.config import ConfigError, ProjectConfig, SearchDimension, TuneConfig
from pipelines.data.split import split_paths
from pipelines.data.versioning import data_version
from pipelines.lineage import Record, code_version, write_json
from pipelines.training.train import HYPERPARAMETERS, fit, with_hyperparameters

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
TUNABLE = HYPERPARAMETERS - {"max_epochs"}  # a trial's epochs are the run's, the same for every trial
STUDY_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
SPACE_ATTR, PROJECT_ATTR, RUN_ATTR, LANE_ATTR = "flywheel.space", "flywheel.project", "flywheel.airflow_run", "flywheel.lane"
OBJECTIVE = "val_loss"


class TuneError(ConfigError):
    """A tune run refused before any trial (not retried: the same Params fail the same way)."""


def settings(config: ProjectConfig, params: Record) -> TuneConfig:
    """The project's ``tune`` section with the run's Params over it (``n_trials``, ``parallelism``,
    ``timeout_minutes``; ``space``: a whole space replacing the configured one, or empty/None);
    ``TuneError`` naming the Param and what is expected."""
    given = {k: params[k] for k in ("n_trials", "parallelism", "timeout_minutes") if params.get(k) is not None}
    if params.get("space"):
        given["space"] = params["space"]
    try:
        tune = TuneConfig.model_validate(config.tune.model_dump() | given)
    except ValueError as exc:
        raise TuneError(f"tune__{config.name}: {exc}".replace("\n", " ")) from None
    if not tune.space:
        raise TuneError(f"tune__{config.name}: the search space is empty; give at least one of {sorted(TUNABLE)}")
    if unknown := sorted(set(tune.space) - TUNABLE):
        raise TuneError(f"tune__{config.name}: the search space names {unknown}, which are not tunable; expected some of {sorted(TUNABLE)}")
    for name, dimension in tune.space.items():
        for value in _extremes(dimension):
            try:
                with_hyperparameters(config, {name: value})
            except ConfigError as exc:
                raise TuneError(f"tune__{config.name}: space.{name} allows {value!r}, which training refuses: {exc}") from None
    return tune


def storage_url(config: ProjectConfig) -> str:
    """The study storage's SQLAlchemy URL, a relative SQLite path resolved against the home."""
    url = config.tracking.study_storage
    if match := re.fullmatch(r"sqlite:///(?!/)(.+)", url):
        path = config.home / match.group(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return url


def check(config: ProjectConfig, params: Record, run: Record) -> list[Record]:
    """Refuse a bad run before any trial (``TuneError``), then create or reopen the study
    ``params["study"]`` (default: the project's name) with the space recorded on it, and open the
    study's MLflow run. Returns one record a lane (what Airflow maps the lanes over), each with
    ``lane`` (``[index, trials]``) and what every lane shares: ``study``, ``space``, ``n_trials``,
    ``deadline`` (ISO UTC), ``max_epochs``, ``pruner``, ``seed``, ``tracking`` (the study's run)."""
    import optuna

    tune = settings(config, params)
    name = (params.get("study") or config.name).strip()
    if not re.fullmatch(STUDY_NAME, name):
        raise TuneError(f"tune__{config.name}: study name {name!r}: letters, digits, _ . - (at most 100), starting with a letter or digit")
    split_files = split_paths(config.split.output_dir)
    if missing := [str(p) for p in split_files.values() if not p.is_file()]:
        raise TuneError(f"tune__{config.name}: no split to tune on ({', '.join(missing)} missing): run retrain__{config.name} first")
    space = {k: v.model_dump(exclude_defaults=True) for k, v in tune.space.items()}
    storage = _storage(config)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name in existing:
        recorded = existing[name].user_attrs.get(SPACE_ATTR)
        if recorded != space or existing[name].user_attrs.get(PROJECT_ATTR) != config.name:
            raise TuneError(
                f"tune__{config.name}: study {name!r} exists with another space or project ({existing[name].user_attrs.get(PROJECT_ATTR)}: {recorded}); "
                f"this run's space is {space}: give another study name, or the same space"
            )
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
    if name not in existing:
        study.set_user_attr(SPACE_ATTR, space)
        study.set_user_attr(PROJECT_ATTR, config.name)
        baseline = {k: _as_choice(tune.space[k], v) for k, v in _defaults(config).items() if k in tune.space}
        study.enqueue_trial(baseline, user_attrs={"baseline": True})  # params.yaml's own settings: trial 0
    lanes = [[lane, len(range(lane, tune.n_trials, tune.parallelism))] for lane in range(min(tune.parallelism, tune.n_trials))]
    deadline = datetime.now(timezone.utc) + timedelta(minutes=tune.timeout_minutes)
    tags = {"flywheel.kind": "tune", "optuna.study": name, **tracking.airflow_tags(run)}
    study_run = tracking.open_run(config.tracking, config.name, _study_dir(config, name) / run_folder(run), f"tune-{name}", {"tune": tune.model_dump(mode="json")}, tags)
    shared = {
        "study": name,
        "space": space,
        "n_trials": tune.n_trials,
        "deadline": deadline.isoformat(),
        "max_epochs": tune.max_epochs or config.train.max_epochs,
        "pruner": tune.pruner.model_dump(),
        "seed": tune.seed,
        "tracking": study_run,
    }
    return [shared | {"lane": lane} for lane in lanes]


def run_lane(config: ProjectConfig, checked: Record, run: Record) -> Record:
    """Run one lane of ``check``'s (``checked["lane"] = [index, trials]``): ``trials`` trials one
    after another on the shared study, none started after the deadline. A trial that raises is a
    FAIL trial, not a failed task. A retried lane runs only what its killed try had not: that
    try's trial still RUNNING is marked FAIL. Returns ``{"lane", "trials": {number: state}}``."""
    import optuna

    index, count = checked["lane"]
    study = optuna.load_study(
        study_name=checked["study"],
        storage=_storage(config),
        # each lane its own seed: two lanes seeded alike would propose the same random start
        sampler=optuna.samplers.TPESampler(seed=checked["seed"] + index),
        pruner=optuna.pruners.MedianPruner(**checked["pruner"]),
    )
    earlier = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(RUN_ATTR) == run.get("run_id") and t.user_attrs.get(LANE_ATTR) == index]
    for stale in (t for t in earlier if t.state == optuna.trial.TrialState.RUNNING):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # its process is gone with the killed try
        log.warning("trial %d of lane %d was left running by an earlier try: marked FAIL", stale.number, index)
    ran: dict[int, str] = {t.number: "FAIL" if t.state == optuna.trial.TrialState.RUNNING else t.state.name for t in earlier}
    count = max(0, count - len(earlier))
    objective = trial_objective(config, checked, run, index)

    def remember(_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ran[trial.number] = trial.state.name

    remaining = (datetime.fromisoformat(checked["deadline"]) - datetime.now(timezone.utc)).total_seconds()
    if remaining > 0 and count:
        study.optimize(objective, n_trials=count, timeout=remaining, catch=(Exception,), callbacks=[remember], gc_after_trial=True)
    log.info("lane %d ran trials %s", index, ran)
    return {"lane": index, "trials": ran}


def trial_objective(config: ProjectConfig, checked: Record, run: Record, lane: int = 0) -> Callable[[optuna.Trial], float]:
    """The function Optuna minimises: a trial's settings drawn from ``checked["space"]``, fitted
    as a retrain fits (``_trial``); returns its best validation loss."""
    space = {k: SearchDimension.model_validate(v) for k, v in checked["space"].items()}

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(RUN_ATTR, run.get("run_id"))
        trial.set_user_attr(LANE_ATTR, lane)
        chosen = {name: _suggest(trial, name, dimension) for name, dimension in space.items()}
        return _trial(config, checked, trial, chosen, run)

    return objective


def best(config: ProjectConfig, checked: Record, run: Record) -> Record:
    """The study's best completed trial (``checked``: a lane's record of ``check``) as the
    ``hyperparameters`` a retrain trains with, and
    the study's record in lineage (``artifacts/<p>/tune/<study>/<run>.json``) and in its MLflow run.
    ``TuneError`` when no trial of this run completed (their states and first error named)."""
    import optuna

    study = optuna.load_study(study_name=checked["study"], storage=_storage(config))
    trials = study.get_trials(deepcopy=False)
    ours = [t for t in trials if t.user_attrs.get(RUN_ATTR) == run.get("run_id")]
    counts = {state: sum(t.state.name == state for t in ours) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in ours):
        failed = next((t.user_attrs.get("error") for t in ours if t.state == optuna.trial.TrialState.FAIL), None)
        raise TuneError(f"tune__{config.name}: no trial of this run completed ({counts}){f'; the first failure: {failed}' if failed else ''}")
    top = min(complete, key=lambda t: t.value if t.value is not None else math.inf)
    space = {k: SearchDimension.model_validate(v) for k, v in checked["space"].items()}
    chosen = {k: _from_choice(space[k], v) for k, v in top.params.items()} | {"max_epochs": checked["max_epochs"]}
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    record = {
        "study": checked["study"],
        "storage": config.tracking.study_storage.split("://")[0],  # the engine, never the credentials
        "objective": f"minimize {OBJECTIVE}",
        "best": {"trial": top.number, OBJECTIVE: top.value, "hyperparameters": chosen, "mlflow_run": top.user_attrs.get("mlflow_run")},
        "baseline": {"trial": baseline.number, OBJECTIVE: baseline.value, "hyperparameters": baseline.params} if baseline else None,
        "this_run": counts,
        "trials": [
            {"number": t.number, "state": t.state.name, OBJECTIVE: t.value, "params": t.params, "epochs": len(t.intermediate_values), "error": t.user_attrs.get("error")}
            for t in trials
        ],
        "airflow": run,
        "code_version": code_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = write_json(_study_dir(config, checked["study"]) / f"{run_folder(run)}.json", record)
    metrics = {f"best_{OBJECTIVE}": float(top.value or math.nan), "best_trial": float(top.number), **{f"trials_{k.lower()}": float(v) for k, v in counts.items()}}
    tracking.log_to(checked["tracking"], metrics, {f"best.{k}": json.dumps(v) for k, v in chosen.items()}, [path], timeout_s=config.tracking.timeout_s)
    tracking.finish(checked["tracking"], timeout_s=config.tracking.timeout_s)
    reason = f"tune study {checked['study']}: best trial #{top.number} ({OBJECTIVE} {top.value:.5f}"
    reason += f" vs params.yaml's {baseline.value:.5f})" if baseline and baseline.value is not None else ")"
    return {"hyperparameters": chosen, "reason": reason, "lineage": config.portable(path), "counts": counts}


class PruneOnValLoss(pl.Callback):
    """Report each epoch's ``val_loss`` to the trial and stop it when the pruner says so (raises
    ``optuna.TrialPruned``). Optuna's own ``PyTorchLightningPruningCallback`` (optuna-integration)
    is written for the ``lightning`` package, not the ``pytorch_lightning`` one training uses."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import optuna

        if trainer.sanity_checking or OBJECTIVE not in trainer.callback_metrics:
            return
        epoch = trainer.current_epoch
        self.trial.report(float(trainer.callback_metrics[OBJECTIVE]), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {OBJECTIVE} worse than the median of completed trials")


def run_folder(run: Record) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(run.get("run_id") or "local"))


def _trial(config: ProjectConfig, checked: Record, trial: optuna.Trial, chosen: Record, run: Record) -> float:
    """Fit one trial's model into a scratch folder (deleted after: only its numbers are kept)."""
    import optuna

    try:
        train_settings, architecture = with_hyperparameters(config, chosen | {"max_epochs": checked["max_epochs"]})
    except ConfigError as error:  # a drawn value training refuses: the trial fails, named
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
        raise
    folder = _study_dir(config, checked["study"]) / "trials" / f"{trial.number}"
    shutil.rmtree(folder, ignore_errors=True)
    parent = checked["tracking"].get("run_id")
    tags = {"flywheel.kind": "trial", "optuna.study": checked["study"], "optuna.trial": str(trial.number), **({"mlflow.parentRunId": parent} if parent else {})}
    inputs = {"model": architecture.model_dump(mode="json"), "train": train_settings.model_dump(mode="json"), "data": data_version(config)}
    tracked = tracking.open_run(config.tracking, config.name, folder, f"{checked['study']}-trial-{trial.number}", inputs, tags)
    if tracked.get("url"):
        trial.set_user_attr("mlflow_run", tracked["url"])
    status = "FAILED"
    try:
        record = fit(train_settings, architecture, config.dataset, split_paths(config.split.output_dir), folder, tracked, config.tracking.timeout_s, [PruneOnValLoss(trial)])
        status = "FINISHED"
        return float(record["best_val_loss"])
    except optuna.TrialPruned:
        status = "KILLED"
        raise
    except Exception as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
        raise
    finally:
        tracking.log_to(tracked, tags={"optuna.state": {"FINISHED": "COMPLETE", "KILLED": "PRUNED"}.get(status, "FAIL")}, timeout_s=config.tracking.timeout_s)
        tracking.finish(tracked, status, timeout_s=config.tracking.timeout_s)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def _storage(config: ProjectConfig) -> optuna.storages.RDBStorage:
    import optuna

    url = storage_url(config)
    # SQLite: lanes in other processes wait for each other's short writes rather than fail.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def _study_dir(config: ProjectConfig, study: str) -> Path:
    return config.artifacts_dir / "tune" / study


def _defaults(config: ProjectConfig) -> Record:
    """params.yaml's values of the tunable settings."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (config.train.model_dump() | config.model.model_dump()).items() if k in TUNABLE}


def _suggest(trial: optuna.Trial, name: str, dimension: SearchDimension) -> Any:
    if dimension.type == "categorical":
        assert dimension.choices is not None  # the model's validator
        return _from_choice(dimension, trial.suggest_categorical(name, [_as_choice(dimension, c) for c in dimension.choices]))
    assert dimension.low is not None and dimension.high is not None
    if dimension.type == "int":
        return trial.suggest_int(name, int(dimension.low), int(dimension.high), log=dimension.log)
    return trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log)


def _as_choice(dimension: SearchDimension, value: Any) -> Any:
    """A value as Optuna stores it: a list choice (hidden sizes) as its JSON text, since Optuna's
    categorical choices are None, bool, int, float or str."""
    return json.dumps(value) if dimension.type == "categorical" and isinstance(value, (list, tuple)) else value


def _from_choice(dimension: SearchDimension, value: Any) -> Any:
    if dimension.type == "categorical" and isinstance(value, str) and any(isinstance(c, list) for c in dimension.choices or []):
        return json.loads(value)
    return value


def _extremes(dimension: SearchDimension) -> list[Any]:
    if dimension.type == "categorical":
        return list(dimension.choices or [])
    assert dimension.low is not None and dimension.high is not None  # the model's validator
    if dimension.type == "int":
        return [int(dimension.low), int(dimension.high)]
    # a point between the bounds with a fraction: a float range on an integer setting is refused here
    return [dimension.low, dimension.high, dimension.low + (dimension.high - dimension.low) / 3]
