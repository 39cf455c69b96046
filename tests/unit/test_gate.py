"""The gate's statistics: weighted metrics against scikit-learn, the paired bootstrap interval of
the difference and its coverage, slices, a single-class test split, regression's direction, the
models' own thresholds; and ``evaluate`` on ONNX files, end to end, without training a model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto, helper
from sklearn import metrics as sk

from pipelines.artifacts import MODEL_FILE, OUTPUT
from pipelines.config import GateConfig, Task
from pipelines.data.split import split_paths
from pipelines.errors import NotRetryable
from pipelines.evaluation import bootstrap
from pipelines.evaluation.gate import METHOD, NOT_PROMOTED, PROMOTED, Scored, SliceError, evaluate, judge, slices, threshold_of
from pipelines.serving import repository
from tests.conftest import make_project

GATE = GateConfig(metric="roc_auc", min_improvement=0.002, floor=0.5)
CARRIERS = ["AA", "B6", "DL", "EV", "UA"]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def flights(rows: int, seed: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Test rows with a carrier, a latent signal and the label it drives (about 30% positive)."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=rows)
    truth = (signal + rng.normal(size=rows) > 0.8).astype(float)
    return pd.DataFrame({"carrier": rng.choice(CARRIERS, rows)}), signal, truth


def model(signal: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """A classifier's probabilities: the signal blurred by its own noise (more noise, worse model)."""
    return sigmoid(signal + np.random.default_rng(seed).normal(scale=noise, size=len(signal))).astype("float32")


def carrier_slices(frame: pd.DataFrame, gate: GateConfig = GATE) -> dict[str, np.ndarray]:
    from pipelines.config import DatasetConfig

    dataset = DatasetConfig(
        name="flights",
        landing_dir="l",
        raw_path="r",
        archive_dir="a",
        quarantine_dir="q",
        expectation_suite="e",
        label={"column": "arr_delayed", "task": "classification"},
        features=[{"name": "carrier", "type": "categorical"}, {"name": "distance", "type": "numeric"}],
    )
    return slices(dataset, gate, frame)


# --- weighted metrics ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_rows():
    """Labels and probabilities rounded to 2 digits: many ties, which ROC AUC counts as half."""
    rng = np.random.default_rng(7)
    truth = (rng.random(1500) < 0.3).astype(float)
    return truth, np.round(sigmoid(truth + rng.normal(size=1500)), 2)


def sklearn_metric(name: str, truth: np.ndarray, predicted: np.ndarray, threshold: float) -> float:
    called = predicted >= threshold
    return {
        "roc_auc": lambda: sk.roc_auc_score(truth, predicted),
        "f1": lambda: sk.f1_score(truth, called),
        "precision": lambda: sk.precision_score(truth, called),
        "recall": lambda: sk.recall_score(truth, called),
        "log_loss": lambda: sk.log_loss(truth, np.clip(predicted, 1e-7, 1 - 1e-7), labels=[0, 1]),
        "rmse": lambda: np.sqrt(sk.mean_squared_error(truth, predicted)),
        "mae": lambda: sk.mean_absolute_error(truth, predicted),
    }[name]()


METRICS = [*bootstrap.CLASSIFICATION, *bootstrap.REGRESSION]


@pytest.mark.parametrize("name", METRICS)
def test_weights_of_one_give_sklearns_metric(scored_rows, name):
    truth, predicted = scored_rows

    ours = bootstrap.weighted(name, truth, predicted, np.ones((1, len(truth))), threshold=0.4)

    assert ours.shape == (1,)
    assert ours[0] == pytest.approx(sklearn_metric(name, truth, predicted, 0.4), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", METRICS)
def test_integer_weights_give_the_metric_on_the_rows_repeated(scored_rows, name):
    truth, predicted = scored_rows
    weights = np.random.default_rng(3).integers(0, 4, size=(3, len(truth))).astype(float)

    ours = bootstrap.weighted(name, truth, predicted, weights, threshold=0.4)

    for line, value in zip(weights, ours):
        repeated = np.repeat(np.arange(len(truth)), line.astype(int))
        assert value == pytest.approx(sklearn_metric(name, truth[repeated], predicted[repeated], 0.4), rel=1e-12, abs=1e-15)


def test_a_resample_draws_as_many_rows_as_there_are_with_replacement():
    weights = bootstrap.resample_weights(np.random.default_rng(0), 400, 2000)

    assert weights.shape == (2000, 400) and (weights.sum(axis=1) == 400).all()
    # each row is drawn Binomial(400, 1/400) times: mean 1, variance 1 - 1/400; ~37% of rows not at all
    assert weights.mean() == pytest.approx(1.0) and weights.var() == pytest.approx(1 - 1 / 400, rel=0.02)
    assert (weights == 0).mean() == pytest.approx((1 - 1 / 400) ** 400, rel=0.02)


def test_roc_auc_is_undefined_where_a_resample_holds_one_class():
    truth, predicted = np.array([0.0, 0.0, 1.0]), np.array([0.1, 0.4, 0.8])

    auc = bootstrap.roc_auc(truth, predicted, np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 0.0]]))

    assert auc[0] == 1.0 and np.isnan(auc[1])


# --- the interval and the verdict ----------------------------------------------------------------


def test_a_challenger_as_good_as_the_champion_up_to_noise_is_not_promoted():
    frame, signal, truth = flights(4000, seed=1)
    champion, challenger = model(signal, 1.0, seed=10), model(signal, 1.0, seed=11)

    decision = judge(GATE, Task.classification, truth, Scored(challenger), Scored(champion), carrier_slices(frame))

    low, high = decision["interval"]["low"], decision["interval"]["high"]
    assert decision["decision"] == NOT_PROMOTED
    assert low < decision["difference"] < high and low < GATE.min_improvement
    assert decision["difference"] == pytest.approx(sk.roc_auc_score(truth, challenger) - sk.roc_auc_score(truth, champion))
    assert f"[{low:.4f}, {high:.4f}] (95%, 1000 paired resamples, seed noise not set: flywheel seed-noise measures it)" in decision["reason"]
    assert "lower bound does not clear min_improvement 0.002" in decision["reason"]
    assert (decision["confidence"], decision["resamples"], decision["seed"], decision["method"]) == (0.95, 1000, 13, METHOD)


def test_a_clearly_better_challenger_is_promoted_and_its_lower_bound_clears_the_margin():
    frame, signal, truth = flights(4000, seed=2)
    champion, challenger = model(signal, 1.5, seed=20), model(signal, 0.5, seed=21)

    decision = judge(GATE, Task.classification, truth, Scored(challenger), Scored(champion), carrier_slices(frame))

    assert decision["decision"] == PROMOTED
    assert decision["interval"]["low"] > GATE.min_improvement
    assert "lower bound clears min_improvement 0.002" in decision["reason"]
    assert not any(s["refused"] for s in decision["slices"])
    assert [s["slice"] for s in decision["slices"]] == [f"carrier={c}" for c in CARRIERS]
    # the slices' level is Bonferroni's: 5% shared among the 5 slices
    assert decision["slice_confidence"] == pytest.approx(1 - 0.05 / 5)
    slice_width = np.mean([s["interval"]["high"] - s["interval"]["low"] for s in decision["slices"]])
    assert slice_width > decision["interval"]["high"] - decision["interval"]["low"]  # fewer rows, higher level: wider


def test_seed_noise_widens_the_interval_so_a_seed_twins_lead_is_not_promoted():
    # Two "trainings" of the same model that differ only in their seed: on 20,000 test rows the
    # bootstrap alone calls the lucky one better; measured seed noise keeps it out.
    frame, signal, truth = flights(20_000, seed=4)
    lucky, champion = model(signal, 0.90, seed=40), model(signal, 1.00, seed=41)
    noisy = GATE.model_copy(update={"seed_noise": 0.007})

    alone = judge(GATE, Task.classification, truth, Scored(lucky), Scored(champion), carrier_slices(frame))
    widened = judge(noisy, Task.classification, truth, Scored(lucky), Scored(champion), carrier_slices(frame))

    assert alone["decision"] == PROMOTED and widened["decision"] == NOT_PROMOTED
    assert widened["difference"] == alone["difference"] and widened["seed_noise"] == 0.007
    half, half_alone = (d["interval"]["high"] - d["difference"] for d in (widened, alone))
    assert half**2 == pytest.approx(half_alone**2 + (1.959964 * 0.007) ** 2 * 2, rel=1e-4)  # se^2 + 2 seed_noise^2
    assert "seed noise 0.007" in widened["reason"]


def test_the_same_seed_gives_the_same_interval_and_another_seed_a_close_one():
    _, signal, truth = flights(2000, seed=3)
    champion, challenger = Scored(model(signal, 1.5, seed=30)), Scored(model(signal, 1.0, seed=31))

    first, again = (judge(GATE, Task.classification, truth, challenger, champion) for _ in range(2))
    other = judge(GATE.model_copy(update={"seed": 14}), Task.classification, truth, challenger, champion)

    assert first["interval"] == again["interval"]
    assert other["interval"] != first["interval"]
    assert other["interval"]["low"] == pytest.approx(first["interval"]["low"], abs=0.005)


def test_a_challenger_better_overall_but_much_worse_on_one_carrier_is_refused_naming_it():
    frame, signal, truth = flights(6000, seed=4)
    champion, challenger = model(signal, 1.5, seed=40), model(signal, 0.5, seed=41)
    united = (frame["carrier"] == "UA").to_numpy()
    challenger[united] = model(signal[united], 4.0, seed=42)  # on UA it barely beats a coin

    decision = judge(GATE, Task.classification, truth, Scored(challenger), Scored(champion), carrier_slices(frame))

    assert decision["decision"] == NOT_PROMOTED
    assert decision["interval"]["low"] > GATE.min_improvement  # better overall beyond noise...
    refused = [s for s in decision["slices"] if s["refused"]]
    assert [s["slice"] for s in refused] == ["carrier=UA"]  # ...but worse on UA
    ua = refused[0]
    assert ua["interval"]["high"] < -GATE.max_slice_regression and ua["rows"] == united.sum()
    assert ua["challenger"] == pytest.approx(sk.roc_auc_score(truth[united], challenger[united]))
    assert f"worse on carrier=UA: roc_auc {ua['challenger']:.4f} vs the champion's {ua['champion']:.4f}" in decision["reason"]
    assert f"[{ua['interval']['low']:.4f}, {ua['interval']['high']:.4f}]" in decision["reason"]


def test_a_slice_of_one_class_is_skipped_with_its_reason_and_not_counted():
    frame, signal, truth = flights(4000, seed=5)
    truth[(frame["carrier"] == "EV").to_numpy()] = 0.0  # no EV flight arrives late
    champion, challenger = model(signal, 1.5, seed=50), model(signal, 0.5, seed=51)

    decision = judge(GATE, Task.classification, truth, Scored(challenger), Scored(champion), carrier_slices(frame))

    (ev,) = [s for s in decision["slices"] if s["slice"] == "carrier=EV"]
    assert ev["skipped"] == f"only class 0 in its {ev['rows']} rows: roc_auc is undefined"
    assert ev["difference"] is None and ev["interval"] is None and not ev["refused"] and ev["challenger"] is None
    assert decision["slice_confidence"] == pytest.approx(1 - 0.05 / 4)
    assert decision["decision"] == PROMOTED
    json.dumps(decision, allow_nan=False)  # no nan reaches the record


def test_small_categorical_values_are_no_slice_and_a_configured_query_is_one():
    frame, _, _ = flights(1000, seed=6)
    frame["distance"] = np.arange(len(frame)) * 3.0
    gate = GATE.model_copy(update={"min_slice_rows": 210, "slices": {"long_haul": "distance > 2000 and carrier != 'AA'"}})

    found = carrier_slices(frame, gate)

    counts = frame["carrier"].value_counts()
    assert set(found) == {f"carrier={c}" for c in counts[counts >= 210].index} | {"long_haul"}
    assert 0 < len(counts[counts >= 210]) < len(CARRIERS)
    expected = np.flatnonzero((frame["distance"] > 2000) & (frame["carrier"] != "AA"))
    assert (found["long_haul"] == expected).all()


@pytest.mark.parametrize("query", ["distance >", "altitude > 3000", "distance", "distance + 1", "@rows > 3"])
def test_a_slice_query_that_does_not_run_is_refused_naming_it(query):
    frame, _, _ = flights(500, seed=7)
    frame["distance"] = 1000.0
    gate = GATE.model_copy(update={"slices": {"broken": query}})

    with pytest.raises(SliceError) as raised:
        carrier_slices(frame, gate)

    assert isinstance(raised.value, ValueError) and isinstance(raised.value, NotRetryable)
    assert "gate.slices.broken" in str(raised.value) and repr(query) in str(raised.value)
    assert len(str(raised.value)) < 500  # the reason, not the test split's values


@pytest.mark.parametrize("only", [0.0, 1.0])
def test_a_test_split_of_one_class_is_refused_with_the_reason(only):
    _, signal, _ = flights(500, seed=8)
    truth = np.full(len(signal), only)

    decision = judge(GATE, Task.classification, truth, Scored(model(signal, 0.5, 80)), Scored(model(signal, 1.0, 81)))

    assert decision["decision"] == NOT_PROMOTED
    assert decision["reason"].startswith(f"the test split holds only class {only:g} (500 labelled rows): roc_auc is undefined")
    assert decision["challenger"]["roc_auc"] is None and decision["interval"] is None
    json.dumps(decision, allow_nan=False)
    forced = judge(GATE, Task.classification, truth, Scored(model(signal, 0.5, 80)), None, force_publish=True, force_reason="INC-7: labels arrive late")
    assert forced["decision"] == PROMOTED and forced["reason"].startswith("forced: INC-7: labels arrive late (the gate said: the test split holds")


@pytest.mark.parametrize(("challenger_noise", "champion_noise", "expected"), [(5.0, 20.0, PROMOTED), (20.0, 5.0, NOT_PROMOTED)])
def test_regression_on_rmse_counts_lower_as_better(challenger_noise, champion_noise, expected):
    rng = np.random.default_rng(9)
    truth = rng.normal(1000, 300, size=3000)
    challenger = (truth + rng.normal(scale=challenger_noise, size=3000)).astype("float32")
    champion = (truth + rng.normal(scale=champion_noise, size=3000)).astype("float32")
    gate = GateConfig(metric="rmse", min_improvement=0.0, floor=100.0)

    decision = judge(gate, Task.regression, truth, Scored(challenger), Scored(champion))

    assert decision["decision"] == expected
    assert set(decision["challenger"]) == {"rmse", "mae"}  # no threshold for a regression
    assert decision["difference"] == pytest.approx(decision["champion"]["rmse"] - decision["challenger"]["rmse"])
    assert (decision["interval"]["low"] > 0) == (expected == PROMOTED)
    assert (decision["difference"] > 0) == (expected == PROMOTED)


def test_the_interval_covers_a_zero_difference_at_about_its_level():
    # Challenger and champion equally good (the same signal, noise of the same size): the true
    # difference is 0. At level 0.8, 50 datasets should cover it 40 times (binomial sd 2.8); the
    # tolerance, 33 to 47, is 2.5 sd each side: too narrow and too wide an interval both fail.
    gate = GATE.model_copy(update={"confidence": 0.8, "resamples": 200})
    covered = 0
    for seed in range(50):
        _, signal, truth = flights(600, seed=100 + seed)
        decision = judge(gate, Task.classification, truth, Scored(model(signal, 1.0, 2 * seed)), Scored(model(signal, 1.0, 2 * seed + 1)))
        covered += decision["interval"]["low"] <= 0 <= decision["interval"]["high"]

    assert 33 <= covered <= 47


def test_no_champion_needs_only_the_floor():
    _, signal, truth = flights(800, seed=10)

    decision = judge(GATE, Task.classification, truth, Scored(model(signal, 1.0, 100)), None)

    assert decision["decision"] == PROMOTED and decision["reason"].startswith("no champion yet; roc_auc")
    assert decision["champion"] is None and decision["interval"] is None and decision["slices"] == []


# --- thresholds ----------------------------------------------------------------------------------


def test_precision_recall_and_f1_are_at_each_models_own_threshold():
    _, signal, truth = flights(2000, seed=11)
    ours, theirs = model(signal, 0.5, 110), model(signal, 1.0, 111)
    threshold, source = threshold_of({"threshold": {"value": 0.31, "objective": "recall", "target": 0.8, "validation": {}}})

    decision = judge(GATE, Task.classification, truth, Scored(ours, threshold, source), Scored(theirs, *threshold_of({"parity_rows": 300})))

    assert (decision["challenger"]["threshold"], decision["challenger"]["threshold_source"]) == (0.31, "export")
    assert (decision["champion"]["threshold"], decision["champion"]["threshold_source"]) == (0.5, "default")
    for role, predicted, cut in (("challenger", ours, 0.31), ("champion", theirs, 0.5)):
        assert decision[role]["f1"] == pytest.approx(sk.f1_score(truth, predicted >= cut))
        assert decision[role]["precision"] == pytest.approx(sk.precision_score(truth, predicted >= cut))
        assert decision[role]["recall"] == pytest.approx(sk.recall_score(truth, predicted >= cut))


def test_a_gate_on_f1_resamples_each_model_at_its_own_threshold():
    _, signal, truth = flights(2000, seed=12)
    gate = GATE.model_copy(update={"metric": "f1"})
    predicted = model(signal, 0.7, 120)

    # the same probabilities, cut near their best F1 (0.5) against cut at 0.8 (as for a precision target)
    decision = judge(gate, Task.classification, truth, Scored(predicted), Scored(predicted, 0.8, "export"))

    assert decision["difference"] == pytest.approx(sk.f1_score(truth, predicted >= 0.5) - sk.f1_score(truth, predicted >= 0.8))
    assert decision["difference"] > 0 and decision["interval"]["low"] > 0


# --- evaluate: ONNX files, export.json, the champion's lineage -----------------------------------


def passthrough(column: str, file, threshold: float | None = None) -> None:
    """An ONNX model whose ``prediction`` is the float column ``column`` as given, with a
    classifier's ``label`` output at ``threshold`` (as exports now make) when one is given."""
    x = helper.make_tensor_value_info(column, TensorProto.FLOAT, ["batch", 1])
    outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 1])]
    nodes = [helper.make_node("Identity", [column], [OUTPUT])]
    initializers = []
    if threshold is not None:
        initializers.append(helper.make_tensor("cut", TensorProto.FLOAT, [], [threshold]))
        nodes += [helper.make_node("GreaterOrEqual", [OUTPUT, "cut"], ["called"]), helper.make_node("Cast", ["called"], ["label"], to=TensorProto.INT32)]
        outputs.append(helper.make_tensor_value_info("label", TensorProto.INT32, ["batch", 1]))
    graph = helper.make_graph(nodes, "passthrough", [x], outputs, initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(file))


@pytest.fixture
def gated_project(tmp_path):
    """A flights project whose test split carries two models' probabilities as columns, a
    candidate that answers one (threshold 0.35 in its export.json) and a served version 1 that
    answers the other (threshold 0.6 in its lineage)."""
    config = make_project(tmp_path / "home", {"gate": {"resamples": 300, "min_slice_rows": 150, "slices": {"late_evening": "hour >= 20"}}})
    frame, signal, truth = flights(3000, seed=13)
    rng = np.random.default_rng(13)
    frame = frame.assign(
        origin=rng.choice(["EWR", "JFK", "LGA"], len(frame)),
        dest=rng.choice(["ATL", "ORD"], len(frame)),
        hour=rng.integers(5, 23, len(frame)).astype(float),
        arr_delayed=truth,
        ours=model(signal, 0.4, 130),
        theirs=model(signal, 1.5, 131),
    )
    frame.loc[frame.index[:40], "arr_delayed"] = np.nan  # unlabelled rows are not scored
    test = split_paths(config.split.output_dir)["test"]
    test.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(test, index=False)
    candidate = config.artifacts_dir / "candidates" / "c1"
    candidate.mkdir(parents=True)
    passthrough("ours", candidate / MODEL_FILE, 0.35)
    (candidate / "export.json").write_text(json.dumps({"threshold": {"value": 0.35, "objective": "f1", "target": None, "validation": {}}}))
    served = config.home / "served.onnx"
    passthrough("theirs", served)
    version = repository.add_version(config.model_dir, {MODEL_FILE: served}, {"export": {"threshold": {"value": 0.6, "objective": "f1"}}})
    repository.write_model_config(config.model_dir, repository.model_config(config.model_dir, config.serving, config.dataset, version))
    return config, config.portable(candidate), frame.dropna(subset=["arr_delayed"])


def test_evaluate_writes_the_interval_slices_and_thresholds_to_gate_json(gated_project):
    config, candidate, labelled = gated_project

    decision = evaluate(config, candidate)

    written = json.loads((config.home / candidate / "gate.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in gate.json"))
    assert written == json.loads(json.dumps(decision))
    assert decision["decision"] == PROMOTED and decision["champion_version"] == 1 and decision["test_rows"] == len(labelled) + 40
    assert (decision["challenger"]["threshold"], decision["champion"]["threshold"]) == (0.35, 0.6)
    truth = labelled["arr_delayed"].to_numpy()
    assert decision["challenger"]["f1"] == pytest.approx(sk.f1_score(truth, labelled["ours"] >= np.float32(0.35)))
    assert decision["champion"]["recall"] == pytest.approx(sk.recall_score(truth, labelled["theirs"] >= np.float32(0.6)))
    names = {s["slice"] for s in decision["slices"]}
    assert {"carrier=UA", "origin=JFK", "dest=ORD", "late_evening"} <= names
    (evening,) = [s for s in decision["slices"] if s["slice"] == "late_evening"]
    assert evening["rows"] == (labelled["hour"] >= 20).sum()
    assert decision["resamples"] == 300 and decision["method"] == METHOD


def test_a_broken_slice_query_fails_evaluate_before_any_model_is_scored(gated_project, monkeypatch):
    config, candidate, _ = gated_project
    broken = config.model_copy(update={"gate": config.gate.model_copy(update={"slices": {"late": "hour >> 20"}})})
    monkeypatch.setattr("pipelines.evaluation.gate.predict_onnx", lambda *args: pytest.fail("scored before the slices were checked"))

    with pytest.raises(SliceError, match=r"gate.slices.late: the query 'hour >> 20'"):
        evaluate(broken, candidate)


def test_publish_reports_the_numbers_of_the_decision_for_prometheus(gated_project):
    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.serving.publish import report

    config, candidate, _ = gated_project
    decision = evaluate(config, candidate)

    report(config, decision["decision"], decision)

    text = (config.path(config.metrics.textfile_dir) / "publish.prom").read_text()
    gate_metrics = {(s.labels["role"], s.labels["metric"]): s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "flywheel_gate_metric"}
    assert gate_metrics[("challenger", "roc_auc")] == pytest.approx(decision["challenger"]["roc_auc"])
    assert gate_metrics[("champion", "threshold")] == 0.6
