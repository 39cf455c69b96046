"""Safe rollout: a promoted challenger meets live traffic in shadow, then as a canary, then in
full, each stage decided by a sequential test on the labels that come back.

The router is the served (champion) version's Triton model (``backend/model.py``; its
``config.pbtxt`` names the challenger and the mode, ``repository.Route``). In both stages every
request gets both versions' answers: the answering one in the inference log, the other in the
shadow log (``<model>__shadow``). A look pairs the labelled rows of a stage (``feedback``'s
join of labels to the log) with the other version's answer to the same request and tests the
mean per-row score difference ``challenger - champion`` with the mixture SPRT
(``pipelines.evaluation.sequential``): always valid, so the DAG may look after every batch of
labels. Scores: the negative Brier score ``-(p - y)^2`` of a classifier's probability, the
negative squared error of a regression (proper scoring rules, so better probabilities score
higher; per row, so pairs can be differenced). Promote: the lower bound clears ``-margin``;
abort: the upper bound is below it, or the stage is still undecided after
``rollout.max_labels`` rows or ``rollout.stage_hours``.

Every stage change is one reload of the champion's config, or, for ``full``, the switch to the
challenger (``live``): no request fails. Each look and decision goes into the challenger's
``lineage.json`` (``rollout``) and the serving history.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.artifacts import LABEL_OUTPUT, LINEAGE_FILE, MODEL_VERSION, OUTPUT, REQUEST_ID
from pipelines.config import ProjectConfig, Task
from pipelines.errors import NotRetryable
from pipelines.evaluation.sequential import mixture_sprt
from pipelines.lineage import Record, read_json, write_json
from pipelines.metrics import Sample, emit
from pipelines.monitoring.check import read_window
from pipelines.serving import live, repository
from pipelines.serving.backend.inference_log import SHADOW_SUFFIX
from pipelines.serving.client import log_dir
from pipelines.serving.repository import CANARY, SHADOW, Route

log = logging.getLogger(__name__)
FULL, ABORTED = "full", "aborted"


class RolloutError(NotRetryable, ValueError):
    """No rollout of that challenger is in progress, or a stage asked out of order."""


def shadow_log_dir(config: ProjectConfig) -> Path:
    """Where the router logs the answers of the version that did not answer: ``<model>__shadow``."""
    return log_dir(config.serving, config.served_model).with_name(config.served_model + SHADOW_SUFFIX)


def start(config: ProjectConfig, challenger: int, run: Record) -> Record:
    """Smoke-test ``challenger`` in Triton and route it in shadow beside the served champion;
    returns the serving history entry. ``live.SmokeTestError`` (and the version marked rejected)
    if it fails its smoke test; ``live.RouteRefused`` if it cannot be routed."""
    live.smoke(config, challenger, run)
    entry = live.route(config, Route(challenger, SHADOW, 0.0), run, event=SHADOW)
    _record(config, challenger, {"started_at": entry["time"], "champion": entry["version"], "stages": {SHADOW: {"started_at": entry["time"]}}})
    _report(config, SHADOW, None)
    return entry


def look(config: ProjectConfig, challenger: int, stage: str, now: datetime | None = None) -> Record:
    """The sequential test of ``stage`` (shadow or canary) on what came back so far: a record with
    the decision (promote, abort, continue), its statistics (``SequentialDecision.as_record``),
    the rows each version answered and their latency, and the two versions' agreement. Written
    into the challenger's lineage and pushed as ``flywheel_rollout_*`` gauges.

    A rollout that already ended outside the run (an alert's rollback) gives the decision abort
    with that reason and nothing else. ``RolloutError`` if the served model does not route
    ``challenger`` in ``stage`` otherwise.
    """
    rollout, settings = repository.route_of(config.model_dir), config.rollout
    champion = repository.served_version(config.model_dir)
    now = now or datetime.now(timezone.utc)
    record = _lineage(config, challenger).get("rollout") or {}
    if record.get("outcome") and (rollout is None or rollout.challenger != challenger):
        # ended outside this run (an alert's rollback, a person's): the DAG aborts, which changes nothing
        reason = f"abort: the rollout of version {challenger} already ended ({record['outcome']}: {record['stages'].get(record['outcome'], {}).get('reason')})"
        return {"stage": stage, "champion": champion, "challenger": challenger, "looked_at": now.isoformat(timespec="seconds"), "decision": "abort", "reason": reason, "rows": 0}
    if rollout is None or rollout.challenger != challenger or rollout.mode != stage:
        raise RolloutError(f"project {config.name}: no {stage} of version {challenger} is in progress (the served model routes {rollout})")
    started = datetime.fromisoformat(record["stages"][stage]["started_at"])
    until = now + timedelta(minutes=1)  # rows served while this look reads
    answered = read_window(log_dir(config.serving, config.served_model), started, until)
    mirrored = read_window(shadow_log_dir(config), started, until)
    paired = pair(config, champion, challenger, started, until, mirrored)
    test = mixture_sprt(
        paired["difference"].to_numpy(),
        alpha=settings.false_alarm_rate,
        tau=settings.min_effect,
        margin=settings.margin,
        min_rows=settings.min_labels,
        max_rows=settings.max_labels,
        out_of_time=now - started >= timedelta(hours=settings.stage_hours),
    )
    result: Record = {
        "stage": stage,
        "champion": champion,
        "challenger": challenger,
        "started_at": started.isoformat(),
        "looked_at": now.isoformat(timespec="seconds"),
        **test.as_record(),
        "score": "negative Brier score" if config.dataset.label.task == Task.classification else "negative squared error",
        "traffic": traffic(answered, mirrored, champion, challenger),
    }
    _record(config, challenger, {"stages": {stage: {"started_at": started.isoformat(), "last_look": result}}})
    _report(config, stage, result)
    log.info("%s %s of version %d: %s", config.name, stage, challenger, test.reason)
    return result


def pair(config: ProjectConfig, champion: int | None, challenger: int, start: datetime, end: datetime, mirrored: pd.DataFrame) -> pd.DataFrame:
    """The labelled rows served in ``[start, end)`` that both versions answered, one a request
    key: ``request_id``, ``truth``, ``champion`` and ``challenger`` (their predictions), and
    ``difference`` (challenger's score minus champion's). A labelled row whose other answer is not
    in the shadow log (a mirror skipped under load, or still buffered) is left out."""
    from pipelines.feedback.labels import read_labelled

    columns = [REQUEST_ID, "truth", "champion", "challenger", "difference"]
    labelled = read_labelled(config, start, end)
    if labelled.empty or mirrored.empty:
        return pd.DataFrame(columns=columns)
    truth = config.dataset.label.column
    both = labelled[[REQUEST_ID, MODEL_VERSION, OUTPUT, truth]].merge(mirrored[[REQUEST_ID, MODEL_VERSION, OUTPUT]].drop_duplicates(REQUEST_ID), on=REQUEST_ID, suffixes=("", "_other"))
    both = both[both[truth].notna() & (both[MODEL_VERSION] != both[f"{MODEL_VERSION}_other"])]
    answered_by_challenger = both[MODEL_VERSION] == challenger
    frame = pd.DataFrame(
        {
            REQUEST_ID: both[REQUEST_ID],
            "truth": both[truth].astype(float),
            "champion": np.where(answered_by_challenger, both[f"{OUTPUT}_other"], both[OUTPUT]).astype(float),
            "challenger": np.where(answered_by_challenger, both[OUTPUT], both[f"{OUTPUT}_other"]).astype(float),
        }
    )
    frame["difference"] = (frame["champion"] - frame["truth"]) ** 2 - (frame["challenger"] - frame["truth"]) ** 2
    return frame.reset_index(drop=True)


def traffic(answered: pd.DataFrame, mirrored: pd.DataFrame, champion: int | None, challenger: int) -> Record:
    """Rows each version answered in the stage, their p50 and p99 latency (ms), the rows mirrored
    to the other version, and the share of rows where both gave the same ``label`` (or, for a
    regression, the mean absolute difference of their predictions)."""
    result: Record = {"mirrored_rows": len(mirrored)}
    for role, version in (("champion", champion), ("challenger", challenger)):
        rows = answered[answered[MODEL_VERSION] == version] if not answered.empty else answered
        latency = rows["latency_ms"].dropna() if not rows.empty else pd.Series(dtype=float)
        result[role] = {
            "version": version,
            "answered_rows": len(rows),
            "p50_ms": float(latency.quantile(0.5)) if len(latency) else None,
            "p99_ms": float(latency.quantile(0.99)) if len(latency) else None,
        }
    if answered.empty or mirrored.empty:
        result["agreement"] = None
        return result
    # a key answered more than once (a client resending its id) counts once, its latest answer
    both = (
        answered[[REQUEST_ID, OUTPUT, *([LABEL_OUTPUT] if LABEL_OUTPUT in answered else [])]]
        .drop_duplicates(REQUEST_ID, keep="last")
        .merge(mirrored[[REQUEST_ID, OUTPUT, *([LABEL_OUTPUT] if LABEL_OUTPUT in mirrored else [])]].drop_duplicates(REQUEST_ID, keep="last"), on=REQUEST_ID, suffixes=("", "_other"))
    )
    if both.empty:
        result["agreement"] = None
    elif LABEL_OUTPUT in both and both[LABEL_OUTPUT].notna().all():
        result["agreement"] = {"label_agreement": float((both[LABEL_OUTPUT] == both[f"{LABEL_OUTPUT}_other"]).mean()), "rows": len(both)}
    else:
        result["agreement"] = {"mean_abs_difference": float((both[OUTPUT] - both[f"{OUTPUT}_other"]).abs().mean()), "rows": len(both)}
    return result


def advance(config: ProjectConfig, challenger: int, to: str, run: Record, reason: str, approval: Record | None = None) -> Record:
    """Take the rollout of ``challenger`` to ``to``: ``canary`` (the challenger answers
    ``rollout.canary_share`` of request ids), ``full`` (the challenger becomes the served version,
    the rollout ends) or ``aborted`` (the champion serves alone). ``reason`` and ``approval`` (who
    approved, when, their comment) go into the challenger's lineage. Aborting a rollout that is
    no longer in progress changes nothing, its lineage included (a retried task, or a DAG run
    whose rollout a rollback ended)."""
    rollout = repository.route_of(config.model_dir)
    if to == CANARY:
        if rollout is None or rollout.challenger != challenger:
            raise RolloutError(f"project {config.name}: no rollout of version {challenger} to take to canary (the served model routes {rollout})")
        entry = live.route(config, Route(challenger, CANARY, config.rollout.canary_share), run, event=CANARY)
    elif to == FULL:
        if rollout is None or rollout.challenger != challenger:
            raise RolloutError(f"project {config.name}: no rollout of version {challenger} to take to full (the served model routes {rollout})")
        entry = live.serve(config, challenger, run, event="rollout")
    elif to == ABORTED:
        if rollout is None or rollout.challenger != challenger:  # ended already (a rollback): its record stands
            return {"challenger": challenger, "stage": to, "reason": reason, "history": {"unchanged": True}}
        entry = live.route(config, None, run, event="abort")
    else:
        raise RolloutError(f"rollout stage {to!r}: expected one of {CANARY}, {FULL}, {ABORTED}")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stage: Record = {"started_at": now, "reason": reason, "approval": approval, "run_id": run.get("run_id")}
    _record(config, challenger, {"stages": {to: stage}, **({"outcome": to, "ended_at": now} if to in (FULL, ABORTED) else {})})
    _report(config, to, None)
    return {"challenger": challenger, "stage": to, "reason": reason, "history": entry}


def _lineage(config: ProjectConfig, version: int) -> Record:
    return repository.lineage_of(config.model_dir, version)


def _record(config: ProjectConfig, challenger: int, changes: Record) -> None:
    """Merge ``changes`` into the ``rollout`` section of the challenger's lineage (stages merged by name)."""
    path = config.model_dir / str(challenger) / LINEAGE_FILE
    lineage = read_json(path)
    section: dict[str, Any] = lineage.get("rollout") or {}
    stages = {**section.get("stages", {}), **{name: {**section.get("stages", {}).get(name, {}), **value} for name, value in changes.get("stages", {}).items()}}
    write_json(path, {**lineage, "rollout": {**section, **changes, "stages": stages}})


def _report(config: ProjectConfig, stage: str, result: Record | None) -> None:
    """The stage and, after a look, the test's bounds and rows, for Prometheus (job ``rollout``)."""
    samples = [Sample("flywheel_rollout_stage", "1 for the stage the latest rollout is in (shadow, canary, full, aborted).", 1.0, {"stage": stage})]
    if result is not None:
        for name, key, text in (
            ("flywheel_rollout_difference_lower", "lower", "Always-valid lower bound of the mean per-row score difference challenger - champion."),
            ("flywheel_rollout_difference_upper", "upper", "Always-valid upper bound of the mean per-row score difference challenger - champion."),
        ):
            if result.get(key) is not None:
                samples.append(Sample(name, text, float(result[key])))
        samples.append(Sample("flywheel_rollout_labels", "Paired labelled rows the rollout's sequential test has used.", float(result["rows"])))
    emit(config.metrics, config.identity, "rollout", samples)
