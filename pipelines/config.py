"""Typed configuration of the projects of one deployment.

A deployment home (``$FLYWHEEL_HOME``, default: the working directory) holds one folder per
project, ``projects/<name>/params.yaml`` (plus a tabular project's expectation suite,
``projects/<name>/expectations.json``), and ``projects/defaults.yaml``: what every project
shares (the Triton and Pushgateway addresses, the serving profile), laid under each
project's own file. A project is ``tabular`` (a table with a label: validate, split, train,
gate, export, publish) or ``text`` (a fine-tuned transformers classifier).

A project's file names no paths: its state lives under the home in folders named after it
(``landing/<name>/``, ``data/<name>/``, ``quarantine/<name>/``, ``artifacts/<name>/``, ...).
Every model is frozen and forbids unknown keys, so a typo is an error that names the file
and the key instead of a silent default.
"""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from pipelines.errors import NotRetryable

PROJECTS_DIR = "projects"
PARAMS_FILE = "params.yaml"
SUITE_FILE = "expectations.json"
DEFAULTS_FILE = "defaults.yaml"  # in projects/: what every project of the deployment shares
PROJECT_NAME = r"^[a-z][a-z0-9_]*$"
# Without an id column, a row's id is a hash of its values (pipelines.data.raw.row_ids).
ROW_ID = "row_id"
# Each raw row's batch: the batch's file name in the archive (pipelines.data.batches).
BATCH = "_batch"
# A deployment's changes to params.yaml (serving profile, Triton and Pushgateway addresses), in
# a YAML file of the same sections: in the compose deployment, docker-compose.yml's
# `flywheel-params` config, mounted at /opt/flywheel/params.compose.yaml.
OVERRIDES_ENV = "FLYWHEEL_PARAMS_OVERRIDES"
DVC_SECTIONS = frozenset({"dataset", "split"})  # the DVC split stage versions these (pipelines.data.versioning)
# The Celery queue of tasks that want a GPU (training, fine-tuning): on the CeleryExecutor only
# workers started with `--queues gpu` take them; the LocalExecutor ignores queues. A constant,
# not a setting: DAG files read it when parsed, and parsing must not read the project's files.
GPU_QUEUE = "gpu"


def task_defaults(retries: int = 2, retry_delay: timedelta = timedelta(minutes=1), max_retry_delay: timedelta | None = timedelta(minutes=30)) -> dict[str, Any]:
    """A DAG's ``default_args``: the owner on-call pages, and retries with exponential backoff."""
    defaults: dict[str, Any] = {"owner": "ml-platform", "retries": retries, "retry_delay": retry_delay, "retry_exponential_backoff": True}
    return defaults | ({"max_retry_delay": max_retry_delay} if max_retry_delay else {})


class ConfigError(NotRetryable, ValueError):
    """The project configuration is missing or invalid."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureType(str, Enum):
    categorical = "categorical"
    numeric = "numeric"


class Feature(Strict):
    name: str
    type: FeatureType


class Task(str, Enum):
    classification = "classification"  # binary: the label holds 0 and 1
    regression = "regression"


class Label(Strict):
    column: str
    task: Task


class DatasetConfig(Strict):
    name: str = Field(pattern=PROJECT_NAME)
    landing_dir: Path
    raw_path: Path  # a directory of parquet parts, one per batch, inside the project's DVC repository (data_dir)
    archive_dir: Path
    quarantine_dir: Path
    expectation_suite: Path
    # Optional: without an id, a row's id is a hash of its values (a re-sent identical row
    # replaces itself); without a time, the split is a seeded hash split.
    id_column: str | None = None
    time_column: str | None = None
    label: Label
    features: tuple[Feature, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_columns(self) -> DatasetConfig:
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset.features lists {duplicates} more than once")
        reserved = set(names) & {self.id_column, self.time_column, self.label.column, ROW_ID, BATCH}
        if reserved:
            raise ValueError(f"dataset.features must not include the id, time or label column (or {ROW_ID!r}, {BATCH!r}): {sorted(reserved)}")
        return self

    @property
    def key(self) -> str:
        """The column that identifies a row of the raw data: the id column, or the derived row id."""
        return self.id_column or ROW_ID

    def columns_of(self, kind: FeatureType) -> list[str]:
        return [f.name for f in self.features if f.type == kind]

    @property
    def columns(self) -> list[str]:
        """Every column a batch must carry."""
        ids = [c for c in (self.id_column, self.time_column) if c]
        return [*ids, *(f.name for f in self.features), self.label.column]


WINDOW = re.compile(r"^\s*([1-9][0-9]*)\s*(day|week|month|year)s?\s*$", re.IGNORECASE)


class SplitConfig(Strict):
    output_dir: Path
    # Seeds the hash split of a project without a time column (and samples drawn from the split).
    seed: int = 13
    train: float = Field(gt=0, lt=1)
    val: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)
    # Only the latest rows are split (then trained on): "N days|weeks|months|years" back from the
    # newest time in the raw data, so a nightly retrain costs the same however long the history.
    # None: all of it. Needs a time column.
    window: str | None = Field(default=None, description='e.g. "12 months": split only the rows this recent')

    @field_validator("window")
    @classmethod
    def _window_form(cls, window: str | None) -> str | None:
        if window is not None and not WINDOW.match(window):
            raise ValueError(f'split.window must be a count and a unit such as "90 days", "8 weeks", "12 months" or "2 years", got {window!r}')
        return window

    @property
    def window_length(self) -> tuple[int, str] | None:
        """``split.window`` as (count, unit in the plural: days, weeks, months, years), or None."""
        if self.window is None:
            return None
        match = WINDOW.match(self.window)
        assert match is not None  # validated
        return int(match[1]), f"{match[2].lower()}s"

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split.train + split.val + split.test must be 1, got {total:g}")
        return self


class VersioningConfig(Strict):
    remote: str = Field(min_length=1, description="DVC remote: a directory, or s3://, gs://, azure:// for a cluster")


class ModelConfig(Strict):
    name: str = Field(pattern=PROJECT_NAME, description="its name in Triton; default: the project's")
    embedding_dim: int = Field(default=8, ge=1, le=256)
    hidden_sizes: tuple[int, ...] = Field(default=(64, 32), min_length=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)


class TrainConfig(Strict):
    max_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    patience: int = Field(ge=1)
    seed: int
    # At most this many training rows a run: a sample seeded by ``seed`` when the train split is
    # larger, so that a run costs the same however large the split grows. None: every row.
    max_rows: int | None = Field(default=None, ge=1)


Metric = Literal["roc_auc", "f1", "log_loss", "rmse", "mae"]
# "loss": a fine-tuned causal LM's held-out loss (pipelines.finetune.evaluate).
LOWER_IS_BETTER: frozenset[str] = frozenset({"log_loss", "rmse", "mae", "loss"})
METRICS_FOR_TASK: dict[Task, frozenset[str]] = {
    Task.classification: frozenset({"roc_auc", "f1", "log_loss"}),
    Task.regression: frozenset({"rmse", "mae"}),
}


class ThresholdObjective(str, Enum):
    f1 = "f1"  # the threshold of the best F1 on the validation split
    precision = "precision"  # the best recall among thresholds whose precision is at least the target
    recall = "recall"  # the best precision among thresholds whose recall is at least the target


class DecisionThreshold(Strict):
    """How a classifier's served ``label`` cut is chosen on the validation split."""

    objective: ThresholdObjective = ThresholdObjective.f1
    target: float | None = Field(default=None, gt=0, le=1, description="the precision or recall to keep (objective precision or recall)")

    @model_validator(mode="after")
    def _target_for_its_objective(self) -> DecisionThreshold:
        if (self.objective == ThresholdObjective.f1) != (self.target is None):
            raise ValueError(
                f"threshold.target is {'required' if self.target is None else 'not used'} with objective {self.objective.value!r}: "
                "give a target (e.g. 0.8) with objective precision or recall, none with f1"
            )
        return self


class GateConfig(Strict):
    metric: Metric
    # The lower bound of the interval of (challenger - champion) must clear it (in the metric's direction).
    min_improvement: float = Field(ge=0, description="least improvement over the champion, at the interval's lower bound")
    floor: float = Field(description="absolute bound the challenger must pass, champion or not")
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="two-sided level of the interval of the difference")
    resamples: int = Field(default=1000, ge=100, description="paired bootstrap resamples of the test rows")
    seed: int = Field(default=13, description="seed of the resamples")
    # Resampling the test rows cannot see how much the metric moves when only the training seed
    # changes; `flywheel seed-noise <project>` measures it on the current split.
    seed_noise: float = Field(default=0.0, ge=0, description="standard deviation of gate.metric between seeds")
    min_slice_rows: int = Field(default=200, ge=10, description="test rows a categorical value needs to be a slice")
    max_slice_regression: float = Field(default=0.02, ge=0, description="largest loss on any slice, at the interval's bound")
    # Extra slices: name -> a pandas query over the test split's columns, e.g. {long_haul: "distance > 2000"}.
    slices: dict[str, str] = {}
    threshold: DecisionThreshold = DecisionThreshold()


class TensorRTPrecision(str, Enum):
    off = "off"
    fp16 = "fp16"
    int8 = "int8"  # calibrated on a sample of the training split


class ExportConfig(Strict):
    opset: int = Field(default=18, ge=17)
    parity_rows: int = Field(default=2000, ge=1)
    parity_tolerance: float = Field(default=1e-4, gt=0)
    int8: bool = Field(default=False, description="try ONNX Runtime dynamic int8 quantisation")
    int8_tolerance: float = Field(default=0.002, ge=0, description="largest loss of the gate metric int8 may cost")
    tensorrt: TensorRTPrecision = Field(default=TensorRTPrecision.off, description="build a TensorRT engine (model.plan) where tensorrt and CUDA are present")
    tensorrt_fp16_tolerance: float = Field(default=1e-2, gt=0, description="largest |engine - onnxruntime| an fp16 engine may show")
    tensorrt_int8_tolerance: float = Field(default=5e-2, gt=0, description="the same for an int8 engine")
    tensorrt_calibration_rows: int = Field(default=2048, ge=1, description="training rows that calibrate an int8 engine")

    @field_validator("tensorrt", mode="before")
    @classmethod
    def _bare_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class ServingProfile(str, Enum):
    cpu = "cpu"  # Triton's Python backend running ONNX Runtime: the tritonserver bundled in nvidia-pytriton
    gpu = "gpu"  # platform onnxruntime_onnx with the TensorRT accelerator, or tensorrt_plan: the NGC image


class TritonConfig(Strict):
    # Where publish and rollback make versions live; null: write the repository only.
    url: str | None = Field(default=None, description="host:port of Triton's HTTP endpoint")
    http_port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=8001, ge=1, le=65535)
    metrics_port: int = Field(default=8002, ge=1, le=65535)
    load_timeout_s: float = Field(default=120, gt=0)


class InferenceLogConfig(Strict):
    """How Triton's side writes the inference log: off the request path, in buffered parquet
    chunks; a chunk is written when it holds ``flush_rows`` rows or is ``flush_seconds`` old,
    and at model unload (a clean shutdown loses nothing; a crash at most one chunk)."""

    flush_rows: int = Field(default=1000, ge=1, description="rows buffered before a chunk is written")
    flush_seconds: float = Field(default=5.0, gt=0, description="longest a served row waits in the buffer")


class ServingConfig(Strict):
    model_repository: Path = Path("model_repository")  # one Triton repository for every project
    profile: ServingProfile = ServingProfile.cpu
    max_batch_size: int = Field(default=4096, ge=1)
    max_queue_delay_microseconds: int = Field(default=2000, ge=0)
    triton: TritonConfig = TritonConfig()
    smoke_rows: int = Field(default=64, ge=1, description="real test rows sent to a new version before it serves")
    smoke_tolerance: float = Field(default=1e-5, gt=0)
    inference_log: Path = Path("inference_log")
    log: InferenceLogConfig = InferenceLogConfig()


class MetricsConfig(Strict):
    pushgateway: str | None = Field(default=None, description="host:port of a Prometheus Pushgateway")
    textfile_dir: Path = Path("reports/metrics")


class CalibratedTest(Strict):
    # A statistic whose threshold is calibrated per window size (pipelines.monitoring.drift).
    method: str


# The one statistic of each column type whose null the drift check knows (pipelines.monitoring.drift).
DRIFT_METHODS = {"numeric": "wasserstein", "categorical": "jensenshannon", "text": "abs_text_content_drift"}


class DriftTests(Strict):
    numeric: CalibratedTest = CalibratedTest(method="wasserstein")  # normed by the reference's std
    categorical: CalibratedTest = CalibratedTest(method="jensenshannon")
    # A domain classifier told apart reference and current: its ROC AUC on held-out rows.
    text: CalibratedTest = CalibratedTest(method="abs_text_content_drift")

    @model_validator(mode="before")
    @classmethod
    def _no_fixed_thresholds(cls, data: object) -> object:
        for kind in ("numeric", "categorical", "text"):
            test = data.get(kind) if isinstance(data, dict) else None
            if isinstance(test, dict) and "threshold" in test:
                raise ValueError(f"monitoring.tests.{kind}.threshold: drift thresholds are calibrated per window size for monitoring.false_alarm_rate; remove the threshold")
        return data

    @model_validator(mode="after")
    def _known_methods(self) -> DriftTests:
        for kind, method in DRIFT_METHODS.items():
            if getattr(self, kind).method != method:
                raise ValueError(f"monitoring.tests.{kind}.method {getattr(self, kind).method!r}: the calibrated test of {kind} columns is {method!r}")
        return self


class MonitoringConfig(Strict):
    reference_rows: int = Field(default=20000, ge=100, description="training rows stored with each version")
    min_rows: int = Field(default=200, ge=1, description="fewer logged rows in a window give no verdict")
    drift_share: float = Field(default=0.3, gt=0, le=1, description="share of drifted columns that is dataset drift")
    false_alarm_rate: float = Field(default=0.01, gt=0, lt=0.5, description="chance a column drifts by chance in a window")
    null_draws: int = Field(default=1000, ge=100, description="windows drawn per size to calibrate the thresholds")
    tests: DriftTests = DriftTests()
    exclude_columns: tuple[str, ...] = ()
    cooldown_hours: float = Field(default=24, ge=0, description="at most one drift-triggered retrain per period")
    reports_dir: Path = Path("reports/drift")
    # Acknowledging a drifted window on the on-call page silences the project's drift alerts in
    # this Alertmanager (pipelines.monitoring.acknowledge); None: the acknowledgement is only recorded.
    alertmanager: str | None = Field(default=None, description="Alertmanager's host:port (its API v2), or None")
    acknowledge_hours: float = Field(default=12, gt=0, description="how long an acknowledged window's drift alerts stay silenced")

    @model_validator(mode="after")
    def _draws_resolve_the_rate(self) -> MonitoringConfig:
        # The smallest p-value the draws give, doubled (a column's two tests), must reach the
        # dataset verdict's level, at least drift_share * false_alarm_rate (pipelines.monitoring.drift).
        needed = math.ceil(2 / (self.drift_share * self.false_alarm_rate))
        if self.null_draws + 1 < needed:
            raise ValueError(
                f"monitoring.null_draws {self.null_draws} cannot resolve false_alarm_rate {self.false_alarm_rate:g} at "
                f"drift_share {self.drift_share:g}: no window could ever be dataset drift; use at least {needed - 1}"
            )
        return self


class FeedbackConfig(Strict):
    """Ground truth that comes back for served requests, keyed by request id (``pipelines.feedback``)."""

    landing_dir: Path  # <name>.csv / .parquet files of request_id,label[,observed_at]
    labelled_dir: Path  # the joined rows, day-partitioned by served_at like the inference log
    archive_dir: Path  # feedback files once processed
    quarantine_dir: Path  # rows (or whole files) refused, with the validation report
    horizon_hours: float = Field(default=168, gt=0, description="a label observed later than this after its request is late")
    land_batches: bool = Field(default=True, description="labelled production rows are landed as training batches")


class PerformanceConfig(Strict):
    """Realized and estimated performance of the served version per window (``pipelines.feedback.performance``)."""

    window_hours: int = Field(default=24, ge=1, le=24, description="length of a performance window, a divisor of 24")
    min_labels: int = Field(default=200, ge=10, description="fewer labelled rows in a window give no realized verdict")
    false_alarm_rate: float = Field(default=0.01, gt=0, lt=0.5, description="chance a window without a drop is called degraded")
    min_drop: float = Field(default=0.0, ge=0, description="least drop below the version's test metric that matters, at the interval's bound")
    resamples: int = Field(default=1000, ge=100, description="bootstrap resamples of a window's labelled rows")
    seed: int = 13
    label_check_min_skill: float = Field(default=0.25, ge=0, lt=1, description="a labelled batch on which the champion keeps less of its test skill than this share is held")
    reports_dir: Path = Path("reports/performance")

    @field_validator("window_hours")
    @classmethod
    def _whole_days(cls, hours: int) -> int:
        # Windows aligned to UTC midnight, so every day is cut the same way and a cron fires at each end.
        if 24 % hours:
            raise ValueError(f"performance.window_hours {hours} must divide 24 (1, 2, 3, 4, 6, 8, 12 or 24)")
        return hours


class RolloutApproval(str, Enum):
    none = "none"
    required = "required"  # a person approves in Airflow (human-in-the-loop) before canary and before full


class RolloutConfig(Strict):
    """How a promoted challenger meets live traffic (``pipelines.serving.rollout``): in shadow, then
    as a canary, then in full, each stage decided by a sequential test on live labels
    (``pipelines.evaluation.sequential``). Off: a promoted challenger serves all traffic at once."""

    enabled: bool = False
    canary_share: float = Field(default=0.2, gt=0, lt=1, description="share of requests (by request id) the challenger answers as a canary")
    false_alarm_rate: float = Field(default=0.05, gt=0, lt=0.5, description="alpha of each stage's sequential test, at every look")
    min_effect: float = Field(default=0.01, gt=0, description="sd of the test's normal mixture over the mean per-row score difference")
    margin: float = Field(default=0.0, ge=0, description="promote when the lower bound clears -margin; abort when the upper bound is below it")
    min_labels: int = Field(default=100, ge=2, description="never decide on fewer paired labelled rows")
    max_labels: int = Field(default=20000, ge=2, description="a stage still undecided at this many rows aborts")
    stage_hours: float = Field(default=24, gt=0, description="a stage still undecided after this long aborts")
    poke_seconds: int = Field(default=60, ge=1, description="how often a stage looks at the labels that came back")
    approval: RolloutApproval = RolloutApproval.none
    approval_timeout_hours: float = Field(default=24, gt=0, description="an approval not given within this time rejects")
    limitations: tuple[str, ...] = ()  # known limitations, for the model card

    @model_validator(mode="after")
    def _max_above_min(self) -> RolloutConfig:
        if self.max_labels < self.min_labels:
            raise ValueError(f"rollout.max_labels {self.max_labels} is below rollout.min_labels {self.min_labels}: no stage could ever decide")
        return self


class FinetuneTask(str, Enum):
    sequence_classification = "sequence-classification"
    causal_lm = "causal-lm"


class FinetuneMethod(str, Enum):
    lora = "lora"
    qlora = "qlora"  # 4-bit nf4 base (bitsandbytes) under LoRA adapters


class FinetuneConfig(Strict):
    """Settings of a text project's finetune DAG; the run's hyperparameters are its Params."""

    # The Triton model (an ensemble: tokenizer, then the merged classifier) the classifier serves as.
    model_name: str = Field(pattern=PROJECT_NAME, description="default: the project's name")
    landing_dir: Path  # <dataset>.jsonl files land here
    datasets_dir: Path  # <dataset>.jsonl, one record a line, inside the project's DVC repository
    quarantine_dir: Path
    # One suite a record format: text (text, label), alpaca (instruction, input, output), chat (messages).
    suites: dict[str, Path] = {
        "text": Path("expectations/finetune_text.json"),
        "alpaca": Path("expectations/finetune_alpaca.json"),
        "chat": Path("expectations/finetune_chat.json"),
    }
    test_share: float = Field(default=0.2, gt=0, lt=0.5, description="records held out for evaluation, by hash")
    val_share: float = Field(default=0.1, gt=0, lt=0.5)
    batch_size: int = Field(default=16, ge=1)
    seed: int = 13
    # A fine-tuned classifier must beat the untuned base with a trained linear head by this much accuracy.
    min_gain_over_base: float = Field(default=0.02, ge=0)
    # ... and the served champion (same test records) by this much; a causal LM must lower held-out loss by this share.
    min_improvement: float = Field(default=0.0, ge=0)
    max_eval_records: int = Field(default=500, ge=10, description="test records scored per model")
    parity_tolerance: float = Field(default=1e-4, gt=0)


class SearchDimension(Strict):
    """One hyperparameter's range in a search space (``tune.space``): a float or int between
    ``low`` and ``high`` (on a log scale with ``log``), or one of ``choices``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("a categorical dimension has a non-empty `choices` list and no low/high")
        elif self.low is None or self.high is None or self.choices is not None or not self.low < self.high:
            raise ValueError(f"a {self.type} dimension has low < high and no choices, got low={self.low} high={self.high}")
        elif self.log and self.low <= 0:
            raise ValueError(f"a log-scale dimension needs low > 0, got {self.low}")
        return self


class PrunerConfig(Strict):
    """Optuna's MedianPruner: a trial stops when its epoch's validation loss is worse than the
    median of the completed trials' at the same epoch (Optuna docs, ``optuna.pruners.MedianPruner``)."""

    n_startup_trials: int = Field(default=3, ge=0, description="trials completed before any is pruned")
    n_warmup_steps: int = Field(default=0, ge=0, description="epochs of a trial before it may be pruned")


class TuneConfig(Strict):
    """Hyperparameter search of ``tune__<project>`` (``pipelines.tuning``): an Optuna study with the
    TPE sampler; the DAG's Params override the counts and the space for one run."""

    n_trials: int = Field(default=20, ge=1, le=500)
    parallelism: int = Field(default=2, ge=1, le=32, description="trials at once, one Airflow task each")
    timeout_minutes: float = Field(default=120, gt=0, le=24 * 60, description="no trial starts after this")
    max_epochs: int | None = Field(default=None, ge=1, description="a trial's epochs; default: train.max_epochs")
    seed: int = 13
    pruner: PrunerConfig = PrunerConfig()
    space: dict[str, SearchDimension] = {
        "learning_rate": SearchDimension(type="float", low=1e-4, high=3e-2, log=True),
        "batch_size": SearchDimension(type="categorical", choices=[256, 512, 1024, 2048]),
        "hidden_sizes": SearchDimension(type="categorical", choices=[[32], [64, 32], [128, 64], [128, 64, 32]]),
        "dropout": SearchDimension(type="float", low=0.0, high=0.4),
        "embedding_dim": SearchDimension(type="categorical", choices=[4, 8, 16]),
    }


class ProjectKind(str, Enum):
    tabular = "tabular"  # a table with a label: validate, split, train, export, gate, publish
    text = "text"  # a fine-tuned transformers text classifier (the finetune DAG)


class Homed(Strict):
    """Something configured in a deployment home, whose relative paths resolve against it."""

    # The deployment home; relative paths are resolved against it.
    home: Path = Field(exclude=True)

    @field_validator("home")
    @classmethod
    def _absolute(cls, home: Path) -> Path:
        return home.resolve()

    def path(self, relative: Path) -> Path:
        """A configured path, resolved against the deployment home."""
        return relative if relative.is_absolute() else self.home / relative

    def portable(self, path: Path) -> str:
        """``path`` as task results name it: relative to the home when inside it, so it means
        the same on every worker, wherever that worker mounts the shared home."""
        return path.relative_to(self.home).as_posix() if path.is_relative_to(self.home) else str(path)


class TrackingConfig(Strict):
    """Where experiments are kept (``pipelines.tracking``, ``pipelines.tuning``): every training
    run in an MLflow tracking server, every hyperparameter search in an Optuna study storage."""

    uri: str | None = Field(
        default=None, pattern=r"^https?://", description="the MLflow tracking server's URL; None: nothing is tracked"
    )
    ui: str | None = Field(default=None, pattern=r"^https?://", description="the MLflow UI's base URL as people reach it (the Models page links there); default: uri")
    timeout_s: float = Field(default=5.0, gt=0, le=120, description="how long a training run waits for the server before logging locally")
    # SQLAlchemy URL of the Optuna studies: the Airflow metadata database's engine, in a database
    # of its own (Optuna's and Airflow's Alembic version tables share a name). A relative SQLite
    # path resolves against the deployment home.
    study_storage: str = Field(default="sqlite:///artifacts/optuna.db", min_length=1)

    @property
    def ui_url(self) -> str | None:
        return (self.ui or self.uri or "").rstrip("/") or None


class Deployment(Homed):
    """What every project of a deployment shares (``projects/defaults.yaml``): one Triton and its
    model repository, one metrics sink, one DVC remote."""

    versioning: VersioningConfig = VersioningConfig(remote=".dvc-remote")
    serving: ServingConfig = ServingConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracking: TrackingConfig = TrackingConfig()


class Project(Deployment):
    """What every project has, whatever its kind."""

    name: str = Field(pattern=PROJECT_NAME)
    monitoring: MonitoringConfig = MonitoringConfig()
    # The project's DVC repository: its raw data and splits (tabular) or datasets (text).
    data_dir: Path
    # Candidates (trained models, served or not) and per-run lineage records live here.
    artifacts_dir: Path

    @property
    def served_model(self) -> str:
        """The model's name in Triton."""
        raise NotImplementedError

    @property
    def identity(self) -> dict[str, str]:
        """The labels every metric of the project carries: the project and its served model."""
        return {"project": self.name, "model": self.served_model}

    @property
    def served_model_dir(self) -> Path:
        """The served model's folder in the model repository: its config.pbtxt and numbered versions."""
        return self.serving.model_repository / self.served_model

    @property
    def project_dir(self) -> Path:
        """``projects/<name>/``: the project's params.yaml (and suite)."""
        return self.home / PROJECTS_DIR / self.name

    def _inside_data_dir(self, *paths: tuple[str, Path]) -> None:
        root = self.path(self.data_dir)
        outside = [f"{key}: {path}" for key, path in paths if not self.path(path).is_relative_to(root)]
        if outside:
            raise ValueError(f"{', '.join(outside)} must lie inside data_dir {self.data_dir} (the project's DVC repository)")


class DataEngine(str, Enum):
    duckdb = "duckdb"  # this machine, in bounded memory
    spark = "spark"  # a Spark cluster (data.spark_master)


class DataConfig(Strict):
    """Where the data steps (validation and the split) run. Both engines give the same outputs."""

    engine: DataEngine = DataEngine.duckdb
    spark_master: str = Field(default="local[2]", min_length=1, description="Spark master URL: local[N], spark://host:7077")


class ProjectConfig(Project):
    """A tabular project."""

    kind: Literal[ProjectKind.tabular] = ProjectKind.tabular
    dataset: DatasetConfig
    split: SplitConfig
    model: ModelConfig
    train: TrainConfig
    gate: GateConfig
    export: ExportConfig = ExportConfig()
    feedback: FeedbackConfig
    performance: PerformanceConfig = PerformanceConfig()
    rollout: RolloutConfig = RolloutConfig()
    tune: TuneConfig = TuneConfig()
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _window_needs_time(self) -> ProjectConfig:
        if self.split.window is not None and self.dataset.time_column is None:
            raise ValueError(f"split.window {self.split.window!r} needs dataset.time_column; without one, cap training with train.max_rows")
        return self

    @model_validator(mode="after")
    def _metric_fits_task(self) -> ProjectConfig:
        allowed = METRICS_FOR_TASK[self.dataset.label.task]
        if self.gate.metric not in allowed:
            raise ValueError(f"gate.metric {self.gate.metric!r} does not apply to a {self.dataset.label.task.value} label; use one of {sorted(allowed)}")
        return self

    @model_validator(mode="after")
    def _rollout_is_routed(self) -> ProjectConfig:
        if self.rollout.enabled and self.serving.profile != ServingProfile.cpu:
            raise ValueError(f"rollout.enabled: a rollout is routed by the cpu rendering (serving.profile cpu), not {self.serving.profile.value}")
        return self

    @model_validator(mode="after")
    def _monitored_columns_exist(self) -> ProjectConfig:
        unknown = sorted(set(self.monitoring.exclude_columns) - {f.name for f in self.dataset.features})
        if unknown:
            raise ValueError(f"monitoring.exclude_columns names {unknown}, which are not dataset.features")
        return self

    @model_validator(mode="after")
    def _versioned_paths(self) -> ProjectConfig:
        self._inside_data_dir(("dataset.raw_path", self.dataset.raw_path), ("split.output_dir", self.split.output_dir))
        return self

    @property
    def served_model(self) -> str:
        """The model's name in Triton."""
        return self.model.name

    @cached_property
    def model_dir(self) -> Path:
        """The model's folder in the model repository (``served_model_dir``)."""
        return self.serving.model_repository / self.model.name


class TextProjectConfig(Project):
    """A text project: a transformers classifier fine-tuned with LoRA/QLoRA and served as a Triton ensemble."""

    kind: Literal[ProjectKind.text]
    finetune: FinetuneConfig

    @property
    def served_model(self) -> str:
        """The model's name in Triton: the ensemble (tokenizer, then classifier)."""
        return self.finetune.model_name

    @model_validator(mode="after")
    def _versioned_paths(self) -> TextProjectConfig:
        self._inside_data_dir(("finetune.datasets_dir", self.finetune.datasets_dir))
        return self


AnyProject = ProjectConfig | TextProjectConfig


def project_home() -> Path:
    """The deployment home: ``$FLYWHEEL_HOME``, else the working directory."""
    return Path(os.environ.get("FLYWHEEL_HOME") or Path.cwd()).resolve()


def project_kinds(home: Path | str | None = None) -> dict[str, ProjectKind]:
    """Every project of the deployment and its kind, by name (sorted). Reads only YAML: DAG files
    call it when parsed. A folder without params.yaml is not a project; one whose file cannot be
    read is left out here and fails where it is loaded, with the reason."""
    root = (Path(home).resolve() if home else project_home()) / PROJECTS_DIR
    kinds: dict[str, ProjectKind] = {}
    for file in sorted(root.glob(f"*/{PARAMS_FILE}")):
        try:
            raw = yaml.safe_load(file.read_text())
            kinds[file.parent.name] = ProjectKind((raw or {}).get("kind", ProjectKind.tabular.value))
        except (OSError, yaml.YAMLError, ValueError, AttributeError):
            continue
    return kinds


def load_deployment(home: Path | str | None = None) -> Deployment:
    """The shared settings of the deployment in ``home``: ``projects/defaults.yaml`` (its
    ``versioning``, ``serving``, ``metrics`` and ``tracking`` sections), with ``$FLYWHEEL_PARAMS_OVERRIDES`` over it."""
    home = Path(home).resolve() if home else project_home()
    file = home / PROJECTS_DIR / DEFAULTS_FILE
    raw = _read_sections(file, "") if file.exists() else {}
    if overrides := os.environ.get(OVERRIDES_ENV):
        raw = merged(raw, _read_sections(Path(overrides), f"{OVERRIDES_ENV} names it"))
    shared = {key: raw[key] for key in ("versioning", "serving", "metrics", "tracking") if key in raw}
    try:
        return absolute(Deployment(**shared, home=home), home)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{file}: {problems}") from exc


def state_defaults(name: str, kind: ProjectKind) -> dict[str, Any]:
    """Where a project's state lives unless its params.yaml says otherwise: folders named after it."""
    data = f"data/{name}"
    defaults: dict[str, Any] = {"name": name, "data_dir": data, "artifacts_dir": f"artifacts/{name}", "metrics": {"textfile_dir": f"reports/metrics/{name}"}}
    if kind == ProjectKind.tabular:
        defaults |= {
            "dataset": {
                "name": name,
                "landing_dir": f"landing/{name}",
                "raw_path": f"{data}/raw",
                "archive_dir": f"{data}/archive",
                "quarantine_dir": f"quarantine/{name}",
                "expectation_suite": f"{PROJECTS_DIR}/{name}/{SUITE_FILE}",
            },
            "split": {"output_dir": f"{data}/split"},
            "model": {"name": name},
            "feedback": {
                "landing_dir": f"landing/{name}/feedback",
                "labelled_dir": f"feedback/{name}/labelled",
                "archive_dir": f"feedback/{name}/archive",
                "quarantine_dir": f"quarantine/{name}/feedback",
            },
        }
    else:
        defaults["finetune"] = {
            "model_name": name,
            "landing_dir": f"landing/{name}",
            "datasets_dir": f"{data}/datasets",
            "quarantine_dir": f"quarantine/{name}",
        }
    return defaults


def load_project(name: str, home: Path | str | None = None) -> AnyProject:
    """Read and validate ``projects/<name>/params.yaml`` of the deployment in ``home``, laid over
    ``projects/defaults.yaml`` and the state folders named after the project, with
    ``$FLYWHEEL_PARAMS_OVERRIDES`` laid over it when set; ``ConfigError`` names the file and key."""
    home = Path(home).resolve() if home else project_home()
    if not re.fullmatch(PROJECT_NAME, name):
        raise ConfigError(f"project {name!r}: a project name is lowercase letters, digits and _, starting with a letter")
    file = home / PROJECTS_DIR / name / PARAMS_FILE
    known = sorted(project_kinds(home))
    raw = _read_sections(file, f"the projects of {home} are {known}; `flywheel init {name} --from <sample.csv> --label <column>` adds one")
    try:
        kind = ProjectKind(raw.get("kind", ProjectKind.tabular.value))
    except ValueError:
        raise ConfigError(f"{file}: kind: {raw.get('kind')!r} is not one of {[k.value for k in ProjectKind]}") from None
    defaults_file = home / PROJECTS_DIR / DEFAULTS_FILE
    shared = _read_sections(defaults_file, "") if defaults_file.exists() else {}
    sections, source = merged(merged(state_defaults(name, kind), shared), raw), str(file)
    if overrides := os.environ.get(OVERRIDES_ENV):
        changes = _read_sections(Path(overrides), f"{OVERRIDES_ENV} names it")
        if fixed := sorted(DVC_SECTIONS & set(changes)):
            # DVC versions these with the data: an override would version one split and train on another.
            raise ConfigError(f"{overrides}: {', '.join(fixed)} cannot be overridden (DVC versions them with the data); change them in {file}")
        sections, source = merged(sections, changes), f"{file} with {overrides}"
    model = ProjectConfig if kind == ProjectKind.tabular else TextProjectConfig
    try:
        return absolute(model(**sections, home=home), home)
    except ValidationError as exc:
        problems = "; ".join(problem(err) for err in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc


def problem(error: ErrorDetails) -> str:
    """One validation error as ``section.key: message``; a check across sections names its keys itself."""
    message = error["msg"].removeprefix("Value error, ")
    location = ".".join(str(part) for part in error["loc"])
    return f"{location}: {message}" if location else message


def load_config(name: str, home: Path | str | None = None) -> ProjectConfig:
    """A tabular project (``load_project``); ``ConfigError`` if ``name`` is of another kind."""
    config = load_project(name, home)
    if not isinstance(config, ProjectConfig):
        raise ConfigError(f"project {name!r} is a {config.kind.value} project; this needs a tabular one")
    return config


def parsed_config(name: str, home: Path | str | None = None) -> ProjectConfig | None:
    """A tabular project's config as a DAG file reads it while parsing, or None when its
    params.yaml does not load. A DAG file then defines the project's DAG with default settings
    and each task fails with the config error (naming the file and key), rather than one
    project's typo making the file fail to import and every project's DAGs of that file vanish."""
    try:
        return load_config(name, home)
    except (ConfigError, OSError, ValueError):
        return None


def load_text_project(name: str, home: Path | str | None = None) -> TextProjectConfig:
    """A text project (``load_project``); ``ConfigError`` if ``name`` is of another kind."""
    config = load_project(name, home)
    if not isinstance(config, TextProjectConfig):
        raise ConfigError(f"project {name!r} is a {config.kind.value} project; this needs a text one")
    return config


M = TypeVar("M", bound=BaseModel)


def absolute(model: M, home: Path) -> M:
    """``model`` with every relative path in it (nested sections included) resolved against
    ``home``, so that a section handed to a stage function on its own carries usable paths."""
    changes: dict[str, object] = {}
    for field in type(model).model_fields:
        value = getattr(model, field)
        if isinstance(value, Path) and field != "home":
            changes[field] = home / value
        elif isinstance(value, BaseModel):
            changes[field] = absolute(value, home)
        elif isinstance(value, dict) and value and all(isinstance(v, Path) for v in value.values()):
            changes[field] = {k: home / v for k, v in value.items()}
    return model.model_copy(update=changes)


def _read_sections(file: Path, hint: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file" + (f"; {hint}" if hint else "")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` laid over it, mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out
