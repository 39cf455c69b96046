"""The step functions of every DAG: one function a task, with plain arguments (the project's
name, paths relative to the deployment home, small dicts) and a small JSON-able result.

Each loads the project's config once and hands the stage function the config it needs. DAG
files call them through ``run``, the one place where a ``NotRetryable`` error becomes
Airflow's ``AirflowFailException`` (failed at once, no retries); everything else keeps the
task's retries.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipelines.config import AnyProject, FinetuneTask, load_config, load_project, load_text_project
from pipelines.errors import NotRetryable
from pipelines.lineage import Record

T = TypeVar("T")
# The Assets of a project (`flywheel://<project>/<event>`): one set per project, so drift or a
# performance drop in one project never retrains another's model.
DRIFT_DETECTED = "drift_detected"  # drift__<p> -> retrain__<p>
PERFORMANCE_DEGRADED = "performance_degraded"  # performance__<p> -> retrain__<p>
FEEDBACK_LANDED = "feedback_landed"  # anyone (the REST API) -> feedback__<p>, extra {"path": ...}
LABELS_JOINED = "labels_joined"  # feedback__<p> -> performance__<p>, extra {"windows": [[start, end], ...]}
CHALLENGER_IN_SHADOW = "challenger_in_shadow"  # retrain__<p> -> rollout__<p>, extra {"challenger": N}
FINETUNE_EXPORT_DIR = "export"


def project_asset(project: str, event: str) -> str:
    return f"flywheel://{project}/{event}"


def drift_asset(project: str) -> str:
    return project_asset(project, DRIFT_DETECTED)


def performance_asset(project: str) -> str:
    return project_asset(project, PERFORMANCE_DEGRADED)


def run(step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``step``; a ``NotRetryable`` error fails the Airflow task without its retries."""
    try:
        return step(*args, **kwargs)
    except NotRetryable as error:
        from airflow.exceptions import AirflowFailException

        raise AirflowFailException(f"{error} [{type(error).__name__}: not retried, the same inputs fail the same way]") from error


class DagRunLike(Protocol):
    """What lineage reads of an Airflow ``DagRun`` (the task context's ``dag_run``)."""

    dag_id: str
    run_id: str
    run_type: Any  # DagRunType, an enum of str; a plain str in tests
    logical_date: Any  # a datetime, or None for a run triggered without one


def airflow_run(dag_run: DagRunLike, trigger: Record | None = None) -> Record:
    """What lineage records of an Airflow run: ids, type, logical date, the user who triggered
    it (Airflow's ``triggering_user_name``; None for a scheduled run) and why it ran."""
    run_type = getattr(dag_run.run_type, "value", dag_run.run_type)  # an enum: keep "manual", not its repr
    record = {"dag_id": dag_run.dag_id, "run_id": dag_run.run_id, "run_type": run_type, "logical_date": str(dag_run.logical_date)}
    record["user"] = getattr(dag_run, "triggering_user_name", None)
    return record | ({"trigger": trigger} if trigger is not None else {})


NO_REASON = "no reason given (the run's reason Param was empty)"


def audit_run(config: AnyProject, action: str, run: Record, reason: str, outcome: str) -> None:
    """Record a person's run in the project's audit trail (``pipelines.audit``), as the user
    Airflow says triggered it. A person's run is a manual one, except those of the alert receiver
    (``alert__...``: Alertmanager's rollback, under the receiver's login); scheduled and
    Asset-triggered runs are nobody's."""
    from pipelines import audit
    from pipelines.monitoring.alert_receiver import RUN_PREFIX

    if run.get("run_type") == "manual" and not str(run.get("run_id", "")).startswith(RUN_PREFIX):
        user = run.get("user") or "unknown (Airflow named no triggering user)"
        audit.record(config, action=action, user=user, reason=reason.strip() or NO_REASON, outcome=outcome, dag_id=run["dag_id"], run_id=run["run_id"])


# --- retrain__<project> ---------------------------------------------------------------------


def check_params(project: str, force_publish: bool, force_reason: str | None, run: Record | None = None, reason: str = "") -> Record:
    """Refuse a broken project config or bad combinations of Params before any work is done; a
    person's run (``run``, manual) goes into the audit trail with its ``reason`` Param."""
    from pipelines import audit
    from pipelines.evaluation.gate import check_override

    config = load_config(project)
    check_override(force_publish, force_reason)
    if run is not None:
        audit_run(config, audit.RETRAIN, run, reason or force_reason or "", f"run {run['run_id']} started")
    return {"force_publish": force_publish}


def validate(project: str, confirmed: list[str] | None = None) -> Record:
    """Validate new landing batches; passing ones join the raw data, failing ones go to quarantine,
    batches whose labels fail the label check are held there, unless ``confirmed`` names them."""
    from pipelines.data.ingest import ingest_landing

    return ingest_landing(load_config(project), confirmed or ())


def version_data(project: str) -> Record:
    """Reproduce and push the project's DVC split stage; return the data version."""
    from pipelines.data.versioning import version_split

    return version_split(load_config(project))


def params_set(params: Record) -> list[str]:
    """The Params a run was given a value for: every one not at an empty default (the form's
    defaults ask for nothing; the DAG-integrity tests hold the retrain DAG's defaults to that)."""
    return sorted(name for name, value in params.items() if value not in (None, False, "", [], {}))


def needs_training(project: str, data_version: dict[str, str], params: Record) -> Record:
    """Whether this run has anything to train: ``{"train": bool, "reason": str}``. Nothing, when
    the splits (what training and the gate read) hash as those of the project's last completed
    run and no Param asks for another run: a retrain would reuse that run's candidate and the
    gate refuse it again. Raw data that changed without changing the splits (a batch re-sent
    as it was) is nothing new."""
    from pipelines.serving.publish import run_records

    asked = params_set(params)
    if asked:
        return {"train": True, "reason": f"the run's Params set {asked}"}
    config = load_config(project)
    records = run_records(config.artifacts_dir)
    if not records:
        return {"train": True, "reason": "no run has trained this project yet"}
    splits = config.portable(config.split.output_dir) + "/"
    last = records[-1]
    if {k: v for k, v in last["data_version"].items() if k.startswith(splits)} != {k: v for k, v in data_version.items() if k.startswith(splits)}:
        return {"train": True, "reason": f"the data changed since run {last['airflow']['run_id']}"}
    return {
        "train": False,
        "reason": f"nothing new: run {last['airflow']['run_id']} ({last['created_at']}) trained on these splits and no Param is set; train, export, gate and publish are skipped",
    }


def hyperparameters(params: Record) -> Record:
    """What a retrain's Params set instead of params.yaml: the ``hyperparameters`` object (a tune
    study's best trial sends it) with ``max_epochs`` and ``learning_rate`` from the form over it;
    ``ConfigError`` when the two name different values."""
    from pipelines.config import ConfigError

    chosen = dict(params.get("hyperparameters") or {})
    for key in ("max_epochs", "learning_rate"):
        value = params.get(key)
        if value is None:
            continue
        if chosen.get(key) not in (None, value):
            raise ConfigError(f"Params {key}={value} and hyperparameters.{key}={chosen[key]} disagree: set one of them")
        chosen[key] = value
    return chosen


def train(project: str, data_version: dict[str, str], hyperparameters: Record, run: Record | None = None) -> Record:
    from pipelines.training.train import train as fit

    return fit(load_config(project), data_version, hyperparameters, run)


def export(project: str, candidate: str) -> Record:
    from pipelines.export.onnx import export as to_onnx

    return to_onnx(load_config(project), candidate)


def gate(project: str, candidate: str, force_publish: bool, force_reason: str | None) -> Record:
    from pipelines.evaluation.gate import evaluate

    return evaluate(load_config(project), candidate, force_publish, force_reason)


def trigger(run_type: str, events: list[Record]) -> Record:
    """Why a run ran, for its lineage: the schedule, drift (with its reports), a performance drop
    (with its window), or a person. ``events``: ``{"asset": uri, "extra": ...}`` of the Asset events
    that started it."""
    if run_type == "asset_triggered":
        kinds = sorted({"performance" if e["asset"].endswith(f"/{PERFORMANCE_DEGRADED}") else "drift" for e in events})
        return {"kind": "+".join(kinds) or "drift", "events": [e["extra"] for e in events]}
    return {"kind": {"scheduled": "schedule"}.get(run_type, run_type)}


def publish(project: str, candidate: str, gate: Record, data_version: dict[str, str], run: Record, overrides: Record) -> Record:
    """Publish the candidate the gate promoted; a publish forced over the gate goes into the audit trail."""
    from pipelines import audit
    from pipelines.serving.publish import publish as release

    config = load_config(project)
    published = release(config, candidate, gate, data_version, run, overrides)
    if gate.get("forced"):
        said = f"published v{published['version']}" if published.get("version") is not None else f"not published: {published.get('reason') or published.get('decision')}"
        audit_run(config, audit.FORCE_PUBLISH, run, str(overrides.get("force_reason") or ""), said)
    return published


# --- tune__<project> ------------------------------------------------------------------------


def tune_check(project: str, params: Record, run: Record) -> list[Record]:
    from pipelines.tuning import check

    return check(load_config(project), params, run)


def tune_lane(project: str, lane: Record, run: Record) -> Record:
    from pipelines.tuning import run_lane

    return run_lane(load_config(project), lane, run)


def tune_best(project: str, lanes: list[Record], run: Record) -> Record:
    """The study's best trial, once every lane has run (``lanes``: ``check``'s records)."""
    from pipelines.tuning import best

    return best(load_config(project), lanes[0], run)


# --- drift__<project> -----------------------------------------------------------------------


def drift_check(project: str, start: str | None, end: str) -> Record:
    """Check the requests served in the window ``[start, end)`` (ISO times) for drift; with no
    start (a run triggered without a logical date has no data interval), the hour before ``end``."""
    from pipelines.monitoring.check import check_window

    until = datetime.fromisoformat(end)
    since = datetime.fromisoformat(start) if start else until - timedelta(hours=1)
    return check_window(load_project(project), since, until)


def drift_decide(project: str, summary: Record, last_trigger_at: str | None, retrains_active: int, run_type: str) -> Record:
    """Whether this window's drift should start a retrain; the event's extra when it should."""
    from pipelines.monitoring.trigger import decide as verdict

    config = load_config(project)
    decision = verdict(
        summary,
        last_trigger_at=datetime.fromisoformat(last_trigger_at) if last_trigger_at else None,
        retrains_active=retrains_active,
        run_type=run_type,
        now=datetime.now(timezone.utc),
        cooldown_hours=config.monitoring.cooldown_hours,
    )
    if decision["trigger"]:
        decision["extra"] = {
            "project": project,
            "model": summary["model"],
            "version": summary["version"],
            "window_end": summary["window"]["end"],
            "report": summary["report"],
            "share": summary["share"],
            "columns": summary["drifted_columns"],
        }
    return decision


# --- feedback__<project> and performance__<project> ------------------------------------------


def feedback_land(project: str, paths: list[str]) -> Record:
    """Land the label files an Asset event or the run's ``path`` Param names (relative to the
    deployment home, or absolute) into the project's feedback landing folder."""
    from pipelines.feedback.labels import land_feedback

    config = load_config(project)
    return {"landed": [config.portable(land_feedback(config, config.path(Path(path)))) for path in paths]}


def feedback_join(project: str) -> Record:
    """Validate the landed label files and join them to the inference log (``ingest_feedback``).
    A file refused whole does not stop the others: it is reported in ``refused`` for
    ``feedback_refused`` to fail on, after the joined labels were announced and landed."""
    from pipelines.feedback.labels import FeedbackFileError, ingest_feedback

    try:
        return ingest_feedback(load_config(project))
    except FeedbackFileError as error:
        return {**error.summary, "error": str(error)}


def feedback_land_production(project: str, joined: Record) -> Record:
    """Land the rows ``joined`` labelled as training batches, when ``feedback.land_batches``."""
    from pipelines.feedback.production import land_labelled

    config = load_config(project)
    if not config.feedback.land_batches:
        return {"batches": [], "reason": "feedback.land_batches is off"}
    return {"batches": [land_labelled(config, datetime.fromisoformat(start), datetime.fromisoformat(end)) for start, end in joined["windows"]]}


def feedback_refused(joined: Record) -> Record:
    """``NotRetryable`` with the join's message when it refused a label file whole; else the refused rows' counts."""
    if joined.get("error"):
        raise NotRetryable(joined["error"])
    return {"quarantined": joined.get("quarantined", {})}


def performance_check(project: str, start: str | None, end: str, events: list[Record]) -> list[Record]:
    """The performance summary of each window to check: those the Asset ``events`` of
    ``feedback__<p>`` name (windows that got labels), else the run's data interval ``[start, end)``
    (no start: the window before ``end``)."""
    from pipelines.feedback.performance import evaluate_window

    config = load_config(project)
    windows = sorted({tuple(w) for event in events for w in event.get("windows", [])})
    if not windows:
        until = datetime.fromisoformat(end)
        windows = [(start or (until - timedelta(hours=config.performance.window_hours)).isoformat(), end)]
    return [evaluate_window(config, datetime.fromisoformat(a), datetime.fromisoformat(b)) for a, b in windows]


def performance_decide(project: str, summaries: list[Record], last_trigger_at: str | None, retrains_active: int, run_type: str) -> Record:
    """Whether a degraded window should start a retrain; the event's extra when it should."""
    from pipelines.feedback.performance import decide

    config = load_config(project)
    degraded = [s for s in summaries if s.get("degraded")]
    summary = degraded[-1] if degraded else (summaries[-1] if summaries else {"status": "no_verdict", "reason": "no window checked"})
    return decide(
        config,
        summary,
        datetime.fromisoformat(last_trigger_at) if last_trigger_at else None,
        retrains_active,
        run_type,
        datetime.now(timezone.utc),
    )


# --- rollback__<project> --------------------------------------------------------------------


def rollback(project: str, version: int | None, run: Record, reason: str = "", rollout_only: bool = False) -> Record:
    """Put ``version`` of the project's served model back in service; None: end a rollout in
    progress, or (unless ``rollout_only``) serve the version served before the current one."""
    from pipelines import audit
    from pipelines.serving.rollback import rollback as put_back

    config = load_project(project)
    try:
        done = put_back(config, version, run, reason, rollout_only)
    except Exception as error:
        audit_run(config, audit.ROLLBACK, run, reason, f"failed: {type(error).__name__}: {error}")
        raise
    said = f"v{done['version']} serves (was v{done['previous']})" if done["changed"] else done["reason"].strip() or f"v{done['version']} already served: nothing changed"
    audit_run(config, audit.ROLLBACK, run, reason, said)
    return done


# --- rollout__<project> ---------------------------------------------------------------------


def rollout_challenger(project: str, version: int | None, events: list[Record]) -> Record:
    """The challenger a rollout run takes through its stages: the ``version`` Param, else the one
    the triggering Asset event names, else the one the served model routes now; it must be
    routed (in shadow) already. Returns {challenger, champion, stage}."""
    from pipelines.serving import repository
    from pipelines.serving.rollout import RolloutError

    config = load_config(project)
    named = version or next((e["extra"].get("challenger") for e in reversed(events) if e.get("extra", {}).get("challenger")), None)
    routed = repository.route_of(config.model_dir)
    if routed is None or (named is not None and routed.challenger != int(named)):
        raise RolloutError(f"project {project}: version {named} is not in a rollout (the served model routes {routed}); a promoted challenger is routed in shadow by publish")
    return {"challenger": routed.challenger, "champion": repository.served_version(config.model_dir), "stage": routed.mode}


def rollout_look(project: str, challenger: int, stage: str) -> Record:
    """One look of a stage's sequential test (``pipelines.serving.rollout.look``)."""
    from pipelines.serving.rollout import look

    return look(load_config(project), challenger, stage)


def rollout_card(project: str, challenger: int, looks: list[Record]) -> Record:
    """Write the challenger's model card with the rollout's looks so far; the card's paths."""
    from pipelines.serving.model_card import write_model_card

    config = load_config(project)
    written = write_model_card(config, challenger, {look["stage"]: look for look in looks if look})
    return {name: config.portable(path) for name, path in written.items()}


def rollout_advance(project: str, challenger: int, to: str, run: Record, reason: str, approval: Record | None = None) -> Record:
    """Take the rollout to ``to`` (canary, full, aborted) (``pipelines.serving.rollout.advance``);
    a person's answer to the approval goes into the audit trail."""
    from pipelines import audit
    from pipelines.serving.rollout import advance

    config = load_config(project)
    advanced = advance(config, challenger, to, run, reason, approval)
    if approval and approval.get("user"):  # no user: nobody answered before the timeout, which took the default
        outcome = f"{'/'.join(approval['chosen'])}: v{challenger} {'aborted' if to == 'aborted' else 'to ' + to}"
        audit.record(config, action=audit.APPROVAL, user=approval["user"], reason=approval["comment"], outcome=outcome, dag_id=run["dag_id"], run_id=run["run_id"])
    return advanced


def approval_record(response: Record | None) -> Record | None:
    """Who answered a stage's approval, when, the choice and the comment, from the HITL task's
    response (None: none asked); ``summary`` says it in one line, for a reason."""
    if not response:
        return None
    chosen, by, at = response.get("chosen_options") or [], response.get("responded_by_user"), response.get("responded_at")
    comment = (response.get("params_input") or {}).get("comment", "")
    who = (by or {}).get("name") or (by or {}).get("id") if isinstance(by, dict) else by
    summary = f"{'/'.join(chosen)} by {who} at {at}" if who else f"{'/'.join(chosen)} (no answer before the timeout)"
    return {"chosen": chosen, "by": by, "user": who, "at": at, "comment": comment, "summary": summary + (f": {comment}" if comment else "")}


# --- revert_batch__<project> ----------------------------------------------------------------


def revert_batch(project: str, batch: str, reason: str, run: Record) -> Record:
    """Take ``batch`` out of the project's raw data, back into quarantine, as a new data version."""
    from pipelines.data.batches import LOCK_WAIT_S, revert

    return revert(load_config(project), batch, reason, run, timeout=LOCK_WAIT_S)


# --- finetune__<project> --------------------------------------------------------------------


def finetune_check_params(project: str, raw: Record) -> Record:
    """Refuse bad Params before any work; the checked Params, with the base model's path."""
    from pipelines.finetune.params import check

    return check(load_text_project(project).finetune, raw)


def finetune_validate(project: str, dataset: str) -> Record:
    """Validate a landed file of the dataset, if any: bad records to quarantine, the rest become the dataset."""
    from pipelines.finetune.data import ingest

    return ingest(load_text_project(project).finetune, dataset)


def finetune_version_data(project: str, dataset: str) -> Record:
    from pipelines.finetune.data import version

    return {"data_version": version(load_text_project(project), dataset)}


def finetune_train(project: str, checked: Record, data_version: dict[str, str], run: Record | None = None) -> Record:
    from pipelines.finetune.train import finetune as fit

    return fit(load_text_project(project), checked, data_version, run)


def finetune_export(project: str, candidate: str) -> Record:
    """Merge the adapter and export a classifier to ONNX (parity-checked); a causal LM is kept as an adapter."""
    from pipelines import tracking
    from pipelines.artifacts import CANDIDATE_FILE
    from pipelines.finetune.data import load_splits
    from pipelines.finetune.export import export_classifier
    from pipelines.finetune.params import resolve_base
    from pipelines.finetune.train import load_tokenizer, merged
    from pipelines.lineage import read_json, write_json

    config = load_text_project(project)
    folder = config.path(Path(candidate))
    record = read_json(folder / CANDIDATE_FILE)
    params = record["inputs"]["params"]
    if params["task"] != FinetuneTask.sequence_classification.value:
        return {"folder": None, "reason": "causal LMs are evaluated and kept as adapters; only classifiers are exported for Triton"}
    texts = [r["text"] for r in load_splits(config.finetune, params["dataset"])["val"][:64]]
    out = folder / FINETUNE_EXPORT_DIR
    exported = export_classifier(
        merged(folder),
        load_tokenizer(resolve_base(params["base_model"])),
        record["result"]["labels"],
        params["max_length"],
        out,
        texts,
        config.finetune.parity_tolerance,
    )
    onnx_file = Path(exported["onnx"])
    exported["onnx"] = config.portable(onnx_file)
    write_json(folder / "export.json", exported)
    tracking.log_to(tracking.candidate_run(folder), artifacts=[onnx_file, folder / "export.json"], timeout_s=config.tracking.timeout_s)
    return {"folder": config.portable(out), **exported}


def finetune_evaluate(project: str, candidate: str, export_folder: str | None) -> Record:
    from pipelines.finetune.evaluate import evaluate as score

    return score(load_text_project(project), candidate, export_folder)


def finetune_publish(project: str, candidate: str, export_folder: str | None, decision: Record, data_version: dict[str, str], run: Record) -> Record:
    """Record the run's lineage; a promoted classifier becomes a served version of the ensemble."""
    from pipelines import tracking
    from pipelines.artifacts import CANDIDATE_FILE
    from pipelines.evaluation.gate import PROMOTED
    from pipelines.lineage import code_version, read_json, write_json
    from pipelines.serving.publish import run_record_path

    config = load_text_project(project)
    record = read_json(config.path(Path(candidate)) / CANDIDATE_FILE)
    lineage = {
        "project": project,
        "model": config.finetune.model_name,
        "candidate": candidate,
        "base_model": record["inputs"]["base"],
        "data_version": data_version,
        "code_version": code_version(),
        "params": record["inputs"]["params"],
        "training": record["result"],
        "gate": decision,
        "airflow": run,
        "tracking": record["result"].get("tracking") or tracking.candidate_run(config.path(Path(candidate))),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": None,
    }
    if decision["decision"] == PROMOTED and export_folder:
        from pipelines.artifacts import REFERENCE_FILE
        from pipelines.finetune import serving

        folder = config.path(Path(export_folder))
        serving.write_reference(config.finetune, config.monitoring, record["inputs"]["params"]["dataset"], folder / REFERENCE_FILE)
        lineage.update(serving.publish_classifier(config, folder, lineage, run))
    elif decision["decision"] == PROMOTED:
        lineage["served"] = "no: causal LMs are not served through Triton; the adapter and its lineage are the result"
    path = write_json(run_record_path(config.artifacts_dir, run["run_id"]), lineage)
    if lineage["version"] is not None:
        tracking.tag_version(lineage["tracking"], lineage["version"], config.portable(path), config.tracking.timeout_s)
    return {"decision": decision["decision"], "version": lineage["version"], "lineage": config.portable(path)}
