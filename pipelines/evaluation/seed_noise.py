"""How much the gate metric moves when only the training seed changes: ``gate.seed_noise``.

The gate's paired bootstrap resamples the test rows: it sees how the test split might have
fallen, not how the training might have. Two trainings on the same data that differ only in
their seed (initial weights, batch order, dropout) give models whose metrics differ by more
than a good-sized test split's noise (on the flights, ROC AUC spreads over about 0.02). This
trains the project's current split with several seeds, scores each export on the test split
like the gate does, and reports their standard deviation, the value ``gate.seed_noise`` takes.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import pandas as pd

from pipelines.config import ProjectConfig
from pipelines.lineage import Record, read_json, write_json

log = logging.getLogger(__name__)


def seed_noise_path(artifacts_dir: Path) -> Path:
    return artifacts_dir / "seed_noise.json"


def measure(config: ProjectConfig, data_version: dict[str, str], seeds: int = 5) -> Record:
    """Train and export the current split (``data_version``: split file -> content hash) with
    ``seeds`` consecutive seeds from ``train.seed`` (a candidate already trained on the same
    inputs is reused), score each on the labelled test rows in ``gate.metric`` at its own
    threshold (``gate.score``), and return the metric by seed and their sample standard
    deviation (``seed_noise``), also written to ``artifacts/<project>/seed_noise.json``.
    ``ValueError`` for fewer than two seeds."""
    from pipelines.artifacts import MODEL_FILE
    from pipelines.data.split import split_paths
    from pipelines.evaluation.gate import score, threshold_of
    from pipelines.export.onnx import export
    from pipelines.training.train import train

    if seeds < 2:
        raise ValueError(f"seeds {seeds}: a standard deviation needs at least two trainings")
    test = pd.read_parquet(split_paths(config.split.output_dir)["test"])
    values: dict[str, float] = {}
    for seed in range(config.train.seed, config.train.seed + seeds):
        seeded = config.model_copy(update={"train": config.train.model_copy(update={"seed": seed})})
        candidate = train(seeded, data_version)["candidate"]
        export(seeded, candidate)
        folder = config.path(Path(candidate))
        threshold, _ = threshold_of(read_json(folder / "export.json"))
        values[str(seed)] = score(config.dataset.label, test, folder / MODEL_FILE, threshold)[config.gate.metric]
        log.info("seed %d: %s %.4f", seed, config.gate.metric, values[str(seed)])
    record: Record = {
        "metric": config.gate.metric,
        "values": values,
        "seed_noise": statistics.stdev(values.values()),
        "test_rows": len(test),
        "data_version": data_version,
    }
    write_json(seed_noise_path(config.artifacts_dir), record)
    return record
