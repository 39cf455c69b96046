"""The label check of labelled batches: a real flights model, trained on January and February,
keeps its skill on March's true labels and loses it on the same flights with shuffled labels,
which are held for review (not trained on) until confirmed; a version without a performance
reference, a tiny batch and one class are not checked, with the reason; regression is checked by R^2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto, helper
from sklearn import metrics as sk

from pipelines.artifacts import LABEL_CHECK_FILE, MODEL_FILE, OUTPUT, PERFORMANCE_REFERENCE_FILE
from pipelines.config import BATCH, ProjectConfig, Task
from pipelines.data import label_check
from pipelines.data.batches import events, held_batches, list_batches
from pipelines.data.ingest import BatchValidationError, ingest_landing
from pipelines.data.replay import month_batch
from pipelines.data.schema import typed
from pipelines.data.split import split_paths
from pipelines.errors import NotRetryable
from pipelines.serving import repository
from tests.conftest import make_project

MONTH = "2013-03"  # every March flight (27,902): the bound on a shuffled batch's Gini is ~0.02, the floor ~0.05


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A flights model trained on 3,000 flights of January and February (3 epochs) and its
    performance reference (its test split as it scores it), as publish writes it."""
    from pipelines.data.versioning import version_split
    from pipelines.export.onnx import export
    from pipelines.feedback.reference import write_reference
    from pipelines.training.train import train
    from tests.unit.test_split import write_raw

    config = make_project(tmp_path_factory.mktemp("label_check") / "project")
    write_raw(config, "2013-01", "2013-02", rows=3000)
    data_version = version_split(config)["data_version"]
    candidate = config.home / train(config, data_version)["candidate"]
    export(config, config.portable(candidate))
    write_reference(split_paths(config.split.output_dir)["test"], config.dataset, candidate / MODEL_FILE, config.performance.seed, candidate)
    return candidate / MODEL_FILE, candidate / PERFORMANCE_REFERENCE_FILE


def serve(config: ProjectConfig, model_file: Path, reference: Path | None) -> Path:
    """Version 1 of the project's model, in service: ``model_file`` and (unless None) its performance reference."""
    files = {MODEL_FILE: model_file, **({PERFORMANCE_REFERENCE_FILE: reference} if reference else {})}
    version = repository.add_version(config.model_dir, files, {"export": {}})
    repository.write_model_config(config.model_dir, repository.model_config(config.model_dir, config.serving, config.dataset, version))
    assert repository.served_version(config.model_dir) == version
    return config.model_dir / str(version)


def landed(config: ProjectConfig, name: str, batch: pd.DataFrame) -> Path:
    config.dataset.landing_dir.mkdir(parents=True, exist_ok=True)
    batch.to_csv(config.dataset.landing_dir / name, index=False)
    return config.dataset.landing_dir / name


def shuffled(batch: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The same flights, each given another flight's label: labels mis-joined upstream."""
    return batch.assign(arr_delayed=np.random.default_rng(seed).permutation(batch["arr_delayed"].to_numpy()))


def raw(config: ProjectConfig) -> pd.DataFrame:
    return pd.read_parquet(config.dataset.raw_path)


@pytest.fixture
def served(tmp_path, trained) -> ProjectConfig:
    config = make_project(tmp_path / "home")
    serve(config, *trained)
    return config


# --- the measures -------------------------------------------------------------------------------


def test_skill_is_gini_for_a_classifier_and_r2_for_a_regression_as_sklearn_computes_them():
    rng = np.random.default_rng(5)
    truth = (rng.random(800) < 0.25).astype(float)
    probability = np.round(1 / (1 + np.exp(-(truth + rng.normal(size=800)))), 2)  # ties count half
    amount = rng.normal(100, 20, 800)
    estimate = amount + rng.normal(0, 10, 800)
    ones, weights = np.ones((1, 800)), rng.integers(0, 3, size=(2, 800)).astype(float)

    assert label_check.skill(Task.classification, truth, probability, ones)[0] == pytest.approx(2 * sk.roc_auc_score(truth, probability) - 1, rel=1e-12)
    assert label_check.skill(Task.regression, amount, estimate, ones)[0] == pytest.approx(sk.r2_score(amount, estimate), rel=1e-12)
    # integer weights: the measure on the rows repeated that many times
    for line, gini, r2 in zip(
        weights, label_check.skill(Task.classification, truth, probability, weights), label_check.skill(Task.regression, amount, estimate, weights)
    ):
        rows = np.repeat(np.arange(800), line.astype(int))
        assert gini == pytest.approx(2 * sk.roc_auc_score(truth[rows], probability[rows]) - 1, rel=1e-12)
        assert r2 == pytest.approx(sk.r2_score(amount[rows], estimate[rows]), rel=1e-12)


# --- through ingestion, with the served model -------------------------------------------------


def test_a_batch_with_its_true_labels_passes_and_joins_the_raw_data(served):
    # Given March's flights with their true labels and a model served that learned on winter flights
    landed(served, "2013-03.csv", month_batch(MONTH))

    summary = ingest_landing(served)

    # Then the model keeps most of its skill on them: the batch joins the raw data
    assert summary["passed"] == ["2013-03.csv"] and summary["held"] == []
    (event,) = [e for e in events(served) if e["event"] == "ingested"]
    check = event["label_check"]
    assert check["status"] == label_check.PASSED and check["version"] == 1 and check["measure"] == "gini"
    assert check["batch_skill"]["value"] > 0.5 * check["test_skill"]["value"] > 0
    assert check["batch_skill"]["upper"] > check["batch_skill"]["value"] and check["batch_skill"]["confidence"] == 0.99
    assert summary["label_checks"]["2013-03.csv"].startswith("label check passed: version 1 has gini")


def test_shuffled_labels_are_held_for_review_with_the_evidence_then_confirmed(served):
    # Given the same flights with their labels shuffled (mis-joined upstream), beside a good batch
    true_labels = month_batch(MONTH)
    landed(served, "march-shuffled.csv", shuffled(true_labels))
    landed(served, "2013-04.csv", month_batch("2013-04", rows=500))

    # When ingestion runs, the shuffled batch is held and the run fails, after ingesting the other
    with pytest.raises(BatchValidationError) as failure:
        ingest_landing(served)

    # Then none of its rows reached the raw data: it waits in its own quarantine folder with the evidence
    assert set(raw(served)[BATCH]) == {"2013-04.csv"}
    folder = served.dataset.quarantine_dir / "march-shuffled"
    assert sorted(p.name for p in folder.iterdir()) == [LABEL_CHECK_FILE, "march-shuffled.csv"]
    evidence = json.loads((folder / LABEL_CHECK_FILE).read_text())
    assert evidence["status"] == "held" and evidence["batch"] == "march-shuffled.csv" and evidence["rows"] == len(true_labels)
    assert abs(evidence["batch_skill"]["value"]) < 0.03 and evidence["batch_skill"]["upper"] < evidence["floor"]
    assert evidence["floor"] == pytest.approx(0.25 * evidence["test_skill"]["value"]) and "label_check_min_skill" in evidence["rule"]
    # in the summary and the ledger
    summary = failure.value.summary
    assert summary["held"] == ["march-shuffled.csv"] and summary["passed"] == ["2013-04.csv"] and summary["rows_held"] == len(true_labels)
    assert held_batches(served)["march-shuffled.csv"]["quarantine"] == served.portable(folder)
    assert [b["status"] for b in list_batches(served) if b["source"] == "march-shuffled.csv"] == ["held"]
    # and the error names the batch, the evidence and how to send it on
    message = str(failure.value)
    assert "1 of 2 landing batch(es) passed validation but were held for review" in message
    assert f"march-shuffled.csv -> {folder} ({LABEL_CHECK_FILE})" in message
    assert f"gini {evidence['batch_skill']['value']:.4f} on the batch's 27,902 labelled rows" in message
    assert 'trigger retrain__flights with the Param confirm_batches ["march-shuffled.csv"]' in message
    assert "Batches that passed were ingested: ['2013-04.csv']" in message

    # When a person has checked the labels and confirms the batch by name
    summary = ingest_landing(served, confirmed=["march-shuffled.csv"])

    # Then it is ingested without the check, as it was, and the ledger says who let it through
    assert summary["passed"] == ["march-shuffled.csv"] and summary["confirmed"] == ["march-shuffled.csv"] and summary["held"] == []
    rows = raw(served).query("month == 3").set_index("flight_id").sort_index()
    assert len(rows) == len(true_labels) and rows[BATCH].eq("march-shuffled.csv").all()
    expected = shuffled(true_labels).set_index("flight_id").sort_index()["arr_delayed"]
    assert (rows["arr_delayed"] == expected).all()
    assert not (folder / "march-shuffled.csv").exists() and held_batches(served) == {}
    confirmed = [e for e in events(served) if e["event"] == "confirmed"]
    assert [(e["batch"], e["landed_as"]) for e in confirmed] == [("march-shuffled.csv", "march-shuffled.csv")]
    ingested = [e for e in events(served) if e["event"] == "ingested" and e["source"] == "march-shuffled.csv"]
    assert [e["label_check"]["status"] for e in ingested] == ["confirmed"]


def test_confirming_a_batch_that_is_not_held_names_those_that_are(served):
    with pytest.raises(NotRetryable, match=r"confirmed batches \['2013-05.csv'\] are not held for review; the batches held are none"):
        ingest_landing(served, confirmed=["2013-05.csv"])


def test_a_version_without_a_performance_reference_is_not_checked_and_the_reason_is_recorded(tmp_path, trained):
    # Given a version published before performance references existed, and shuffled labels
    config = make_project(tmp_path / "home")
    serve(config, trained[0], None)
    landed(config, "march-shuffled.csv", shuffled(month_batch(MONTH, rows=3000)))

    summary = ingest_landing(config)

    # Then the batch is ingested (there is nothing to compare with), and the ledger says why it was not checked
    assert summary["passed"] == ["march-shuffled.csv"]
    (event,) = [e for e in events(config) if e["event"] == "ingested"]
    assert event["label_check"]["status"] == "not run"
    assert event["label_check"]["reason"] == f"not available: version 1 has no {PERFORMANCE_REFERENCE_FILE}"
    assert summary["label_checks"]["march-shuffled.csv"] == f"label check not run: not available: version 1 has no {PERFORMANCE_REFERENCE_FILE}"


def test_without_a_served_version_the_check_is_not_run(project):
    batch, _ = typed(month_batch(MONTH, rows=200), project.dataset)

    evidence = label_check.check(project.dataset, project.performance, None, batch)

    assert evidence["status"] == "not run" and evidence["reason"].startswith("no version is served yet")


@pytest.mark.parametrize(
    ("rows", "one_class", "reason"),
    [(40, False, "40 labelled rows, fewer than 50: too few"), (300, True, "the labels hold one class only (0): gini is undefined")],
)
def test_a_tiny_batch_or_one_of_one_class_is_not_checked(served, rows, one_class, reason):
    batch, _ = typed(month_batch(MONTH, rows=rows), served.dataset)
    if one_class:
        batch["arr_delayed"] = 0

    evidence = label_check.check(served.dataset, served.performance, served.model_dir / "1", batch)

    assert evidence["status"] == "not run" and evidence["reason"].startswith(reason)


def test_a_version_that_takes_a_column_the_project_dropped_is_not_run_against(served):
    # Given a project that no longer has the feature `distance`, which the served version takes
    batch, _ = typed(month_batch(MONTH, rows=300), served.dataset)

    evidence = label_check.check(served.dataset, served.performance, served.model_dir / "1", batch.drop(columns="distance"))

    assert evidence["status"] == "not run" and evidence["reason"].startswith("version 1 does not fit the project's columns")
    assert "needs column 'distance'" in evidence["reason"]


# --- regression: R^2 ----------------------------------------------------------------------------


def passthrough(column: str, file: Path) -> None:
    """A regression model whose ``prediction`` is the float column ``column``."""
    x = helper.make_tensor_value_info(column, TensorProto.FLOAT, ["batch", 1])
    y = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph([helper.make_node("Identity", [column], [OUTPUT])], "passthrough", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(file))


def test_a_regression_is_checked_by_r2(tmp_path):
    # Given a project predicting a flight's distance, served by a model that answers its feature
    # `estimate`: the distance blurred by noise (R^2 about 0.9)
    config = make_project(
        tmp_path / "home",
        {
            "dataset": {"label": {"column": "distance", "task": "regression"}, "features": [{"name": "estimate", "type": "numeric"}]},
            "model": {"name": "flights_distance"},
            "gate": {"metric": "rmse", "floor": 2000.0},
            "monitoring": {"exclude_columns": []},
        },
    )
    rng = np.random.default_rng(3)

    def rows(month: str, count: int) -> pd.DataFrame:
        flights = month_batch(month, rows=count)[["distance"]].astype("float64")
        return flights.assign(estimate=flights["distance"] + rng.normal(0, 250, count))

    folder = tmp_path / "version"
    folder.mkdir()
    passthrough("estimate", folder / MODEL_FILE)
    reference = rows("2013-01", 2000).assign(prediction=lambda f: f["estimate"].astype("float32"))
    reference.to_parquet(folder / PERFORMANCE_REFERENCE_FILE, index=False)
    champion = serve(config, folder / MODEL_FILE, folder / PERFORMANCE_REFERENCE_FILE)
    batch = rows("2013-03", 400)

    kept = label_check.check(config.dataset, config.performance, champion, batch)
    mixed = label_check.check(config.dataset, config.performance, champion, batch.assign(distance=rng.permutation(batch["distance"].to_numpy())))

    # Then the true distances keep the model's R^2, as sklearn computes it; shuffled ones lose it
    assert kept["status"] == "passed" and kept["measure"] == "r2"
    assert kept["batch_skill"]["value"] == pytest.approx(sk.r2_score(batch["distance"], batch["estimate"].astype("float32")), rel=1e-6)
    assert kept["test_skill"]["value"] == pytest.approx(sk.r2_score(reference["distance"], reference["prediction"]), rel=1e-9)
    assert mixed["status"] == "held" and mixed["batch_skill"]["upper"] < 0 < mixed["floor"]
