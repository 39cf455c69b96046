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
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipelines.config import DatasetConfig, ModelConfig, ProjectConfig, Task, TrainConfig
from pipelines.data.split import check_label_coverage, split_paths
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


def train(
    config: ProjectConfig,
    data_version: dict[str, str],
    max_epochs: int | None = None,
    learning_rate: float | None = None,
) -> Record:
    """Fit a model on the current splits, or reuse the candidate already fitted on the same inputs.

    ``data_version`` maps each split file (relative to the home) to its content hash;
    ``max_epochs`` and ``learning_rate`` override the ``train`` section where given. Returns
    ``candidate`` (its folder, relative to the home: the next tasks may run on other machines),
    ``reused``, ``best_val_loss`` and ``epochs``. ``FileNotFoundError`` when a split is missing;
    ``LabelCoverageError`` when a class has no training rows.
    """
    settings = config.train.model_copy(
        update={k: v for k, v in {"max_epochs": max_epochs, "learning_rate": learning_rate}.items() if v is not None}
    )
    paths = split_paths(config.split.output_dir)
    label = config.dataset.label
    if label.task == Task.classification:
        check_label_coverage({part: pd.read_parquet(path, columns=[label.column])[label.column] for part, path in paths.items()}, config.dataset.name)
    inputs = {
        "data": {name: data_version[config.portable(path)] for name, path in paths.items() if name != "test"},
        "dataset": config.dataset.model_dump(mode="json", include={"features", "label"}),
        "model": config.model.model_dump(mode="json"),
        "train": settings.model_dump(mode="json"),
        "code": code_version(),
    }
    key = fingerprint(inputs)[:16]
    folder = candidate_dir(config.artifacts_dir, config.model.name, key)
    reused = (folder / CANDIDATE_FILE).exists()
    if reused:
        record = read_json(folder / CANDIDATE_FILE)
        log.info("candidate %s was already trained on these inputs: reusing it", key)
    else:
        record = _fit(settings, config.model, config.dataset, paths, inputs, folder)
    return {"candidate": config.portable(folder), "reused": reused, "best_val_loss": record["best_val_loss"], "epochs": record["epochs"]}


def _fit(
    settings: TrainConfig, architecture: ModelConfig, dataset: DatasetConfig, paths: dict[str, Path], inputs: Record, folder: Path
) -> Record:
    """Train on ``paths`` (split files by part) into ``folder``; the candidate record it writes last."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from pipelines.training.data import TabularDataModule
    from pipelines.training.model import TabularModel

    pl.seed_everything(settings.seed, workers=True, verbose=False)
    data = TabularDataModule(paths, dataset, settings.batch_size)
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
    cuda = torch.cuda.is_available()
    trainer = pl.Trainer(
        max_epochs=settings.max_epochs,
        accelerator="auto",
        precision="bf16-mixed" if cuda else "32-true",
        callbacks=[checkpoints, EarlyStopping(monitor="val_loss", patience=settings.patience)],
        logger=CSVLogger(folder, name="logs", version=""),
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    resume_from, resumed_epochs = _resumable(folder / "checkpoints" / "last.ckpt")
    started = time.perf_counter()
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
        "inputs": inputs,
    }
    write_json(folder / CANDIDATE_FILE, record)
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
