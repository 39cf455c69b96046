"""Data versions with DVC: the project home is a DVC repository (no git needed), the split
is the ``split`` stage of ``dvc.yaml``, and every version is pushed to the configured remote.

``dvc repro`` reruns the stage only when its inputs (the raw data, the split parameters)
changed; otherwise it is a cache hit. The data version recorded for lineage is the set of
hashes DVC wrote to ``dvc.lock``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import yaml

from pipelines.config import ProjectConfig
from pipelines.data.split import raw_path

STAGE = "split"
REMOTE_NAME = "storage"


def remote_url(config: ProjectConfig) -> str:
    remote = config.versioning.remote
    return remote if "://" in remote else str(config.path(Path(remote)))


@contextlib.contextmanager
def _in_project(config: ProjectConfig):
    """Run DVC in the project home, with this interpreter's ``python`` first on PATH for the stage's cmd."""
    saved = {key: os.environ.get(key) for key in ("PATH", "DVC_NO_ANALYTICS")}
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ["DVC_NO_ANALYTICS"] = "1"
    try:
        with contextlib.chdir(config.home):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_repo(config: ProjectConfig):
    """Open the project's DVC repository, creating it and its default remote on first use."""
    from dvc.repo import Repo

    if not (config.home / ".dvc").is_dir():
        Repo.init(str(config.home), no_scm=True)
    repo = Repo(str(config.home))
    with repo.config.edit("local") as local:
        local["remote"][REMOTE_NAME] = {"url": remote_url(config)}
        local["core"]["remote"] = REMOTE_NAME
    return repo


def data_version(config: ProjectConfig) -> dict[str, str]:
    """The MD5 of every input and output of the split stage, from ``dvc.lock``."""
    lock = yaml.safe_load((config.home / "dvc.lock").read_text())
    stage = lock["stages"][STAGE]
    return {entry["path"]: entry["md5"] for entry in [*stage["deps"], *stage["outs"]]}


def version_split(config: ProjectConfig) -> dict:
    """``dvc repro split`` then ``dvc push``; returns the data version and whether it was a cache hit.

    Two reproductions in one home at once fail on DVC's repository lock: the retrain DAG runs
    one at a time (``max_active_runs=1``).
    """
    raw_path(config)
    with _in_project(config):
        repo = ensure_repo(config)
        try:
            reproduced = repo.reproduce(STAGE)
            repo.push()
        finally:
            repo.close()
    return {"data_version": data_version(config), "cache_hit": not reproduced}
