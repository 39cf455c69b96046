"""Data versions with DVC: each project's ``data_dir`` (``data/<project>/``) is its own DVC
repository (no git needed), so two projects never wait on each other's repository lock.

A tabular project's split is the ``split`` stage of the shared stage definition, the
top-level ``dvc.yaml``, copied into the project's repository beside a ``params.yaml`` written
from the project's config (the values DVC tracks and ``${...}`` reads). ``dvc repro`` reruns
the stage only when its inputs (the raw data, those parameters) changed; otherwise it is a
cache hit. The data version recorded for lineage is the set of hashes DVC wrote to
``dvc.lock``, keyed by paths relative to the deployment home. Every version is pushed to
the configured remote.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipelines.config import AnyProject, ProjectConfig, VersioningConfig
from pipelines.lineage import PACKAGE_DIR, Record

if TYPE_CHECKING:
    from dvc.repo import Repo

STAGE = "split"
REMOTE_NAME = "storage"
# The shared stage definition, beside the package in the checkout (and in the image).
STAGE_FILE = PACKAGE_DIR.parent / "dvc.yaml"


def remote_url(versioning: VersioningConfig, home: Path) -> str:
    """The DVC remote's URL: a cloud URL as configured, a directory resolved against ``home``."""
    remote = versioning.remote
    return remote if "://" in remote else str(home / remote)


@contextlib.contextmanager
def in_repository(root: Path, remote: str) -> Iterator[Repo]:
    """The DVC repository in ``root`` (created on first use), its remote set to the URL
    ``remote``, open while DVC runs in it with this interpreter's ``python`` first on PATH for
    the stage's cmd; closed on exit."""
    from dvc.repo import Repo

    root.mkdir(parents=True, exist_ok=True)
    saved = {key: os.environ.get(key) for key in ("PATH", "DVC_NO_ANALYTICS")}
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ["DVC_NO_ANALYTICS"] = "1"
    try:
        with contextlib.chdir(root):
            if not (root / ".dvc").is_dir():
                Repo.init(str(root), no_scm=True)
            repo = Repo(str(root))
            try:
                with repo.config.edit("local") as local:
                    local["remote"][REMOTE_NAME] = {"url": remote}
                    local["core"]["remote"] = REMOTE_NAME
                yield repo
            finally:
                repo.close()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_stage(config: ProjectConfig) -> Path:
    """The shared ``split`` stage and this project's values for it, in its repository.

    Rewritten on every run from the code and the config (unchanged content: no DVC change), so
    nothing is copied by hand and a project removed leaves nothing behind in another's."""
    root = config.data_dir
    if not STAGE_FILE.is_file():
        raise FileNotFoundError(f"{STAGE_FILE}: the shared DVC stage definition is missing from the Flywheel install")
    values = {
        "home": os.path.relpath(config.home, root),
        "project": config.name,
        "raw": config.dataset.raw_path.relative_to(root).as_posix(),
        "split_dir": config.split.output_dir.relative_to(root).as_posix(),
        "split": config.split.model_dump(mode="json", exclude={"output_dir"}),
        "dataset": {"id_column": config.dataset.id_column, "time_column": config.dataset.time_column},
    }
    params = root / "params.yaml"
    if not params.exists() or yaml.safe_load(params.read_text()) != values:
        partial = root / ".params.yaml.partial"
        partial.write_text(yaml.safe_dump(values, sort_keys=False))
        os.replace(partial, params)
    if not (root / "dvc.yaml").exists() or (root / "dvc.yaml").read_bytes() != STAGE_FILE.read_bytes():
        shutil.copyfile(STAGE_FILE, root / ".dvc.yaml.partial")
        os.replace(root / ".dvc.yaml.partial", root / "dvc.yaml")
    return root / "dvc.yaml"


def data_version(config: ProjectConfig) -> dict[str, str]:
    """The MD5 of every input and output of the split stage, from ``dvc.lock``, by path from the home."""
    root = config.data_dir
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    stage = lock["stages"][STAGE]
    return {config.portable(root / entry["path"]): entry["md5"] for entry in [*stage["deps"], *stage["outs"]]}


def version_split(config: ProjectConfig) -> Record:
    """``dvc repro split`` then ``dvc push``; returns the data version and whether it was a cache hit.

    ``FileNotFoundError`` before any DVC work when nothing was ingested yet. Two reproductions
    in one repository at once fail on DVC's lock: each retrain DAG runs one at a time
    (``max_active_runs=1``); projects have repositories of their own.
    """
    from pipelines.data import raw
    from pipelines.data.batches import LOCK_WAIT_S, data_lock, record, unversioned

    with data_lock(config.data_dir, "the DVC split", LOCK_WAIT_S):
        raw.migrate_legacy(config.dataset)
        raw.require(config.dataset)
        write_stage(config)
        with in_repository(config.data_dir, remote_url(config.versioning, config.home)) as repo:
            reproduced = repo.reproduce(STAGE)
            repo.push()
        version = data_version(config)
        if fresh := unversioned(config):
            record(config, "versioned", batches=fresh, data_version=version)
    return {"data_version": version, "cache_hit": not reproduced}


def track(config: AnyProject, path: Path) -> dict[str, str]:
    """``dvc add`` + ``dvc push`` of one file of the project's repository; returns {path from the home: md5}."""
    with in_repository(config.data_dir, remote_url(config.versioning, config.home)) as repo:
        repo.add(str(path))
        repo.push()
    (out,) = yaml.safe_load(path.with_name(path.name + ".dvc").read_text())["outs"]
    return {config.portable(path): out["md5"]}
