"""What every benchmark starts from: a throwaway project home with real months landed, and
(for the serving ones) a candidate trained and exported by the retrain steps.

The one place in ``bench/`` that knows how a deployment home and its projects are laid out
(``throwaway_project``) and how the retrain DAG's steps are called (``retrain_night``); the
scripts get a ``ProjectConfig`` and absolute paths from here and never read or write a
``params.yaml`` themselves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT = "flights"  # the repository's project every benchmark copies (projects/flights/)




@contextlib.contextmanager
def throwaway_project(months: list[str], rows: int | None = None, changes: dict | None = None) -> Iterator:
    """A deployment home in a temporary folder holding a copy of the repository's flights
    project, ``months`` landed; yields the project's ``ProjectConfig``.

    The home is laid out as ``$FLYWHEEL_HOME`` is (``pipelines.config``): ``projects/defaults.yaml``
    (the repository's, with Triton on three free loopback ports and tracking off, so a benchmark
    does not collide with a running ``make up``), ``projects/flights/params.yaml`` with ``changes`` laid over it
    (params sections, ``{"train": {"max_epochs": 2}}``) and its ``expectations.json``, and the
    shared suites in ``expectations/``. ``rows``: land a fixed sample of that many flights a
    month (None: the whole month, about 27,000). ``$FLYWHEEL_HOME`` names the home while the
    block runs (the steps read it); afterwards it is restored and the home deleted, whether the
    block failed or not.
    """
    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    saved = os.environ.get("FLYWHEEL_HOME")
    try:
        from pipelines.config import DEFAULTS_FILE, PARAMS_FILE, PROJECTS_DIR, SUITE_FILE, load_config, merged
        from pipelines.data.replay import land
        from pipelines.launch.ports import free_ports

        source, projects = REPO / PROJECTS_DIR, home / PROJECTS_DIR
        (projects / PROJECT).mkdir(parents=True)
        http, grpc, metrics = free_ports(3)
        triton = {"url": f"127.0.0.1:{http}", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
        # no MLflow tracking unless a benchmark starts its own server: never a running `make up`'s
        defaults = merged(yaml.safe_load((source / DEFAULTS_FILE).read_text()), {"serving": {"triton": triton}, "tracking": {"uri": None}})
        (projects / DEFAULTS_FILE).write_text(yaml.safe_dump(defaults, sort_keys=False))
        params = merged(yaml.safe_load((source / PROJECT / PARAMS_FILE).read_text()), changes or {})
        (projects / PROJECT / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False))
        shutil.copy(source / PROJECT / SUITE_FILE, projects / PROJECT / SUITE_FILE)
        shutil.copytree(REPO / "expectations", home / "expectations")
        os.environ["FLYWHEEL_HOME"] = str(home)

        config = load_config(PROJECT, home)
        for month in months:
            land(config.dataset, month, rows)
        yield config
    finally:
        if saved is None:
            os.environ.pop("FLYWHEEL_HOME", None)
        else:
            os.environ["FLYWHEEL_HOME"] = saved
        shutil.rmtree(home, ignore_errors=True)


def retrain_night(config, run_id: str | None, max_epochs: int | None = None) -> tuple[dict[str, float], dict]:
    """The retrain DAG's steps in order, as its tasks call them (``pipelines.steps``), on
    ``config``'s project: validate, version_data, train, export, then gate and publish (going
    live in Triton when ``serving.triton.url`` is served) unless ``run_id`` is None.

    Returns seconds per step, and each step's result by step name plus ``"candidate"``: the
    candidate's folder as an absolute path (task results name it relative to the deployment home).
    """
    from pipelines import steps

    seconds: dict[str, float] = {}
    results: dict = {}

    def timed(name, call, *args):
        started = time.perf_counter()
        results[name] = call(config.name, *args)
        seconds[name] = time.perf_counter() - started
        return results[name]

    timed("validate", steps.validate)
    versioned = timed("version_data", steps.version_data)
    trained = timed("train", steps.train, versioned["data_version"], {"max_epochs": max_epochs})
    timed("export", steps.export, trained["candidate"])
    if run_id is not None:
        decision = timed("gate", steps.gate, trained["candidate"], False, "")
        run = {"dag_id": f"retrain__{config.name}", "run_id": run_id, "run_type": "manual", "logical_date": None}
        timed("publish", steps.publish, trained["candidate"], decision, versioned["data_version"], run, {})
    results["candidate"] = config.path(Path(trained["candidate"]))
    return seconds, results


def exported_candidate(config, max_epochs: int | None = None) -> Path:
    """Validate, version, train and export with the retrain steps; the candidate's absolute folder."""
    return retrain_night(config, None, max_epochs)[1]["candidate"]


QUICK_NOTE = "--quick: small data and few repeats, a check that this benchmark runs; its figures are not the benchmark's"


def print_ratio(what: str, value: float) -> None:
    """The line every benchmark ends with, read by tests/bench: ``ratio: <what> = <value>``."""
    print(f"ratio: {what} = {value:.4g}", flush=True)
