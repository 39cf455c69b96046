"""Publishing into a real Triton (the tritonserver bundled in nvidia-pytriton): versions go
live only after a smoke test, switch without a failed request, and roll back."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from pipelines.artifacts import CONFIG_FILE, LABEL_OUTPUT, LINEAGE_FILE, MODEL_FILE, OUTPUT, REQUEST_ID
from pipelines.data.split import split_paths
from pipelines.data.versioning import version_split
from pipelines.evaluation.gate import PROMOTED, evaluate, predict_onnx
from pipelines.export.onnx import export, onnx_outputs
from pipelines.launch.triton import TritonServer
from pipelines.serving import live, repository
from pipelines.serving.client import ServedModel, log_dir, read_log
from pipelines.serving.publish import publish
from pipelines.serving.rollback import rollback
from pipelines.training.train import train
from tests.conftest import free_ports, make_project
from tests.serving.test_inference_log import FLUSH_SECONDS, wait_logged
from tests.serving.traffic import Traffic
from tests.unit.test_model_chain import without_label
from tests.unit.test_split import write_raw

pytestmark = pytest.mark.e2e
# The wheel that ships tritonserver exists for x86_64 Linux only; elsewhere these cannot run.
pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) installs on x86_64 Linux only")


def run(run_id: str) -> dict:
    return {"dag_id": "retrain", "run_id": run_id, "run_type": "manual", "logical_date": None}


def rows_traffic(config, rows: pd.DataFrame) -> Traffic:
    """Real rows sent to the served model without pause: (version, predictions) per answer."""
    return Traffic(lambda: live.connect(config.serving.triton), lambda client: live.infer(client, config.model.name, config.dataset, rows)[::-1])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A project with two exported candidates, and a Triton on its model repository."""
    http, grpc, metrics = free_ports(3)
    triton = {"url": f"127.0.0.1:{http}", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
    config = make_project(tmp_path_factory.mktemp("serving"), {"serving": {"triton": triton, "log": {"flush_seconds": FLUSH_SECONDS}}})
    write_raw(config, "2013-01", "2013-02", rows=3000)
    data_version = version_split(config)["data_version"]
    candidates = [train(config, data_version), train(config, data_version, {"max_epochs": 1, "learning_rate": 1e-3})]
    for candidate in candidates:
        export(config, candidate["candidate"])
    rows = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(20)
    with TritonServer(config) as server:
        yield config, data_version, [c["candidate"] for c in candidates], rows, server


def test_a_published_version_goes_live_and_answers_over_http_and_grpc(served):
    config, data_version, (first, _), rows, server = served

    result = publish(config, first, evaluate(config, first), data_version, run("night1"))

    assert result["decision"] == PROMOTED and result["version"] == result["served_version"] == 1
    expected = onnx_outputs(config.model_dir / "1" / MODEL_FILE, rows)
    over_http = live.answer(live.connect(config.serving.triton), config.model.name, config.dataset, rows)
    np.testing.assert_allclose(over_http.prediction, expected[OUTPUT], atol=1e-6)
    assert over_http.version == 1
    # the label is the prediction cut at the threshold validation chose for this candidate
    lineage = json.loads((config.model_dir / "1" / LINEAGE_FILE).read_text())
    threshold = lineage["export"]["threshold"]
    assert threshold == json.loads((config.home / first / "export.json").read_text())["threshold"] and threshold["objective"] == "f1"
    assert over_http.label.dtype == np.int32
    np.testing.assert_array_equal(over_http.label, over_http.prediction >= np.float32(threshold["value"]))
    np.testing.assert_array_equal(over_http.label, expected[LABEL_OUTPUT])
    outputs = [(o.name, mc.DataType.Name(o.data_type)) for o in repository.read_model_config(config.model_dir).output]
    assert outputs == [(OUTPUT, "TYPE_FP32"), (LABEL_OUTPUT, "TYPE_INT32"), (REQUEST_ID, "TYPE_STRING")]

    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(f"127.0.0.1:{config.serving.triton.grpc_port}")
    response = client.infer(config.model.name, live.request_inputs(config.dataset, rows, grpc))
    np.testing.assert_allclose(response.as_numpy(OUTPUT)[:, 0], expected[OUTPUT], atol=1e-6)
    np.testing.assert_array_equal(response.as_numpy(LABEL_OUTPUT)[:, 0], expected[LABEL_OUTPUT])
    assert lineage["airflow"]["run_id"] == "night1"


def test_a_new_version_replaces_the_served_one_without_a_failed_request(served):
    config, data_version, (_, second), rows, _ = served
    forced = evaluate(config, second, force_publish=True, force_reason="test: switch under load")

    with rows_traffic(config, rows) as traffic:
        result = publish(config, second, forced, data_version, run("night2"))

    assert result["version"] == 2
    assert traffic.failures == [] and traffic.versions == [1, 2], (traffic.failures[:3], traffic.versions)
    np.testing.assert_allclose(traffic.answers[-1][1], predict_onnx(config.model_dir / "2" / MODEL_FILE, rows), atol=1e-6)
    assert repository.served_version(config.model_dir) == 2


def test_a_broken_version_is_rejected_and_the_served_one_keeps_answering(served, tmp_path):
    config, data_version, (_, second), rows, _ = served
    broken = tmp_path / "broken"
    shutil.copytree(config.home / second, broken)
    (broken / MODEL_FILE).write_bytes(b"not an onnx model")
    forced = {"decision": PROMOTED, "reason": "test", "metric": "roc_auc", "challenger": {}, "champion": {}}

    with rows_traffic(config, rows) as traffic:
        with pytest.raises(live.SmokeTestError, match="version 3 of flights_delay failed to load"):
            publish(config, str(broken), forced, data_version, run("night3"))

    assert traffic.failures == [] and traffic.versions == [2]
    assert repository.served_version(config.model_dir) == 2
    lineage = repository.lineage_of(config.model_dir, 3)
    assert lineage["status"] == "rejected" and "failed to load" in lineage["rejected_reason"]
    last = json.loads(live.history_path(config.artifacts_dir, config.served_model).read_text().splitlines()[-1])
    assert last["event"] == "rejected" and last["version"] == 3 and last["previous"] == 2
    # on-call clears the failed publish task: the retry finds version 3 rejected and refuses it
    with pytest.raises(live.SmokeTestError, match="version 3 was rejected: version 3 of flights_delay failed to load"):
        publish(config, str(broken), forced, data_version, run("night3"))
    assert repository.served_version(config.model_dir) == 2 and repository.versions(config.model_dir) == [1, 2, 3]

    # and if a reload itself fails, Triton keeps the version it had and config.pbtxt is put back
    before = (config.model_dir / CONFIG_FILE).read_bytes()
    with pytest.raises(InferenceServerException):  # Triton's own answer to a failed load
        live.switch(config, live.connect(config.serving.triton), 3)
    assert (config.model_dir / CONFIG_FILE).read_bytes() == before
    assert live.infer(live.connect(config.serving.triton), config.model.name, config.dataset, rows)[1] == 2


def test_rollback_serves_a_previous_version_again_without_a_failed_request(served):
    config, _, _, rows, _ = served

    with rows_traffic(config, rows) as traffic:
        result = rollback(config, 1, run("rollback__1"))

    assert result["changed"] and result["previous"] == 2 and result["version"] == 1
    assert traffic.failures == [] and traffic.versions == [2, 1]
    assert repository.served_version(config.model_dir) == 1
    assert json.loads(live.history_path(config.artifacts_dir, config.served_model).read_text().splitlines()[-1])["event"] == "rollback"
    with pytest.raises(ValueError, match="version 3 was rejected"):
        rollback(config, 3, run("rollback__2"))
    with pytest.raises(ValueError, match=r"has no version 9; the repository holds versions \[1, 2, 3\]"):
        rollback(config, 9, run("rollback__3"))


def test_what_the_served_model_sees_reaches_the_inference_log(served):
    config, _, _, rows, _ = served

    with ServedModel(config) as model:  # the project's client: Triton logs what it answers
        first = model.answer(rows.head(10))
        answered = model.answer(rows.tail(10))

    keys = first.request_ids + answered.request_ids
    assert len(set(keys)) == 20 and all(k.endswith(f"/{i}") for k, i in zip(first.request_ids, range(10)))
    logged = wait_logged(config, set(keys)).loc[keys]
    assert set(logged["model_version"]) == {repository.served_version(config.model_dir)}
    np.testing.assert_allclose(logged[OUTPUT].head(10), first.prediction)
    assert {"carrier", "distance", "served_at", "date"} <= set(logged.columns)
    # the served label is logged beside the prediction
    np.testing.assert_array_equal(logged[LABEL_OUTPUT].tail(10).to_numpy(int), answered.label)
    np.testing.assert_array_equal(logged[LABEL_OUTPUT].head(10).to_numpy(int), onnx_outputs(config.model_dir / str(answered.version) / MODEL_FILE, rows.head(10))[LABEL_OUTPUT])


def test_a_request_that_is_not_utf8_fails_alone_and_its_batch_neighbours_are_answered(served):
    """Latin-1 bytes in one request's string input: that request gets an error naming the input,
    row and bytes; the requests the dynamic batcher put in the same batch get their answers."""
    import tritonclient.http as http

    config, _, _, rows, _ = served
    model, version = config.model.name, repository.served_version(config.model_dir)
    expected = predict_onnx(config.model_dir / str(version) / MODEL_FILE, rows)
    # The batcher waits up to 200 ms to fill a batch (a serving setting, applied by a reload):
    # the requests below then share batches for certain, not by the luck of timing.
    patient = config.model_copy(update={"serving": config.serving.model_copy(update={"max_queue_delay_microseconds": 200_000})})
    live.switch(patient, live.connect(config.serving.triton), version)
    bad = live.request_inputs(config.dataset, rows.head(2), http)
    dest = next(i for i in bad if i.name() == "dest")
    dest.set_data_from_numpy(np.array([b"EWR", b"MI\xc1"], dtype=object).reshape(-1, 1))
    client = http.InferenceServerClient(config.serving.triton.url, concurrency=16)
    before = client.get_inference_statistics(model)["model_stats"][0]

    good_answers, bad_errors = [], []
    for _ in range(10):  # 1 bad among 15 good requests, sent at once: the batcher joins them
        pending = [client.async_infer(model, bad)] + [client.async_infer(model, live.request_inputs(config.dataset, rows, http)) for _ in range(15)]
        try:
            pending[0].get_result()
        except InferenceServerException as exc:
            bad_errors.append(str(exc))
        good_answers += [p.get_result().as_numpy("prediction")[:, 0] for p in pending[1:]]

    after = client.get_inference_statistics(model)["model_stats"][0]
    live.switch(config, live.connect(config.serving.triton), version)  # the project's own setting again
    batched = int(after["execution_count"]) - int(before["execution_count"])
    assert batched <= 20, f"160 requests in {batched} batches: they were not batched together, the test would prove nothing"
    assert len(bad_errors) == 10 and all("row 1 of input 'dest' is not UTF-8" in e and "MI\\xc1" in e for e in bad_errors), bad_errors[:1]
    assert len(good_answers) == 150
    for answer in good_answers:
        np.testing.assert_allclose(answer, expected, atol=1e-6)


def test_a_version_exported_before_the_label_still_goes_live_and_serves_its_prediction_alone(served, tmp_path):
    import onnx

    from pipelines.monitoring.check import read_window

    # Given a candidate as exported before the label: no label output, no threshold
    config, data_version, (first, _), rows, _ = served
    old = tmp_path / "old"
    shutil.copytree(config.home / first, old)
    onnx.save(without_label(old / MODEL_FILE), old / MODEL_FILE)
    exported = json.loads((old / "export.json").read_text())
    (old / "export.json").write_text(json.dumps({k: v for k, v in exported.items() if k != "threshold"}))
    forced = {"decision": PROMOTED, "reason": "test: an old export", "metric": "roc_auc", "challenger": {}, "champion": {}}

    # When it is published (its smoke test compares the prediction alone)
    version = publish(config, str(old), forced, data_version, run("old-export"))["version"]

    # Then Triton serves it with the prediction alone, and the log keeps a blank label for it
    assert [o.name for o in repository.read_model_config(config.model_dir).output] == [OUTPUT, REQUEST_ID]
    with ServedModel(config) as model:
        answered = model.answer(rows)
    assert answered.version == version and answered.label is None
    np.testing.assert_allclose(answered.prediction, predict_onnx(config.model_dir / str(version) / MODEL_FILE, rows), atol=1e-6)
    wait_logged(config, set(answered.request_ids))
    logged = read_log(config.serving, config.served_model)
    assert (logged["model_version"] == version).sum() == len(rows)
    assert logged.loc[logged["model_version"] == version, LABEL_OUTPUT].isna().all()
    assert logged.loc[logged["model_version"] != version, LABEL_OUTPUT].notna().all()
    # what the drift check reads of the same log: every row, with its features
    now = datetime.now(timezone.utc)
    window = read_window(log_dir(config.serving, config.served_model), now - timedelta(days=1), now + timedelta(minutes=1))
    assert len(window) == len(logged) and {f.name for f in config.dataset.features} <= set(window.columns)


def test_a_version_whose_labels_differ_from_onnx_runtime_fails_its_smoke_test(served, monkeypatch):
    # Given a labelled candidate, and ONNX Runtime locally told its threshold is 0 (every row a 1)
    config, data_version, (first, _), rows, _ = served
    before = repository.served_version(config.model_dir)
    monkeypatch.setattr(live, "threshold_of", lambda model: 0.0)
    forced = {"decision": PROMOTED, "reason": "test: labels that differ", "metric": "roc_auc", "challenger": {}, "champion": {}}

    # Then the smoke test refuses it, counting the labels Triton cut otherwise, and the served version stays
    with pytest.raises(live.SmokeTestError, match=r"answers [1-9]\d* of \d+ test rows' labels differently through Triton than ONNX Runtime locally"):
        publish(config, first, forced, data_version, run("labels-differ"))
    assert repository.served_version(config.model_dir) == before


def test_the_server_restarts_serving_the_version_config_pbtxt_names(served):
    config, _, _, rows, server = served
    server.stop()
    with TritonServer(config):
        assert live.infer(live.connect(config.serving.triton), config.model.name, config.dataset, rows)[1] == repository.served_version(config.model_dir)
