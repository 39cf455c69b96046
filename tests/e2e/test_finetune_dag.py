"""The finetune DAG, run by a real Airflow and served by a real Triton: LoRA on the packaged
MiniLM over the real reviews beats the untuned base, only adapter weights change, and the
served ensemble (raw text in) answers like the merged model does locally."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pipelines.artifacts import ADAPTER_DIR
from pipelines.evaluation.gate import PROMOTED
from pipelines.finetune import data, serving
from pipelines.finetune.export import tokenize
from pipelines.finetune.params import PACKAGED_MINILM, resolve_base
from pipelines.finetune.train import load_tokenizer, merged
from pipelines.launch.airflow import AirflowApiError, LocalAirflow
from pipelines.launch.triton import TritonServer
from pipelines.serving import repository
from tests.conftest import REPO, free_ports, make_home, make_text_project

pytestmark = pytest.mark.e2e
pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) installs on x86_64 Linux only")

# A quick run that still learns: the first 1,200 training reviews, cut to 64 tokens.
RUN = {"max_train_records": 1200, "epochs": 2, "max_length": 64, "learning_rate": 1e-3, "target_modules": ["query", "value", "dense"]}
FINETUNE = "finetune__reviews"
MARGIN = 0.02  # finetune.min_gain_over_base: the accuracy the run must gain over the untuned base


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Airflow and Triton on one project whose review datasets have landed."""
    home = tmp_path_factory.mktemp("finetune-e2e")
    http, grpc, metrics, api = free_ports(4)
    triton = {"url": f"127.0.0.1:{http}", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
    make_home(home, {"serving": {"triton": triton}})
    config = make_text_project(home, {"finetune": {"max_eval_records": 300, "min_gain_over_base": MARGIN}})
    data.write_review_datasets(config.finetune.landing_dir)
    local = LocalAirflow(
        home / "airflow", REPO / "dags", REPO / "plugins", port=api,
        extra_env={"FLYWHEEL_HOME": str(config.home)}, scheduled=False,
    )
    with TritonServer(config), local:
        local.wait_for_dag(FINETUNE)
        yield local, config


def states(airflow: LocalAirflow, run_id: str) -> dict[str, str]:
    return {t["task_id"]: t["state"] for t in airflow.task_instances(FINETUNE, run_id)}


def test_lora_on_minilm_beats_the_base_and_is_served_as_a_text_ensemble(stack):
    airflow, config = stack

    run_id = airflow.trigger(FINETUNE, RUN)
    state = airflow.wait_for_run(FINETUNE, run_id, timeout=1800)

    assert state == "success", states(airflow, run_id)
    decision = airflow.xcom(FINETUNE, run_id, "evaluate")
    assert decision["decision"] == PROMOTED, decision
    assert decision["challenger"]["accuracy"] >= decision["base"]["accuracy"] + MARGIN
    published = airflow.xcom(FINETUNE, run_id, "publish")
    assert published["version"] == repository.served_version(config.served_model_dir) == 1
    # the dataset went through validation: the real reviews' duplicates are in quarantine
    assert airflow.xcom(FINETUNE, run_id, "validate")["quarantined"] == 27

    # Only adapter weights were trained: the saved adapter holds LoRA matrices and the new head, and every LoRA B moved from its zero start.
    trained = airflow.xcom(FINETUNE, run_id, "train")
    assert 0 < trained["parameters"]["trainable"] < 0.02 * trained["parameters"]["total"]
    with safe_open(config.home / trained["candidate"] / ADAPTER_DIR / "adapter_model.safetensors", "pt") as saved:
        names = list(saved.keys())
        assert names and all("lora_" in n or ".classifier." in n for n in names), names
        assert all(saved.get_tensor(n).abs().sum() > 0 for n in names if "lora_B" in n)

    # The served ensemble takes raw strings and answers as the merged model does in PyTorch.
    texts = [r["text"] for r in data.load_splits(config.finetune, "reviews")["test"][:40]]
    model = merged(config.home / trained["candidate"])
    feeds = tokenize(load_tokenizer(resolve_base(PACKAGED_MINILM[0])), texts, RUN["max_length"])
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
    expected = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    for protocol in ("http", "grpc"):
        url = config.serving.triton.url if protocol == "http" else f"127.0.0.1:{config.serving.triton.grpc_port}"
        labels, scores = serving.classify(config, texts, url=url, protocol=protocol)
        assert labels == expected
        torch.testing.assert_close(torch.from_numpy(scores), torch.softmax(logits, -1), atol=1e-4, rtol=0)
    lineage = json.loads((config.home / published["lineage"]).read_text())
    assert lineage["base_model"]["sha256"] and lineage["data_version"] == airflow.xcom(FINETUNE, run_id, "version_data")["data_version"]


def test_bad_params_are_refused_before_any_training(stack):
    airflow, config = stack

    with pytest.raises(AirflowApiError, match="r") as refused:  # the form's schema: r must be at least 1
        airflow.trigger(FINETUNE, {"r": 0})
    assert refused.value.status == 400

    for bad in ({"target_modules": ["q_proj"]}, {"base_model": "/nowhere/model"}):
        run_id = airflow.trigger(FINETUNE, bad)
        assert airflow.wait_for_run(FINETUNE, run_id, timeout=300) == "failed"
        seen = states(airflow, run_id)
        assert seen["check_params"] == "failed" and seen["train"] == "upstream_failed", seen
