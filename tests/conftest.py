"""Shared fixtures: a throwaway Flywheel deployment home with projects built from the repository's own files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipelines.config import ProjectConfig, TextProjectConfig, load_config, load_text_project
from pipelines.config import merged as merge
from pipelines.launch.ports import free_ports  # noqa: F401 - the tests import it from here

REPO = Path(__file__).resolve().parents[1]

# Airflow reads its configuration when first imported: point it at a throwaway home with
# the repository's DAGs before any test imports it, so tests never touch a real deployment.
os.environ.update(
    {
        "AIRFLOW_HOME": tempfile.mkdtemp(prefix="flywheel-test-airflow-"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
)

# Small and quick, the same code paths: tests train for a couple of epochs on a slice.
# No Triton and no MLflow server unless a test starts one (see tests/serving, tests/tracking).
FAST = {
    "train": {"max_epochs": 3, "batch_size": 256, "patience": 2},
    "gate": {"floor": 0.5},
    "export": {"parity_rows": 300},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs a real Airflow (slow)")
    config.addinivalue_line(
        "markers", "distributed: Airflow on Celery with PostgreSQL and Redis; run by `make test-distributed`, not `make test`"
    )
    config.addinivalue_line("markers", "bench: runs a script of bench/ with --quick as a subprocess (a few minutes in all)")


def make_home(home: Path, defaults: dict | None = None) -> Path:
    """A deployment home: ``projects/defaults.yaml`` (the repository's, no Triton and no MLflow
    server unless ``defaults`` names them) and the shared suites in ``expectations/``."""
    (home / "projects").mkdir(parents=True, exist_ok=True)
    shared = merge(yaml.safe_load((REPO / "projects" / "defaults.yaml").read_text()), merge({"serving": {"triton": {"url": None}}, "tracking": {"uri": None}}, defaults or {}))
    (home / "projects" / "defaults.yaml").write_text(yaml.safe_dump(shared, sort_keys=False))
    shutil.copytree(REPO / "expectations", home / "expectations", dirs_exist_ok=True)
    return home


def make_project(home: Path, changes: dict | None = None, name: str = "flights") -> ProjectConfig:
    """A tabular project ``name`` in the deployment home ``home``: the repository's flights
    project (plus ``changes``) and its suite."""
    if not (home / "projects" / "defaults.yaml").exists():
        make_home(home)
    folder = home / "projects" / name
    folder.mkdir(parents=True, exist_ok=True)
    params = merge(yaml.safe_load((REPO / "projects" / "flights" / "params.yaml").read_text()), merge(FAST, changes or {}))
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "projects" / "flights" / "expectations.json", folder / "expectations.json")
    return load_config(name, home)


def make_text_project(home: Path, changes: dict | None = None, name: str = "reviews") -> TextProjectConfig:
    """A text project ``name`` in the deployment home ``home``: the repository's reviews project (plus ``changes``)."""
    if not (home / "projects" / "defaults.yaml").exists():
        make_home(home)
    folder = home / "projects" / name
    folder.mkdir(parents=True, exist_ok=True)
    params = merge(yaml.safe_load((REPO / "projects" / "reviews" / "params.yaml").read_text()), changes or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_text_project(name, home)


@pytest.fixture
def project(tmp_path: Path) -> ProjectConfig:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A fresh Airflow metadata database (SQLite in the throwaway home)."""
    from airflow.utils import db

    db.resetdb()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real MLflow tracking server (``pipelines.launch.mlflow_server``) for the whole session,
    on a free loopback port, SQLite and artifacts in a throwaway home; yields its tracking URI
    (``http://127.0.0.1:<port>``). Tests share it: give each its own experiment name."""
    from pipelines.config import Deployment, TrackingConfig
    from pipelines.launch.mlflow_server import MlflowServer

    (port,) = free_ports(1)
    # The deployment built here, not read from a home: a test's FLYWHEEL_PARAMS_OVERRIDES must not move it.
    deployment = Deployment(home=tmp_path_factory.mktemp("mlflow-home"), tracking=TrackingConfig(uri=f"http://127.0.0.1:{port}"))
    with MlflowServer(deployment) as server:
        yield server.url
