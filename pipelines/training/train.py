"""Train a challenger with Lightning, or reuse the one already trained on the same inputs.

A candidate lives in a folder named by the fingerprint of everything that shapes it
(train/val data hashes, model and training settings, code version), so a nightly run with
no new data reuses yesterday's model instead of training it again, and a retried task
resumes from the candidate's last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pydantic import ValidationError

from pipelines import tracking
from pipelines.config import ConfigError, DatasetConfig, ModelConfig, ProjectConfig, Task, TrainConfig
from pipelines.data.split import check_label_coverage, label_counts, split_paths
from pipelines.lineage import Record, code_version, fingerprint, read_json, write_json

if TYPE_CHECKING:
    from pipelines.training.data import Encoding
    from pipelines.training.model import TabularModel

log = logging.getLogger(__name__)
CANDIDATE_FILE = "candidate.json"  # written last: its presence means the candidate is complete


def candidate_dir(artifacts_dir: Path, model: str, key: str) -> Path:
    """The folder of the candidate of ``model`` whose inputs hash to ``key``, under the project's
    ``artifacts_dir``."""
    return artifacts_dir / "candidates" / model / key


# What a run may set instead of params.yaml (the retrain DAG's Params, a tune study's best trial).
TRAIN_KEYS = frozenset({"max_epochs", "batch_size", "learning_rate"})
MODEL_KEYS = frozenset({"embedding_dim", "hidden_sizes", "dropout"})
HYPERPARAMETERS = TRAIN_KEYS | MODEL_KEYS


def with_hyperparameters(config: ProjectConfig, hyperparameters: Mapping[str, Any] | None) -> tuple[TrainConfig, ModelConfig]:
    """The ``train`` and ``model`` sections with ``hyperparameters`` (keys of ``HYPERPARAMETERS``)
    laid over them, validated as the sections are; ``ConfigError`` names an unknown key or a bad value."""
    given = {k: v for k, v in (hyperparameters or {}).items() if v is not None}
    if unknown := sorted(set(given) - HYPERPARAMETERS):
        raise ConfigError(f"project {config.name}: unknown hyperparameters {unknown}; expected some of {sorted(HYPERPARAMETERS)}")
    try:
        settings = TrainConfig.model_validate(config.train.model_dump() | {k: v for k, v in given.items() if k in TRAIN_KEYS})
        architecture = ModelConfig.model_validate(config.model.model_dump() | {k: v for k, v in given.items() if k in MODEL_KEYS})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"project {config.name}: hyperparameters {given}: {problems}") from exc
    return settings, architecture


def train(config: ProjectConfig, data_version: dict[str, str], hyperparameters: Mapping[str, Any] | None = None, run: Record | None = None) -> Record:
    """Fit a model on the current splits, or reuse the candidate already fitted on the same inputs.

    ``data_version`` maps each split file (relative to the home) to its content hash;
    ``hyperparameters`` override the ``train`` and ``model`` sections (``with_hyperparameters``);
    ``run`` names the Airflow run, for the MLflow run's tags. Returns ``candidate`` (its folder,
    relative to the home: the next tasks may run on other machines), ``reused``, ``best_val_loss``,
    ``epochs`` and ``tracking`` (``pipelines.tracking``). ``FileNotFoundError`` when a split is
    missing; ``LabelCoverageError`` when a class has no training rows; ``ConfigError`` for a bad
    hyperparameter.
    """
    settings, architecture = with_hyperparameters(config, hyperparameters)
    paths = split_paths(config.split.output_dir)
    label = config.dataset.label
    if label.task == Task.classification:
        check_label_coverage({part: label_counts(path, label.column) for part, path in paths.items()}, config.dataset.name)
    inputs = {
        "data": {name: data_version[config.portable(path)] for name, path in paths.items() if name != "test"},
        "dataset": config.dataset.model_dump(mode="json", include={"features", "label"}),
        "model": architecture.model_dump(mode="json"),
        "train": settings.model_dump(mode="json"),
        "code": code_version(),
    }
    key = fingerprint(inputs)[:16]
    folder = candidate_dir(config.artifacts_dir, architecture.name, key)
    reused = (folder / CANDIDATE_FILE).exists()
    if reused:
        record = read_json(folder / CANDIDATE_FILE)
        log.info("candidate %s was already trained on these inputs: reusing it", key)
    else:
        tags = {"flywheel.candidate": key, **tracking.airflow_tags(run)}
        tracked = tracking.open_run(config.tracking, config.name, folder, f"{architecture.name}-{key[:8]}", inputs, tags)
        try:
            record = fit(settings, architecture, config.dataset, paths, folder, tracked, config.tracking.timeout_s)
        except BaseException:
            tracking.finish(tracked, "FAILED", config.tracking.timeout_s)
            raise
        tracking.finish(tracked, timeout_s=config.tracking.timeout_s)
        write_json(folder / CANDIDATE_FILE, record | {"inputs": inputs})
    return {
        "candidate": config.portable(folder),
        "reused": reused,
        "best_val_loss": record["best_val_loss"],
        "epochs": record["epochs"],
        "tracking": record.get("tracking") or tracking.candidate_run(folder),
    }


def fit(
    settings: TrainConfig,
    architecture: ModelConfig,
    dataset: DatasetConfig,
    paths: dict[str, Path],
    folder: Path,
    tracked: Record,
    timeout_s: float = 5.0,
    callbacks: Sequence[pl.Callback] = (),
) -> Record:
    """Train on ``paths`` (split files by part) into ``folder`` (checkpoints, ``encoding.json``),
    resuming from its last checkpoint; each epoch's ``train_loss`` and ``val_loss`` go to the
    MLflow run ``tracked`` (``pipelines.tracking``; the caller ends it), and ``callbacks`` (e.g. a
    trial's pruning) see every epoch. The splits are streamed by row group; with ``settings.max_rows``
    training sees at most that many train rows, drawn with ``settings.seed``. Returns what the
    candidate record keeps: best ``val_loss``, epochs, accelerator, seconds, ``train_rows`` (the
    split's labelled rows and those trained on), and the tracking record with what was lost, if anything."""
    import torch
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from pipelines.training.data import TabularDataModule
    from pipelines.training.model import TabularModel

    pl.seed_everything(settings.seed, workers=True, verbose=False)
    data = TabularDataModule(paths, dataset, settings.batch_size, seed=settings.seed, max_rows=settings.max_rows)
    data.prepare_data()
    data.setup()
    encoding = data.encoding
    assert encoding is not None  # setup() fitted it
    model = TabularModel(
        task=dataset.label.task.value,
        vocab_sizes=[len(v) for v in encoding.categorical.values()],
        numeric_mean=encoding.numeric_mean,
        numeric_std=encoding.numeric_std,
        embedding_dim=architecture.embedding_dim,
        hidden_sizes=list(architecture.hidden_sizes),
        dropout=architecture.dropout,
        learning_rate=settings.learning_rate,
        target_mean=encoding.target_mean,
        target_std=encoding.target_std,
    )
    checkpoints = ModelCheckpoint(dirpath=folder / "checkpoints", monitor="val_loss", save_last=True, save_top_k=1)
    epochs = tracking.EpochMetrics(tracked, timeout_s)
    cuda = torch.cuda.is_available()
    trainer = pl.Trainer(
        max_epochs=settings.max_epochs,
        accelerator="auto",
        precision="bf16-mixed" if cuda else "32-true",
        callbacks=[checkpoints, EarlyStopping(monitor="val_loss", patience=settings.patience), epochs, *callbacks],
        logger=CSVLogger(folder, name="logs", version=""),
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    resume_from, resumed_epochs = _resumable(folder / "checkpoints" / "last.ckpt")
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Lightning warns that worker processes could make a streamed split's __len__ wrong; it is read in this process only.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)
        trainer.fit(model, datamodule=data, ckpt_path=resume_from)
    best, score = Path(checkpoints.best_model_path), checkpoints.best_model_score
    assert score is not None  # set by the validation run of every epoch
    write_json(folder / "encoding.json", encoding.__dict__)
    record = {
        "fingerprint": folder.name,
        "checkpoint": best.relative_to(folder).as_posix(),
        "best_val_loss": float(score),
        "epochs": trainer.current_epoch,
        "resumed_after_epochs": resumed_epochs,  # epochs a killed earlier try had already done
        "accelerator": "cuda" if cuda else "cpu",
        "fit_seconds": round(time.perf_counter() - started, 3),  # this try's; a resumed one counts from its resume
        "train_rows": data.train_rows,  # labelled rows of the split, and those trained on (a seeded sample under train.max_rows)
    }
    summary = {"best_val_loss": float(score), "epochs": float(trainer.current_epoch), "fit_seconds": time.perf_counter() - started}
    if tracked.get("run_id") and not tracking.log_to(tracked, summary, timeout_s=timeout_s):
        epochs.lost = epochs.lost or "the run's summary was not taken"
    record["tracking"] = tracked | ({"detail": f"{tracked['detail']}; {epochs.lost}"} if epochs.lost else {})
    log.info("trained candidate %s: best val_loss %.5f after %d epochs", folder.name, record["best_val_loss"], record["epochs"])
    return record


def _resumable(last: Path) -> tuple[Path | None, int]:
    """The checkpoint a retried task resumes from and the epochs it holds; none if absent or
    cut short by the crash."""
    import pickle

    import torch

    if not last.exists():
        return None, 0
    try:
        epochs = torch.load(last, map_location="cpu", weights_only=False)["epoch"] + 1
    except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as exc:
        log.warning("%s is unreadable (%s): training from the start", last, exc)
        return None, 0
    log.info("resuming from %s after %d epoch(s)", last, epochs)
    return last, epochs


def load_candidate(folder: Path) -> tuple[TabularModel, Encoding]:
    """The trained model of a candidate folder, on the CPU, in eval mode, and its encoding;
    ``FileNotFoundError`` when the folder holds no complete candidate."""
    from pipelines.training.data import Encoding
    from pipelines.training.model import TabularModel

    record = read_json(folder / CANDIDATE_FILE)
    model = TabularModel.load_from_checkpoint(folder / record["checkpoint"], map_location="cpu").eval()
    encoding = Encoding(**json.loads((folder / "encoding.json").read_text()))
    return model, encoding
