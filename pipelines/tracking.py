"""Experiment tracking: every training run in MLflow, without ever failing a run over it.

A candidate's MLflow run is opened when it is trained (``open_run``); the steps after add to the
same run (``log``): per-epoch train/val curves (``EpochMetrics``, a Lightning callback), the
exported ONNX file, the gate's metrics and decision, the version it became. Where the run lives is
the candidate's ``tracking.json`` (``Record`` below), which a retried task reads to go on logging
into the same run, and which publish copies into the version's lineage:

    {"status": "logged" | "local" | "off", "store": tracking URI, "run_id": str, "experiment_id": str,
     "url": the MLflow UI page of the run, or None, "detail": what happened, in words}

* ``logged``: the tracking server (``tracking.uri``) answered ``GET /health`` within ``timeout_s``.
* ``local``: it did not. The run goes to an MLflow SQLite store inside the candidate folder
  (``mlflow/``, readable with ``mlflow ui --backend-store-uri sqlite:///<folder>/mlflow/mlflow.db``),
  and ``detail`` says why the server was not used.
* ``off``: ``tracking.uri`` is null; nothing is logged.

A call that fails later (the server went away mid-training) is a warning, never an error: the
record's ``detail`` says what was lost, and training, export, gate and publish go on.
Source: MLflow's tracking client API (``mlflow.MlflowClient``), https://mlflow.org/docs/latest/.
"""

from __future__ import annotations

import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl

from pipelines.config import TrackingConfig
from pipelines.lineage import Record, read_json, write_json

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
TRACKING_FILE = "tracking.json"  # in the candidate folder
LOCAL_STORE = "mlflow"  # the candidate folder's own store when the server is unreachable
LOGGED, LOCAL, OFF = "logged", "local", "off"
# Tags every Flywheel run carries; the version's lineage and the run point at each other through them.
PROJECT_TAG, VERSION_TAG, LINEAGE_TAG, DECISION_TAG = "flywheel.project", "flywheel.version", "flywheel.lineage", "flywheel.gate_decision"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value


def server_answers(uri: str, timeout_s: float) -> str | None:
    """None when the tracking server at ``uri`` answers ``GET /health`` with 200 within
    ``timeout_s`` seconds, else why not (one line)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as answer:
            return None if answer.status == 200 else f"GET /health answered HTTP {answer.status}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"GET {uri.rstrip('/')}/health failed: {getattr(error, 'reason', error)}"


def open_run(
    tracking: TrackingConfig, project: str, folder: Path, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> Record:
    """The MLflow run of the candidate in ``folder``: the one a killed earlier try opened (its
    ``tracking.json``), else a new one in the experiment named ``project``, with ``params``
    (flattened to ``a.b`` keys) and ``tags``. Never raises: a run that cannot be opened anywhere
    is recorded as ``off`` with the reason."""
    if tracking.uri is None:
        return {"status": OFF, "store": None, "run_id": None, "experiment_id": None, "url": None, "detail": "tracking.uri is null: not tracked"}
    earlier = folder / TRACKING_FILE
    if earlier.is_file():
        record: Record = read_json(earlier)
        if record.get("run_id"):
            return record
    why = server_answers(tracking.uri, tracking.timeout_s)
    if why is None:
        store, status, detail = tracking.uri, LOGGED, f"MLflow at {tracking.uri}"
    else:
        local = folder / LOCAL_STORE
        local.mkdir(parents=True, exist_ok=True)
        store, status = f"sqlite:///{local / 'mlflow.db'}", LOCAL
        detail = f"tracking server unavailable ({why}): logged to {local}"
        log.warning("MLflow %s; this run logs to %s instead", why, local)
    record = {"status": status, "store": store, "run_id": None, "experiment_id": None, "url": None, "detail": detail}
    try:
        client = _client(record, tracking.timeout_s)
        experiment = _experiment(client, project, None if status == LOGGED else (folder / LOCAL_STORE / "artifacts").as_uri())
        run = client.create_run(experiment, run_name=run_name, tags={PROJECT_TAG: project, **tags})
        record |= {"run_id": run.info.run_id, "experiment_id": experiment}
        if status == LOGGED and tracking.ui_url:
            record["url"] = f"{tracking.ui_url}/#/experiments/{experiment}/runs/{run.info.run_id}"
        from mlflow.entities import Param

        flat = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in _flat(params).items()]
        client.log_batch(run.info.run_id, params=flat)
    except Exception as error:  # noqa: BLE001 - tracking never fails training, whatever MLflow raises
        log.warning("MLflow run not opened in %s: %s", store, error)
        return record | {"status": OFF, "detail": f"{detail}; the run could not be opened: {type(error).__name__}: {error}"}
    write_json(earlier, record)
    return record


def log_to(
    record: Record,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    artifacts: list[Path] | None = None,
    step: int | None = None,
    timeout_s: float = 5.0,
) -> bool:
    """Add ``metrics`` (non-finite ones left out), ``tags`` and ``artifacts`` (files) to the run of
    ``record``; False, with a warning, when it is not tracked or the store refuses. Never raises."""
    if not record.get("run_id") or record.get("status") == OFF:
        return False
    try:
        client = _client(record, timeout_s)
        from mlflow.entities import Metric, RunTag

        values = [Metric(k, float(v), _now_ms(), step or 0) for k, v in (metrics or {}).items() if v is not None and math.isfinite(float(v))]
        client.log_batch(record["run_id"], metrics=values, tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
        for path in artifacts or []:
            client.log_artifact(record["run_id"], str(path))
    except Exception as error:  # noqa: BLE001 - see open_run
        log.warning("MLflow run %s in %s: not logged (%s: %s)", record["run_id"], record.get("store"), type(error).__name__, error)
        return False
    return True


def log_decision(folder: Path, decision: Record, timeout_s: float = 5.0) -> bool:
    """The gate's ``decision`` on the candidate in ``folder``, into its run: the numbers of each
    side as ``gate.<side>.<metric>`` (challenger, champion, base), ``gate.difference`` and the
    interval's ``gate.interval_low`` / ``gate.interval_high``; the decision and reason as tags.
    Numbers it does not find are left out; never raises."""
    metrics = {
        f"gate.{side}.{name}": value
        for side in ("challenger", "champion", "base")
        for name, value in (decision.get(side) or {}).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    found = decision.get("interval")
    interval: Record = found if isinstance(found, dict) else {}
    named = {"gate.difference": decision.get("difference"), "gate.interval_low": interval.get("low"), "gate.interval_high": interval.get("high")}
    metrics |= {k: v for k, v in named.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tags = {DECISION_TAG: str(decision.get("decision")), "flywheel.gate_reason": str(decision.get("reason", ""))[:5000]}
    return log_to(candidate_run(folder), metrics, tags, timeout_s=timeout_s)


def airflow_tags(run: Record | None) -> dict[str, str]:
    """The Airflow run as run tags: ``airflow.dag_id``, ``airflow.run_id`` (those it has)."""
    return {f"airflow.{k}": str(run[k]) for k in ("dag_id", "run_id") if run and run.get(k)}


def tag_version(record: Record, version: int, lineage: str, timeout_s: float = 5.0) -> bool:
    """Name the version a run became and its lineage record (path from the home) on the run."""
    return log_to(record, tags={VERSION_TAG: str(version), LINEAGE_TAG: lineage}, timeout_s=timeout_s)


def finish(record: Record, status: str = "FINISHED", timeout_s: float = 5.0) -> None:
    """End the run with MLflow's ``status`` (FINISHED, FAILED, KILLED); a warning if the store
    does not answer."""
    if not record.get("run_id") or record.get("status") == OFF:
        return
    try:
        _client(record, timeout_s).set_terminated(record["run_id"], status)
    except Exception as error:  # noqa: BLE001 - see open_run
        log.warning("MLflow run %s not marked finished: %s", record["run_id"], error)


def candidate_run(folder: Path) -> Record:
    """The tracking record of the candidate in ``folder``; ``off`` when it has none (trained
    before tracking, or with tracking.uri null)."""
    file = folder / TRACKING_FILE
    if file.is_file():
        found: Record = read_json(file)
        return found
    return {"status": OFF, "store": None, "run_id": None, "experiment_id": None, "url": None, "detail": "the candidate was not tracked"}


class EpochMetrics(pl.Callback):
    """Log every scalar the LightningModule logged for the epoch (``train_loss``, ``val_loss``,
    ...) to the run of ``record`` at step = the epoch, once an epoch. The first failure stops it
    for the rest of the fit (``lost`` says when and why), so a dead server costs one timeout."""

    def __init__(self, record: Record, timeout_s: float = 5.0) -> None:
        self.record, self.timeout_s, self.lost = record, timeout_s, ""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lost or trainer.sanity_checking:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if getattr(value, "numel", lambda: 1)() == 1}
        if not log_to(self.record, metrics, step=trainer.current_epoch, timeout_s=self.timeout_s) and self.record.get("run_id"):
            self.lost = f"per-epoch metrics stopped at epoch {trainer.current_epoch}: the store did not take them"


def _client(record: Record, timeout_s: float) -> MlflowClient:
    # A dead server must cost seconds, not MLflow's default of 7 retries with backoff and 120 s each.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s))))
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=record["store"])


def _experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if missing (another process may create it at the same time)."""
    for _ in range(2):
        found = client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(client.create_experiment(name, artifact_location=artifact_location))
        except Exception:  # noqa: BLE001 - RESOURCE_ALREADY_EXISTS from a concurrent create: read it again
            continue
    raise RuntimeError(f"MLflow experiment {name!r} could be neither found nor created")


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
