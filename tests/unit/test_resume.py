"""A training task killed mid-run (a lost worker, an OOM kill) resumes from its last checkpoint
when Airflow retries it, instead of starting over."""

import json
import signal
import subprocess
import sys
import time

import pandas as pd

from pipelines.data.versioning import version_split
from pipelines.training.train import CANDIDATE_FILE, _resumable, train
from tests.conftest import REPO, make_project
from tests.unit.test_split import write_raw

TRAIN_IN_A_WORKER = """
import json, sys
from pipelines.config import load_config
from pipelines.training.train import train
train(load_config("flights", sys.argv[1]), json.loads(sys.argv[2]))
"""


def test_a_killed_training_resumes_from_its_last_checkpoint(tmp_path, caplog):
    config = make_project(tmp_path / "project", {"train": {"max_epochs": 6, "patience": 6}})
    write_raw(config, "2013-01", "2013-02", rows=None)
    data_version = version_split(config)["data_version"]

    # Given a worker killed with SIGKILL once its first epoch is checkpointed
    worker = subprocess.Popen([sys.executable, "-c", TRAIN_IN_A_WORKER, str(config.home), json.dumps(data_version)], cwd=REPO)
    deadline = time.monotonic() + 300
    while not list((config.home / "artifacts").rglob("last.ckpt")) and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    (last,) = (config.home / "artifacts").rglob("last.ckpt")
    folder = last.parents[1]
    assert not (folder / CANDIDATE_FILE).exists()

    # When the retry trains on the same inputs
    with caplog.at_level("INFO", logger="pipelines.training.train"):
        result = train(config, data_version)

    # Then it picked up the killed run's candidate and checkpoint, and no epoch ran twice
    assert config.home / result["candidate"] == folder and (folder / CANDIDATE_FILE).exists()
    record = json.loads((folder / CANDIDATE_FILE).read_text())
    done = record["resumed_after_epochs"]
    assert done >= 1 and f"resuming from {last} after {done} epoch(s)" in caplog.text
    # the retry ran only the remaining epochs
    epochs = pd.read_csv(folder / "logs" / "metrics.csv").dropna(subset=["val_loss"])["epoch"].tolist()
    assert epochs == list(range(done, 6))


def test_a_checkpoint_cut_short_by_the_crash_is_not_resumed_from(tmp_path, caplog):
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"PK\x03\x04 cut short")  # a zip header and nothing more

    with caplog.at_level("WARNING", logger="pipelines.training.train"):
        assert _resumable(last) == (None, 0)

    assert f"{last} is unreadable" in caplog.text and "training from the start" in caplog.text
