"""The rollout's stages without Triton or a scheduler: a look pairs the labelled rows of a stage
with the other version's answers from the shadow log and decides with the mixture SPRT; advancing
rewrites the champion's routing; every look and decision lands in the challenger's lineage.
The logs and labelled rows are written in the layout the server and the feedback join write."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from pipelines.artifacts import MODEL_FILE, OUTPUT
from pipelines.config import FeatureType
from pipelines.serving import repository, rollout
from pipelines.serving.client import log_dir
from pipelines.serving.live import RouteRefused
from pipelines.serving.repository import CANARY, SHADOW, Route
from pipelines.serving.rollback import RollbackRefused, previous_served, rollback
from tests.conftest import make_project

RUN = {"dag_id": "rollout", "run_id": "manual__1", "run_type": "manual", "logical_date": None}


@pytest.fixture
def routed(tmp_path):
    """Version 1 serves, version 2 is routed in shadow (repository only: no Triton)."""
    config = make_project(tmp_path, {"rollout": {"enabled": True, "min_labels": 50, "max_labels": 5000, "stage_hours": 1}})
    model = tmp_path / MODEL_FILE
    model.write_bytes(b"stands for a model: a look reads logs, never the model")
    for _ in range(2):
        repository.add_version(config.model_dir, {MODEL_FILE: model, **repository.BACKEND_FILES}, {"export": {}})
    repository.write_model_config(config.model_dir, repository.model_config(config.model_dir, config.serving, config.dataset, 1))
    entry = rollout.start(config, 2, RUN)
    assert entry["event"] == SHADOW and repository.route_of(config.model_dir) == Route(2, SHADOW, 0.0)
    return config


def serve(config, truth: np.ndarray, champion: np.ndarray, challenger: np.ndarray, answered_by: np.ndarray, served_at: datetime) -> list[str]:
    """Rows served at ``served_at``: each answered by version ``answered_by`` (1 or 2) into the
    log and by the other into the shadow log, and all their labels back. Returns their keys."""
    rows = len(truth)
    keys = [uuid.uuid4().hex for _ in range(rows)]
    features = {f.name: (np.full(rows, "EWR") if f.type == FeatureType.categorical else np.zeros(rows, np.float32)) for f in config.dataset.features}

    def frame(prediction: np.ndarray, version: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(
            {
                **features,
                OUTPUT: prediction.astype(np.float32),
                "label": (prediction >= 0.5).astype(np.int32),
                "request_id": keys,
                "model": config.served_model,
                "model_version": version.astype(np.int64),
                "served_at": pd.Series([served_at] * rows).astype("datetime64[us, UTC]"),
                "latency_ms": np.where(version == 2, 3.0, 1.0),
            }
        )

    answered = frame(np.where(answered_by == 2, challenger, champion), answered_by)
    mirrored = frame(np.where(answered_by == 2, champion, challenger), 3 - answered_by).assign(latency_ms=np.nan)
    day = f"date={served_at:%Y-%m-%d}"
    for folder, rows_ in ((log_dir(config.serving, config.served_model), answered), (rollout.shadow_log_dir(config), mirrored)):
        (folder / day).mkdir(parents=True, exist_ok=True)
        rows_.to_parquet(folder / day / f"part-{uuid.uuid4().hex}.parquet", index=False)
    labelled = answered.assign(**{config.dataset.label.column: truth.astype(float), "observed_at": pd.Timestamp(served_at), "feedback_file": "labels.csv"})
    (config.feedback.labelled_dir / day).mkdir(parents=True, exist_ok=True)
    labelled.to_parquet(config.feedback.labelled_dir / day / f"part-{uuid.uuid4().hex}.parquet", index=False)
    return keys


def scores(rows: int, seed: int, challenger_noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth with a 30% positive rate; the champion's probability is the true one with some noise,
    the challenger's with ``challenger_noise`` (more noise: a worse Brier score)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 0.6, rows)
    truth = (rng.uniform(size=rows) < p).astype(int)
    return truth, np.clip(p + rng.normal(0, 0.15, rows), 0, 1), np.clip(p + rng.normal(0, challenger_noise, rows), 0, 1)


def now_after(config) -> datetime:
    started = datetime.fromisoformat(repository.lineage_of(config.model_dir, 2)["rollout"]["stages"][SHADOW]["started_at"])
    return started + timedelta(minutes=5)


def test_a_better_challenger_is_promoted_out_of_shadow_with_its_statistics_in_lineage(routed):
    config = routed
    truth, champion, challenger = scores(3000, seed=1, challenger_noise=0.02)
    when = now_after(config)
    serve(config, truth, champion, challenger, np.ones(3000, int), when - timedelta(minutes=1))

    look = rollout.look(config, 2, SHADOW, now=when)

    assert look["decision"] == "promote" and look["rows"] == 3000 and look["lower"] > 0
    expected = np.mean((champion - truth) ** 2 - (challenger - truth) ** 2)
    assert look["mean"] == pytest.approx(expected, rel=1e-4)  # float32 as logged
    assert look["traffic"]["champion"]["answered_rows"] == 3000 and look["traffic"]["challenger"]["answered_rows"] == 0
    assert look["traffic"]["champion"]["p50_ms"] == 1.0 and look["traffic"]["mirrored_rows"] == 3000
    assert 0 < look["traffic"]["agreement"]["label_agreement"] < 1
    stages = repository.lineage_of(config.model_dir, 2)["rollout"]["stages"]
    assert stages[SHADOW]["last_look"]["decision"] == "promote" and stages[SHADOW]["last_look"]["alpha"] == config.rollout.false_alarm_rate
    pushed = (config.metrics.textfile_dir / "rollout.prom").read_text()
    assert 'flywheel_rollout_stage{model="flights_delay",project="flights",stage="shadow"} 1.0' in pushed and "flywheel_rollout_difference_lower" in pushed


def test_a_worse_challenger_is_aborted_and_the_champion_serves_alone(routed):
    config = routed
    truth, champion, challenger = scores(2000, seed=2, challenger_noise=0.4)
    when = now_after(config)
    serve(config, truth, champion, challenger, np.ones(2000, int), when - timedelta(minutes=1))

    look = rollout.look(config, 2, SHADOW, now=when)
    assert look["decision"] == "abort" and look["upper"] < 0
    rollout.advance(config, 2, rollout.ABORTED, RUN, reason=look["reason"])

    assert repository.route_of(config.model_dir) is None and repository.served_version(config.model_dir) == 1
    record = repository.lineage_of(config.model_dir, 2)["rollout"]
    assert record["outcome"] == "aborted" and record["stages"]["aborted"]["reason"] == look["reason"]
    # a DAG run still looking (the rollout was ended by an alert's rollback, say) is told to abort, changing nothing
    ended = rollout.look(config, 2, SHADOW, now=when)
    assert ended["decision"] == "abort" and "already ended (aborted" in ended["reason"] and ended["rows"] == 0
    rollout.advance(config, 2, rollout.ABORTED, RUN, reason=ended["reason"])  # that run's abort task
    assert repository.lineage_of(config.model_dir, 2)["rollout"] == record  # the first abort's record stands


def test_too_few_labels_continue_and_an_undecided_stage_aborts_when_its_time_is_up(routed):
    config = routed
    truth, champion, challenger = scores(30, seed=3, challenger_noise=0.15)
    when = now_after(config)
    serve(config, truth, champion, challenger, np.ones(30, int), when - timedelta(minutes=1))

    assert rollout.look(config, 2, SHADOW, now=when)["decision"] == "continue"
    late = rollout.look(config, 2, SHADOW, now=when + timedelta(hours=config.rollout.stage_hours))
    assert late["decision"] == "abort" and "undecided" in late["reason"]


def test_rows_served_before_the_stage_began_are_not_its_evidence(routed):
    config = routed
    truth, champion, challenger = scores(3000, seed=4, challenger_noise=0.02)
    when = now_after(config)
    serve(config, truth, champion, challenger, np.ones(3000, int), when - timedelta(hours=2))  # before shadow began
    assert rollout.look(config, 2, SHADOW, now=when)["rows"] == 0


def test_a_canary_pairs_rows_whichever_version_answered(routed):
    config = routed
    rollout.advance(config, 2, CANARY, RUN, reason="shadow promoted")
    assert repository.route_of(config.model_dir) == Route(2, CANARY, config.rollout.canary_share)
    with pytest.raises(rollout.RolloutError, match="no shadow of version 2 is in progress"):
        rollout.look(config, 2, SHADOW)  # a stage asked out of order
    started = datetime.fromisoformat(repository.lineage_of(config.model_dir, 2)["rollout"]["stages"][CANARY]["started_at"])
    truth, champion, challenger = scores(3000, seed=5, challenger_noise=0.02)
    answered_by = np.where(np.random.default_rng(5).uniform(size=3000) < 0.2, 2, 1)
    serve(config, truth, champion, challenger, answered_by, started + timedelta(minutes=1))

    look = rollout.look(config, 2, CANARY, now=started + timedelta(minutes=2))

    assert look["rows"] == 3000 and look["decision"] == "promote"
    assert look["mean"] == pytest.approx(np.mean((champion - truth) ** 2 - (challenger - truth) ** 2), rel=1e-4)
    assert look["traffic"]["challenger"]["answered_rows"] == (answered_by == 2).sum() and look["traffic"]["challenger"]["p50_ms"] == 3.0
    rollout.advance(config, 2, rollout.FULL, RUN, reason=look["reason"], approval={"by": "alice", "comment": "ok"})
    assert repository.served_version(config.model_dir) == 2 and repository.route_of(config.model_dir) is None
    assert repository.lineage_of(config.model_dir, 2)["rollout"]["stages"]["full"]["approval"]["by"] == "alice"
    # the alert's rollback (no version) now serves the version served before
    assert previous_served(config) == 1
    assert rollback(config, None, RUN, reason="test")["version"] == 1


def test_a_rollout_that_cannot_be_routed_is_refused_with_the_reason(routed):
    config = routed
    with pytest.raises(RouteRefused, match="challenger 7 is not a version"):
        from pipelines.serving import live

        live.route(config, Route(7, SHADOW, 0.0), RUN, event=SHADOW)
    assert repository.route_of(config.model_dir) == Route(2, SHADOW, 0.0)  # unchanged
    result = rollback(config, None, RUN, reason="alert")
    assert result["ended_rollout"] == 2 and repository.route_of(config.model_dir) is None
    with pytest.raises(RollbackRefused, match="names no version served before it"):
        rollback(config, None, RUN, reason="nothing to go back to")
    history = [json.loads(line) for line in (config.artifacts_dir / "serving" / config.served_model / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == [SHADOW, "abort"]
