"""Making a version live in a running Triton, and taking it back.

Going live is three steps, and the served version changes only in the last one:

1. **smoke test**: the version is loaded beside the served model under a throwaway name
   (``<model>__smoke``, files sent through Triton's repository API), real test rows are sent
   through tritonclient and the answers compared with ONNX Runtime run locally; then it is
   unloaded again;
2. ``config.pbtxt`` is rewritten to name the version;
3. the model is reloaded: Triton loads the new version and retires the old one only once the
   new one is ready, so no request fails; if the load fails, Triton keeps serving the old
   one and ``config.pbtxt`` is put back.

A version served as a ``tensorrt_plan`` ensemble (gpu profile, an engine built at export) has
its two steps loaded first, listing the served version and the new one, so the ensemble being
replaced keeps its steps until the switch; the old version's steps are retired after it.

Every change of the served version is appended to ``history.jsonl`` beside the candidates.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.errors import NotRetryable
from pipelines.config import AnyProject, Deployment, FeatureType, ProjectConfig
from pipelines.export.onnx import MODEL_FILE, OUTPUT
from pipelines.lineage import read_json, write_json
from pipelines.serving import repository
from pipelines.serving.triton import TritonUnavailable

log = logging.getLogger(__name__)
SMOKE_SUFFIX = "__smoke"


class SmokeTestError(NotRetryable, RuntimeError):
    """A new version did not load, or answered differently from ONNX Runtime run locally."""


def connect(config: Deployment):
    """An HTTP client of the configured Triton; ``TritonUnavailable`` names the URL if it is down."""
    import tritonclient.http as http

    url = config.serving.triton.url
    try:
        client = http.InferenceServerClient(url, connection_timeout=5, network_timeout=config.serving.triton.load_timeout_s)
        if client.is_server_live():
            return client
    except Exception as exc:  # noqa: BLE001 - refused, reset, DNS: all mean "not there"
        raise TritonUnavailable(f"Triton at {url} (serving.triton.url) is not reachable: {exc}; start it with `make up`") from exc
    raise TritonUnavailable(f"Triton at {url} (serving.triton.url) answers but is not live")


def request_inputs(config: ProjectConfig, rows: pd.DataFrame, protocol):
    """One input per feature column, shape (rows, 1): strings for categories, float32 for numbers."""
    inputs = []
    for feature in config.dataset.features:
        if feature.type == FeatureType.categorical:
            values, datatype = rows[feature.name].astype(str).to_numpy(object).reshape(-1, 1), "BYTES"
        else:
            values, datatype = rows[feature.name].to_numpy("float32").reshape(-1, 1), "FP32"
        tensor = protocol.InferInput(feature.name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    return inputs


def infer(client, config: ProjectConfig, rows: pd.DataFrame, model: str | None = None) -> tuple[np.ndarray, int]:
    """Predictions for ``rows`` and the version that answered."""
    import tritonclient.http as http

    response = client.infer(model or config.model.name, request_inputs(config, rows, http))
    return response.as_numpy(OUTPUT)[:, 0], int(response.get_response()["model_version"])


def wait_ready(client, model: str, version: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.is_model_ready(model, str(version)):
            return True
        time.sleep(0.1)
    return False


def smoke_test(config: ProjectConfig, client, version: int, rows: pd.DataFrame) -> float:
    """Load ``version`` under a throwaway name, compare its answers with ONNX Runtime; returns the max difference."""
    from google.protobuf import json_format

    from pipelines.evaluation.gate import predict_onnx

    folder = config.model_dir / str(version)
    name = config.model.name + SMOKE_SUFFIX
    rendering = repository.model_config(config, version)
    rendering.name = name
    rendering.version_policy.specific.versions[:] = [1]
    files = {f"file:1/{p.name}": p.read_bytes() for p in folder.iterdir() if p.name != repository.LINEAGE_FILE}
    try:
        try:
            client.load_model(name, config=json_format.MessageToJson(rendering), files=files)
        except Exception as exc:  # noqa: BLE001 - Triton answers a failed load with the backend's error
            raise SmokeTestError(f"version {version} of {config.model.name} failed to load in Triton: {exc}") from exc
        if not wait_ready(client, name, 1, config.serving.triton.load_timeout_s):
            raise SmokeTestError(f"version {version} of {config.model.name} did not become ready in Triton")
        try:
            served, _ = infer(client, config, rows, model=name)
        except Exception as exc:  # noqa: BLE001
            raise SmokeTestError(f"version {version} of {config.model.name} failed a smoke inference: {exc}") from exc
    finally:
        try:
            client.unload_model(name)
        except Exception:  # noqa: BLE001 - never loaded: nothing to unload
            pass
    difference = float(np.max(np.abs(served - predict_onnx(folder / MODEL_FILE, rows))))
    tolerance, setting = config.serving.smoke_tolerance, "serving.smoke_tolerance"
    if rendering.platform == "ensemble":  # a TensorRT engine: as close to ONNX Runtime as its export accepted
        engine = repository.lineage_of(config.model_dir, version)["export"]["tensorrt"]
        tolerance, setting = max(tolerance, engine["tolerance"]), f"export.tensorrt_{engine['precision']}_tolerance"
    if not difference <= tolerance:
        raise SmokeTestError(
            f"version {version} of {config.model.name} answers differently through Triton than ONNX Runtime locally: "
            f"max difference {difference:.3g} over {len(rows)} test rows > {setting} {tolerance:g}"
        )
    return difference


def switch(config: ProjectConfig, client, version: int) -> None:
    """Serve ``version``: rewrite ``config.pbtxt``, reload, wait until that version is ready.

    On failure the previous ``config.pbtxt`` is restored and Triton keeps the old version.
    """
    model_dir = config.model_dir
    previous = repository.read_model_config(model_dir)
    repository.write_model_config(model_dir, repository.model_config(config, version))  # steps: see load_engine_steps
    try:
        client.load_model(config.model.name)
        if not wait_ready(client, config.model.name, version, config.serving.triton.load_timeout_s):
            raise SmokeTestError(f"version {version} of {config.model.name} did not become ready")
    except Exception:
        if previous is not None:
            repository.write_model_config(model_dir, previous)
        raise


def hold_steps(client, renderings: dict[Path, object | None], timeout: float) -> None:
    """Have Triton hold what each ensemble step's rendering lists: its ``config.pbtxt`` is
    rewritten and the step reloaded (``None``: the config removed and the step unloaded).

    A version that fails to load raises ``SmokeTestError``; Triton keeps what it held.
    """
    for folder, rendering in renderings.items():
        if rendering is None:
            (folder / repository.CONFIG_FILE).unlink(missing_ok=True)
            try:
                client.unload_model(folder.name)
            except Exception:  # noqa: BLE001 - never loaded: nothing to unload
                pass
            continue
        repository.write_model_config(folder, rendering)
        served = list(rendering.version_policy.specific.versions)
        try:
            client.load_model(folder.name)
        except Exception as exc:  # noqa: BLE001 - Triton answers a failed load with the backend's error
            raise SmokeTestError(f"{folder.name} versions {served} failed to load in Triton: {exc}") from exc
        if not wait_ready(client, folder.name, max(served), timeout):
            raise SmokeTestError(f"{folder.name} version {max(served)} did not become ready in Triton")


def load_engine_steps(config: ProjectConfig, client, served: list[int]) -> None:
    """Have Triton hold exactly ``served`` versions of the tensorrt_plan steps (none: unloaded).

    The gpu profile only, on NVIDIA's Triton image: the bundled tritonserver has no TensorRT or
    ONNX Runtime backend, so this has not run in this project's tests.
    """
    folders = {step: repository.step_dir(config, step) for step in repository.ENGINE_STEPS}
    if not served and not any((f / repository.CONFIG_FILE).exists() for f in folders.values()):
        return  # no engine version was ever served: nothing to load or unload
    renderings = repository.step_configs(config, served) if served else {}
    hold_steps(client, {f: renderings.get(step) for step, f in folders.items()}, config.serving.triton.load_timeout_s)


def history_path(config: AnyProject, model: str | None = None) -> Path:
    """The serving history of ``model`` (default: the project's served model)."""
    return config.path(config.artifacts_dir) / "serving" / (model or config.served_model) / "history.jsonl"


def record(config: AnyProject, event: str, version: int, previous: int | None, run: dict, model: str | None = None, **details) -> dict:
    """Append a change of the served version (or a rejected one) to the serving history of ``model``."""
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "event": event,
        "version": version,
        "previous": previous,
        "run_id": run.get("run_id"),
        **details,
    }
    path = history_path(config, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(entry) + "\n")
    return entry


def mark_rejected(config: AnyProject, version: int, reason: str, model_dir: Path | None = None) -> None:
    """Keep the version on disk with the reason, so it is never served or rolled back to.

    ``model_dir`` defaults to the tabular model's; an ensemble's is the folder holding its lineage.
    """
    path = (model_dir or config.model_dir) / str(version) / repository.LINEAGE_FILE
    write_json(path, {**read_json(path), "status": "rejected", "rejected_reason": reason})


def serve(config: ProjectConfig, version: int, run: dict, event: str) -> dict:
    """Make ``version`` the served one (``event``: publish or rollback); returns the history entry.

    With ``serving.triton.url`` set, it goes live in that Triton (a published version is
    smoke-tested first); without, only ``config.pbtxt`` changes, for Triton to load at start.
    """
    from pipelines.data.split import split_paths

    previous = repository.served_version(config.model_dir)
    if previous == version:  # a retried task whose first try got this far
        return {"event": event, "version": version, "previous": previous, "unchanged": True}
    lineage = repository.lineage_of(config.model_dir, version)
    if lineage.get("status") == "rejected":  # e.g. a cleared publish task: never serve it on a second try
        raise SmokeTestError(f"{config.model.name} version {version} was rejected: {lineage.get('rejected_reason')}")
    if not config.serving.triton.url:
        repository.write_rendering(config, version)
        log.info("serving.triton.url is not set: version %d is served by the repository, not loaded in a Triton", version)
        return record(config, event, version, previous, run)
    client = connect(config)
    # A tensorrt_plan ensemble's steps hold the served version and the new one while it switches.
    served = repository.read_model_config(config.model_dir)
    kept = [previous] if previous and served is not None and served.platform == "ensemble" else []
    engine = repository.model_config(config, version).platform == "ensemble"
    try:
        try:
            load_engine_steps(config, client, [*kept, version] if engine else kept)
            if event == "publish":
                rows = pd.read_parquet(split_paths(config)["test"]).head(config.serving.smoke_rows)
                difference = smoke_test(config, client, version, rows)
                log.info("smoke test of version %d passed: max |triton - onnxruntime| = %.2g over %d rows", version, difference, len(rows))
        except SmokeTestError as failed:
            if event == "publish":
                mark_rejected(config, version, str(failed))
                record(config, "rejected", version, previous, run, reason=str(failed))
            raise
        started = time.monotonic()
        switch(config, client, version)
    except Exception:
        load_engine_steps(config, client, kept)  # unload what this loaded: the served version never changed
        raise
    load_engine_steps(config, client, [version] if engine else [])  # retire the previous version's steps
    seconds = time.monotonic() - started
    log.info("%s version %d is live (was %s) after %.1f s", config.model.name, version, previous, seconds)
    return record(config, event, version, previous, run, switch_seconds=round(seconds, 3))
