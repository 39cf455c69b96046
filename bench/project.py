"""What every benchmark starts from: a throwaway project home with real months landed, and
(for the serving ones) a candidate trained and exported by the retrain steps."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def throwaway_project(months: list[str]):
    """A copy of the repository's project in a temporary home (``$FLYWHEEL_HOME``), months landed."""
    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    for name in ("params.yaml", "dvc.yaml", "expectations"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, home / name)
    os.environ["FLYWHEEL_HOME"] = str(home)

    from pipelines.config import load_config
    from pipelines.data.replay import land

    config = load_config()
    for month in months:
        land(config, month)
    return config


def exported_candidate(max_epochs: int | None = None) -> Path:
    """Validate, version, train and export with the retrain steps; the candidate's folder."""
    from pipelines import retrain as steps

    steps.validate()
    versioned = steps.version_data()
    folder = steps.train(versioned["data_version"], max_epochs, None)["candidate"]
    steps.export(folder)
    return Path(folder)
