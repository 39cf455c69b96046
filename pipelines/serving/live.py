"""Making a version live in a running Triton, and taking it back: one life cycle for every
model Triton serves.

A ``ServedUnit`` is what differs between the kinds of served model (its folder, its
``config.pbtxt`` for a version, the composing models an ensemble needs, its smoke test): a
plain ONNX model, a lookup+engine ``tensorrt_plan`` ensemble (``tabular_unit``) and a
tokenizer+classifier text ensemble (``pipelines.finetune.serving.text_unit``) are adapters of
it. Everything else is written once, here: going live with zero failed requests, rejecting a
version that fails, rolling back, the serving history.

Going live is three steps, and the served version changes only in the last one:

1. **smoke test**: the version is loaded beside the served model under a throwaway name
   (``<model>__smoke``, files sent through Triton's repository API, logging off: test rows are
   not traffic), real test rows are sent through tritonclient and the answers (predictions, and
   a classifier's labels) compared with ONNX Runtime run locally; then it is unloaded again;
2. ``config.pbtxt`` is rewritten to name the version;
3. the model is reloaded: Triton loads the new version and retires the old one only once the
   new one is ready, so no request fails; if the load fails, Triton keeps serving the old
   one and ``config.pbtxt`` is put back.

An ensemble's composing models are loaded first, listing the served version and the new one,
so the ensemble being replaced keeps its steps until the switch; the old version's steps are
retired after it. If anything before the switch fails, what was loaded is unloaded again and
the served version never changed; a published version that failed is marked rejected.

Every change of the served version is appended to ``history.jsonl`` beside the candidates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.artifacts import CONFIG_FILE, LABEL_OUTPUT, LINEAGE_FILE, MODEL_FILE, OUTPUT, REQUEST_ID
from pipelines.config import AnyProject, DatasetConfig, FeatureType, ProjectConfig, ServingConfig, ServingProfile, TritonConfig
from pipelines.errors import NotRetryable, TritonUnavailable
from pipelines.export.onnx import label_mismatches, onnx_outputs, parity_gap, threshold_of
from pipelines.lineage import Record, read_json, write_json
from pipelines.serving import repository

if TYPE_CHECKING:  # untyped packages: Any to mypy
    from tritonclient.grpc.model_config_pb2 import ModelConfig
    from tritonclient.http import InferenceServerClient, InferInput

log = logging.getLogger(__name__)
SMOKE_SUFFIX = "__smoke"


class SmokeTestError(NotRetryable, RuntimeError):
    """A new version did not load, or answered differently from ONNX Runtime run locally."""


class RouteRefused(NotRetryable, ValueError):
    """A rollout that cannot be routed: nothing served, an unknown or rejected challenger, a rendering that does not route."""


def connect(triton: TritonConfig) -> InferenceServerClient:
    """An HTTP client of the configured Triton (``serving.triton``); ``TritonUnavailable`` names the
    URL if it is down."""
    import tritonclient.http as http

    url = triton.url
    try:
        client = http.InferenceServerClient(url, connection_timeout=5, network_timeout=triton.load_timeout_s)
        if client.is_server_live():
            return client
    except Exception as exc:  # noqa: BLE001 - refused, reset, DNS: all mean "not there"
        raise TritonUnavailable(f"Triton at {url} (serving.triton.url) is not reachable: {exc}; start it with `make up`") from exc
    raise TritonUnavailable(f"Triton at {url} (serving.triton.url) answers but is not live")


def request_inputs(dataset: DatasetConfig, rows: pd.DataFrame, protocol: ModuleType) -> list[InferInput]:
    """One input per feature column, shape (rows, 1): strings for categories, float32 for numbers;
    ``protocol`` is tritonclient.http or tritonclient.grpc."""
    inputs = []
    for feature in dataset.features:
        if feature.type == FeatureType.categorical:
            values, datatype = rows[feature.name].astype(str).to_numpy(object).reshape(-1, 1), "BYTES"
        else:
            values, datatype = rows[feature.name].to_numpy("float32").reshape(-1, 1), "FP32"
        tensor = protocol.InferInput(feature.name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    return inputs


class Answer(NamedTuple):
    """What Triton's model answered for some rows."""

    prediction: npt.NDArray[np.float32]  # shape (rows,)
    # shape (rows,): 1 where the prediction is at least the version's threshold, else 0; None from
    # a version without one (a regression, or a classifier exported before the label)
    label: npt.NDArray[np.int32] | None
    version: int
    # each row's key in the inference log (``REQUEST_ID``); None from a version that logs none
    request_ids: list[str] | None = None


def answer(client: InferenceServerClient, model: str, dataset: DatasetConfig, rows: pd.DataFrame, request_id: str = "") -> Answer:
    """Every output of Triton's ``model`` for ``rows``: Triton answers each one the served
    version's config declares (``repository.outputs``). ``request_id``: the request's id (the
    rows' keys derive from it); empty, Triton makes one."""
    import tritonclient.http as http

    response = client.infer(model, request_inputs(dataset, rows, http), request_id=request_id)
    label, keys = response.as_numpy(LABEL_OUTPUT), response.as_numpy(REQUEST_ID)
    return Answer(
        response.as_numpy(OUTPUT)[:, 0],
        None if label is None else label[:, 0],
        int(response.get_response()["model_version"]),
        None if keys is None else [key.decode("utf-8") for key in keys[:, 0]],
    )


def infer(client: InferenceServerClient, model: str, dataset: DatasetConfig, rows: pd.DataFrame) -> tuple[npt.NDArray[np.float32], int]:
    """Predictions of Triton's ``model`` for ``rows`` (shape (rows,)) and the version that answered."""
    answered = answer(client, model, dataset, rows)
    return answered.prediction, answered.version


def wait_ready(client: InferenceServerClient, model: str, version: int, timeout: float) -> bool:
    """Whether ``version`` of ``model`` became ready within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.is_model_ready(model, str(version)):
            return True
        time.sleep(0.1)
    return False


def smoke_test(model_dir: Path, serving: ServingConfig, dataset: DatasetConfig, client: InferenceServerClient, version: int, rows: pd.DataFrame) -> float:
    """Load ``version`` of the model in ``model_dir`` under a throwaway name, compare its answers
    for ``rows`` with ONNX Runtime; returns the max difference of the predictions.

    ``SmokeTestError`` if it fails to load, if a prediction differs by more than
    ``serving.smoke_tolerance`` (an engine version: its export's tolerance), or, where the
    version has a ``label``, if one differs from ONNX Runtime's on a row whose prediction is at
    least that tolerance from the threshold (nearer, a runtime within tolerance may cut the other
    way; the cpu rendering runs ONNX Runtime itself, so every label matches)."""
    import onnx
    from google.protobuf import json_format

    model = model_dir.name
    folder = model_dir / str(version)
    name = model + SMOKE_SUFFIX
    rendering = repository.model_config(model_dir, serving, dataset, version, logged=False)  # test rows are not traffic
    rendering.name = name
    rendering.version_policy.specific.versions[:] = [1]
    files = {f"file:1/{p.name}": p.read_bytes() for p in folder.iterdir() if p.name != LINEAGE_FILE}
    try:
        try:
            client.load_model(name, config=json_format.MessageToJson(rendering), files=files)
        except Exception as exc:  # noqa: BLE001 - Triton answers a failed load with the backend's error
            raise SmokeTestError(f"version {version} of {model} failed to load in Triton: {exc}") from exc
        if not wait_ready(client, name, 1, serving.triton.load_timeout_s):
            raise SmokeTestError(f"version {version} of {model} did not become ready in Triton")
        try:
            served = answer(client, name, dataset, rows)
        except Exception as exc:  # noqa: BLE001
            raise SmokeTestError(f"version {version} of {model} failed a smoke inference: {exc}") from exc
    finally:
        try:
            client.unload_model(name)
        except Exception:  # noqa: BLE001 - never loaded: nothing to unload
            pass
    expected = onnx_outputs(folder / MODEL_FILE, rows)
    difference = parity_gap(served.prediction, expected[OUTPUT])
    tolerance, setting = serving.smoke_tolerance, "serving.smoke_tolerance"
    if rendering.platform == "ensemble":  # a TensorRT engine: as close to ONNX Runtime as its export accepted
        engine = repository.lineage_of(model_dir, version)["export"]["tensorrt"]
        tolerance, setting = max(tolerance, engine["tolerance"]), f"export.tensorrt_{engine['precision']}_tolerance"
    if not difference <= tolerance:
        raise SmokeTestError(
            f"version {version} of {model} answers differently through Triton than ONNX Runtime locally: "
            f"max difference {difference:.3g} (relative to values above 1) over {len(rows)} test rows > {setting} {tolerance:g}"
        )
    threshold = threshold_of(onnx.load(str(folder / MODEL_FILE)))
    if threshold is not None:
        if served.label is None:
            raise SmokeTestError(f"version {version} of {model} answers no {LABEL_OUTPUT!r} through Triton, though its model.onnx has one")
        flipped = label_mismatches(served.label, expected[OUTPUT], threshold, tolerance)
        if flipped:
            raise SmokeTestError(
                f"version {version} of {model} answers {flipped} of {len(rows)} test rows' labels differently through Triton than "
                f"ONNX Runtime locally (rows at least {setting} {tolerance:g} from the threshold {threshold:g})"
            )
    return difference


def switch(config: AnyProject, client: InferenceServerClient, version: int) -> None:
    """Serve ``version``: rewrite ``config.pbtxt``, reload, wait until that version is ready.

    On failure the previous ``config.pbtxt`` is put back (or removed, before the first version)
    and Triton keeps what it served.
    """
    unit = served_unit(config)
    previous = repository.read_model_config(unit.folder)
    repository.write_model_config(unit.folder, unit.rendering(version))
    try:
        client.load_model(unit.name)
        if not wait_ready(client, unit.name, version, config.serving.triton.load_timeout_s):
            raise SmokeTestError(f"version {version} of {unit.name} did not become ready")
    except Exception:
        if previous is None:
            (unit.folder / CONFIG_FILE).unlink(missing_ok=True)
        else:
            repository.write_model_config(unit.folder, previous)
        raise


def hold_steps(client: InferenceServerClient, renderings: dict[Path, ModelConfig | None], timeout: float) -> None:
    """Have Triton hold what each ensemble step's rendering lists: its ``config.pbtxt`` is
    rewritten and the step reloaded (``None``: the config removed and the step unloaded).

    A version that fails to load raises ``SmokeTestError``; Triton keeps what it held.
    """
    for folder, rendering in renderings.items():
        write_steps({folder: rendering})
        if rendering is None:
            try:
                client.unload_model(folder.name)
            except Exception:  # noqa: BLE001 - never loaded: nothing to unload
                pass
            continue
        served = list(rendering.version_policy.specific.versions)
        try:
            client.load_model(folder.name)
        except Exception as exc:  # noqa: BLE001 - Triton answers a failed load with the backend's error
            raise SmokeTestError(f"{folder.name} versions {served} failed to load in Triton: {exc}") from exc
        if not wait_ready(client, folder.name, max(served), timeout):
            raise SmokeTestError(f"{folder.name} version {max(served)} did not become ready in Triton")


@dataclass(frozen=True)
class ServedUnit:
    """What differs between the kinds of model Triton serves; the life cycle is ``serve``."""

    folder: Path  # config.pbtxt, and each version's lineage.json (and reference.parquet)
    rendering: Callable[[int], ModelConfig]  # the served model's ModelConfig for a version
    # Each composing model's ModelConfig holding these versions (None: unloaded); {} for none.
    steps: Callable[[list[int]], dict[Path, ModelConfig | None]]
    # Load a version beside the served one (through this client), compare it with ONNX Runtime
    # run locally: the max difference, or SmokeTestError.
    smoke: Callable[[InferenceServerClient, int], float]

    @property
    def name(self) -> str:
        return self.folder.name


def served_unit(config: AnyProject) -> ServedUnit:
    """The adapter of the project's served model."""
    if isinstance(config, ProjectConfig):
        return tabular_unit(config)
    from pipelines.finetune.serving import text_unit

    return text_unit(config)


def tabular_unit(config: ProjectConfig) -> ServedUnit:
    """A tabular model: one ONNX model (Python backend or ``onnxruntime_onnx``), or, for a version
    whose export built a TensorRT engine under the gpu profile, the lookup (ONNX Runtime, CPU) ->
    engine (``tensorrt_plan``, GPU) ensemble. The engine steps run on NVIDIA's Triton image only:
    the bundled tritonserver has no TensorRT or ONNX Runtime backend, so they have not run in
    this project's tests."""
    from pipelines.data.split import split_paths

    model_dir, serving, dataset = config.model_dir, config.serving, config.dataset

    def rendering(version: int) -> ModelConfig:
        return repository.model_config(model_dir, serving, dataset, version, project=config.name)

    def steps(served: list[int]) -> dict[Path, ModelConfig | None]:
        folders = {step: repository.step_dir(model_dir, step) for step in repository.ENGINE_STEPS}
        engines = [v for v in served if rendering(v).platform == "ensemble"]
        if not engines and not any((f / CONFIG_FILE).exists() for f in folders.values()):
            return {}  # no engine version was ever served: nothing to load or unload
        renderings = repository.step_configs(model_dir, serving, dataset, engines) if engines else {}
        return {folder: renderings.get(step) for step, folder in folders.items()}

    def smoke(client: InferenceServerClient, version: int) -> float:
        rows = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(serving.smoke_rows)
        return smoke_test(model_dir, serving, dataset, client, version, rows)

    return ServedUnit(model_dir, rendering, steps, smoke)


def write_steps(renderings: dict[Path, ModelConfig | None]) -> None:
    """Write each composing model's config (``None``: remove it), for a Triton started later."""
    for folder, rendering in renderings.items():
        if rendering is None:
            (folder / CONFIG_FILE).unlink(missing_ok=True)
        else:
            repository.write_model_config(folder, rendering)


def history_path(artifacts_dir: Path, model: str) -> Path:
    """The serving history of a project's served ``model``, in its ``artifacts_dir``."""
    return artifacts_dir / "serving" / model / "history.jsonl"


def record(config: AnyProject, event: str, version: int, previous: int | None, run: Record, **details: Any) -> Record:
    """Append a change of the served version (or a rejected one) to the project's serving history."""
    entry: Record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "event": event,
        "version": version,
        "previous": previous,
        "run_id": run.get("run_id"),
        **details,
    }
    path = history_path(config.artifacts_dir, config.served_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(entry) + "\n")
    return entry


def mark_rejected(config: AnyProject, version: int, previous: int | None, run: Record, reason: str) -> None:
    """Keep the version on disk with the reason, so it is never served or rolled back to, and
    record the rejection in the serving history (``previous``: the version serving)."""
    path = config.served_model_dir / str(version) / LINEAGE_FILE
    write_json(path, {**read_json(path), "status": "rejected", "rejected_reason": reason})
    record(config, "rejected", version, previous, run, reason=reason)


def serve(config: AnyProject, version: int, run: Record, event: str) -> Record:
    """Make ``version`` the served one (``event``: publish or rollback); returns the history entry.

    With ``serving.triton.url`` set, it goes live in that Triton (a published version is
    smoke-tested first); without, only the configs change, for Triton to load at start.
    """
    unit = served_unit(config)
    previous = repository.served_version(unit.folder)
    if previous == version:  # a retried task whose first try got this far
        return {"event": event, "version": version, "previous": previous, "unchanged": True}
    lineage = repository.lineage_of(unit.folder, version)
    if lineage.get("status") == "rejected":  # e.g. a cleared publish task: never serve it on a second try
        raise SmokeTestError(f"{unit.name} version {version} was rejected: {lineage.get('rejected_reason')}")
    if not config.serving.triton.url:
        write_steps(unit.steps([version]))  # a step's config must be there before its ensemble's
        repository.write_model_config(unit.folder, unit.rendering(version))
        log.info("serving.triton.url is not set: version %d of %s is served by the repository, not loaded in a Triton", version, unit.name)
        return record(config, event, version, previous, run)
    timeout = config.serving.triton.load_timeout_s
    kept = [previous] if previous else []
    with connect(config.serving.triton) as client:  # closed after: open connections hold up a server's shutdown
        try:
            hold_steps(client, unit.steps([*kept, version]), timeout)
            if event == "publish":
                difference = unit.smoke(client, version)
                log.info("smoke test of %s version %d passed: max |triton - onnxruntime| = %.2g", unit.name, version, difference)
            started = time.monotonic()
            switch(config, client, version)
        except Exception as failed:
            hold_steps(client, unit.steps(kept), timeout)  # unload what this loaded: the served version never changed
            if isinstance(failed, SmokeTestError) and event == "publish":
                mark_rejected(config, version, previous, run, str(failed))
            raise
        hold_steps(client, unit.steps([version]), timeout)  # retire the previous version's steps
    seconds = time.monotonic() - started
    log.info("%s version %d is live (was %s) after %.1f s", unit.name, version, previous, seconds)
    return record(config, event, version, previous, run, switch_seconds=round(seconds, 3))


def smoke(config: ProjectConfig, version: int, run: Record) -> float | None:
    """Smoke-test ``version`` in Triton (``ServedUnit.smoke``) without serving it: the max
    difference from ONNX Runtime, or None without ``serving.triton.url``. A failure marks the
    version rejected, records it in the serving history and raises ``SmokeTestError``."""
    if not config.serving.triton.url:
        return None
    unit = served_unit(config)
    with connect(config.serving.triton) as client:
        try:
            return unit.smoke(client, version)
        except SmokeTestError as failed:
            mark_rejected(config, version, repository.served_version(unit.folder), run, str(failed))
            raise


def route(config: ProjectConfig, rollout: repository.Route | None, run: Record, event: str) -> Record:
    """Have the served (champion) version route to a rollout's challenger (``rollout``: shadow, or
    a canary's share), or serve alone again (None); returns the history entry (``event``: shadow,
    canary, abort, ...).

    The champion keeps its version: only its ``config.pbtxt`` parameters change, and Triton loads
    the new config beside the one serving and swaps once it is ready, so no request fails (the
    same reload as ``switch``). If the load fails the previous config is put back and Triton
    keeps what it served. ``RouteRefused`` for a project with nothing served, a challenger that is
    the champion, unknown or rejected, or the gpu profile (its renderings do not route).
    """
    folder = config.model_dir
    champion = repository.served_version(folder)
    if champion is None:
        raise RouteRefused(f"project {config.name}: {folder.name} serves no version yet; a first version is served in full")
    if rollout is not None:
        if config.serving.profile != ServingProfile.cpu:
            raise RouteRefused(f"project {config.name}: a rollout is routed by the cpu rendering; serving.profile is {config.serving.profile.value}")
        if rollout.challenger == champion or rollout.challenger not in repository.versions(folder):
            raise RouteRefused(f"project {config.name}: challenger {rollout.challenger} is not a version of {folder.name} other than the served {champion}")
        status = repository.lineage_of(folder, rollout.challenger).get("status")
        if status == "rejected":
            raise RouteRefused(f"project {config.name}: {folder.name} version {rollout.challenger} was rejected and is never served")
        refreshed = repository.refresh_backend(folder, champion)
        if refreshed:
            log.info("%s version %d: backend files %s brought up to date for the router", folder.name, champion, refreshed)
    previous = repository.read_model_config(folder)
    repository.write_model_config(folder, repository.model_config(folder, config.serving, config.dataset, champion, route=rollout, project=config.name))
    started = time.monotonic()
    if config.serving.triton.url:
        try:
            with connect(config.serving.triton) as client:
                client.load_model(folder.name)  # explicit mode: returns once the new config serves
        except Exception:
            if previous is not None:
                repository.write_model_config(folder, previous)
            raise
    details = {"challenger": rollout.challenger, "mode": rollout.mode, "share": rollout.share} if rollout else {}
    return record(config, event, champion, champion, run, switch_seconds=round(time.monotonic() - started, 3), **details)
