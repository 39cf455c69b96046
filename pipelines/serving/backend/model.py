"""Triton Python-backend model: one version's ``model.onnx`` run by ONNX Runtime.

The CPU rendering of a version (``serving.profile: cpu``): Triton's embedded server on a
machine without the ONNX Runtime backend serves the very file that the GPU rendering serves
with ``platform: onnxruntime_onnx``. Copied next to ``model.onnx`` in every version folder.
It answers every output its ``config.pbtxt`` names (strings included), as that backend does.
It runs in the backend's own environment (numpy 1, ONNX Runtime, pyarrow; see
``pipelines/launch/triton.py``), not in the project's.

Where its config declares the output ``request_id``, each request's rows are answered their
keys (``inference_log.request_keys``: the request's id, or one made here; ``<id>/<i>`` for row i
of several). Where its config's parameter ``inference_log`` names a folder, every answered row
is logged there (``inference_log.py``, copied beside it): inputs, outputs, key, version, time,
latency; flushed on ``inference_log_flush_rows`` rows or ``inference_log_flush_seconds``, and in
``finalize`` (Triton calls it at unload and at a clean shutdown). A request answered with an
error is not logged.

**The router.** During a rollout the served (champion) version's config names a challenger
version and a mode in its parameters (``rollout_challenger``, ``rollout_mode``,
``rollout_share``; ``pipelines.serving.repository.Route``), and this model loads the
challenger's ``model.onnx`` from its version folder beside its own. ``shadow``: the champion
answers every request; ``canary``: a request whose id hashes below the share is answered by the
challenger (sticky: the same id, the same version). Either way the version that did not answer
runs the same rows after the answers are sent, on a thread of its own, and its rows go to the
shadow log (the log's folder name + ``__shadow``): every request of a rollout has both versions'
answers, for the rollout's paired test. The answering version is an output (``model_version``)
and a column of the log. Requests, failures and the p99 latency of the last minute per version
go to Triton's metrics endpoint (``flywheel_router_*``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import triton_python_backend_utils as pb_utils

if TYPE_CHECKING:  # the project's copy, to type-check against
    from pipelines.serving.backend.inference_log import MODEL_VERSION, REQUEST_ID, SHADOW_SUFFIX, InferenceLogWriter, from_config, request_keys, tensor_columns
else:  # beside this file in the version folder, which the Python backend puts on sys.path
    from inference_log import MODEL_VERSION, REQUEST_ID, SHADOW_SUFFIX, InferenceLogWriter, from_config, request_keys, tensor_columns

MODEL_FILE = "model.onnx"
# A tabular version's outputs; every chunk of its log has the label column (blank for a version without).
PREDICTION, LABEL = "prediction", "label"
Columns = dict[str, np.ndarray[Any, Any]]  # name -> one value a row, shape (rows, ...)
CHAMPION, CHALLENGER = "champion", "challenger"
MIRROR_BACKLOG = 64  # batches waiting for the version that did not answer; beyond, mirroring skips (counted)
LATENCY_WINDOW_S = 60.0  # the p99 gauge covers this many seconds of answered requests
log = logging.getLogger("flywheel.router")


class Version(NamedTuple):
    """A version this model runs: the champion it serves, or a rollout's challenger."""

    number: int
    role: str  # CHAMPION | CHALLENGER
    session: ort.InferenceSession


class Run(NamedTuple):
    """One ONNX Runtime call of one version for the rows of several requests."""

    version: Version
    requests: list[int]  # their places in execute's list
    sizes: list[int]  # their rows
    inputs: Columns  # every request's rows, in order
    outputs: Columns


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        parameters = {name: value["string_value"] for name, value in config.get("parameters", {}).items()}
        self.champion = Version(int(args["model_version"]), CHAMPION, _session(folder / MODEL_FILE))
        self.inputs = {i.name: i.type for i in self.champion.session.get_inputs()}
        declared = [output["name"] for output in config["output"]]
        self.outputs = [name for name in declared if name not in (REQUEST_ID, MODEL_VERSION)]
        self.answers_keys, self.answers_version = REQUEST_ID in declared, MODEL_VERSION in declared
        self.log = _writer(config, args["model_name"])
        # a rollout in progress: the challenger, how it meets traffic, and where its mirror rows go
        self.challenger: Version | None = None
        self.mode, self.share = parameters.get("rollout_mode", ""), float(parameters.get("rollout_share") or 0)
        if parameters.get("rollout_challenger"):
            number = int(parameters["rollout_challenger"])
            self.challenger = Version(number, CHALLENGER, _session(folder.parent / str(number) / MODEL_FILE))
            self.shadow_log = _writer(config, args["model_name"], SHADOW_SUFFIX)
            self.mirror = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-mirror")
            self.backlog, self.skipped = 0, 0
            self.backlog_lock = threading.Lock()
        # a served model's (its config names its project); none for a smoke test's throwaway copy
        served = [v for v in (self.champion, self.challenger) if v is not None]
        self.metrics = _Metrics(args["model_name"], parameters["flywheel_project"], served) if parameters.get("flywheel_project") else None

    def finalize(self) -> None:
        """Finish mirroring and write what the logs still buffer: Triton calls this at unload and
        at a clean shutdown."""
        if self.challenger is not None:
            self.mirror.shutdown(wait=True)
            if self.shadow_log is not None:
                self.shadow_log.close()
        if self.log is not None:
            self.log.close()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        # The dynamic batcher hands over several requests at once: one ONNX Runtime call per
        # version for all it answers. What one request holds never fails another: an unreadable
        # request is answered with its own error, and a batch ONNX Runtime refuses is run again
        # one request at a time.
        started = time.perf_counter()
        feeds = [self.read(request) for request in requests]
        keys = [np.array(request_keys(request.request_id(), _rows(feed) if not isinstance(feed, str) else 1), dtype=object) for request, feed in zip(requests, feeds)]
        routed = [self.route(request.request_id() or key[0]) for request, key in zip(requests, keys)]
        errors = {i: feed for i, feed in enumerate(feeds) if isinstance(feed, str)}
        runs: list[Run] = []
        for version in {v.number: v for v in routed}.values():
            readable = {i: feed for i, feed in enumerate(feeds) if not isinstance(feed, str) and routed[i] is version}
            runs += self.run_each(version, readable, errors) if readable else []
        answers: dict[int, list[pb_utils.Tensor]] = {}
        for run in runs:
            self.answer(run, keys, answers)
        responses = [pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[i])) if i in errors else pb_utils.InferenceResponse(answers[i]) for i in range(len(requests))]
        latency_ms = (time.perf_counter() - started) * 1000
        served_at = time.time()
        for run in runs:
            if self.log is not None:
                self.log.append({**run.inputs, **run.outputs}, np.concatenate([keys[i] for i in run.requests]), run.version.number, served_at, latency_ms)
            if self.challenger is not None:
                self.mirror_run(run, np.concatenate([keys[i] for i in run.requests]), served_at)
        if self.metrics is not None:
            self.metrics.count(routed, errors, latency_ms)
        return responses

    def route(self, key: str) -> Version:
        """The version that answers the request with this key: the champion, or in a canary the
        challenger for a share of keys (a hash of the key, so the same key gets the same one)."""
        if self.challenger is None or self.mode != "canary":
            return self.champion
        bucket = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2**64
        return self.challenger if bucket < self.share else self.champion

    def run_each(self, version: Version, feeds: dict[int, Columns], errors: dict[int, str]) -> list[Run]:
        """``version`` run on the requests ``feeds`` holds: one call, or one a request if the batch
        fails (each failing request's error into ``errors``)."""
        try:
            return [self.run(version, feeds)]
        except Exception:  # noqa: BLE001 - which request broke the batch is found by running each alone
            runs = []
            for i, feed in feeds.items():
                try:
                    runs.append(self.run(version, {i: feed}))
                except Exception as exc:  # noqa: BLE001 - any ONNX Runtime failure is answered, not raised into the stub
                    errors[i] = f"ONNX Runtime failed on this request's {_rows(feed)} rows (version {version.number}): {exc}"
            return runs

    def mirror_run(self, run: Run, keys: np.ndarray[Any, Any], served_at: float) -> None:
        """Run the version that did not answer on the same rows, off the request path, into the
        shadow log; skipped (and counted) while ``MIRROR_BACKLOG`` batches already wait."""
        other = self.challenger if run.version is self.champion else self.champion
        assert other is not None
        with self.backlog_lock:
            if self.backlog >= MIRROR_BACKLOG:
                self.skipped += run.inputs[next(iter(run.inputs))].shape[0]
                if self.skipped % 1000 < 100:
                    log.warning("router: the shadow run is behind; %d rows not mirrored so far", self.skipped)
                return
            self.backlog += 1

        def mirror() -> None:
            try:
                outputs = dict(zip(self.outputs, other.session.run(self.outputs, run.inputs)))
                if self.shadow_log is not None:
                    self.shadow_log.append({**run.inputs, **outputs}, keys, other.number, served_at)
            except Exception:  # noqa: BLE001 - a failing shadow never touches the answers
                log.exception("router: version %d failed on mirrored rows", other.number)
            finally:
                with self.backlog_lock:
                    self.backlog -= 1

        self.mirror.submit(mirror)

    def read(self, request: pb_utils.InferenceRequest) -> Columns | str:
        """The request's inputs as ONNX Runtime takes them, or why they cannot be read."""
        feed = {}
        for name, kind in self.inputs.items():
            value = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            if kind == "tensor(string)":
                try:
                    value = np.char.decode(value.astype(np.bytes_), "utf-8").astype(object)
                except UnicodeDecodeError:
                    return _not_utf8(name, value)
            feed[name] = value
        return feed

    def run(self, version: Version, feeds: dict[int, Columns]) -> Run:
        """One ONNX Runtime call of ``version`` for the rows of the requests ``feeds`` holds (by their places)."""
        inputs = {name: np.concatenate([feed[name] for feed in feeds.values()]) for name in self.inputs}
        outputs = dict(zip(self.outputs, version.session.run(self.outputs, inputs)))
        return Run(version, list(feeds), [_rows(feed) for feed in feeds.values()], inputs, outputs)

    def answer(self, run: Run, keys: list[np.ndarray[Any, Any]], answers: dict[int, list[pb_utils.Tensor]]) -> None:
        """Each request's rows of ``run`` as its answer's tensors, into ``answers``: the outputs,
        and where declared the rows' keys and the answering version."""
        start = 0
        for i, rows in zip(run.requests, run.sizes):
            answers[i] = [pb_utils.Tensor(name, value[start : start + rows]) for name, value in run.outputs.items()]
            if self.answers_keys:
                answers[i].append(pb_utils.Tensor(REQUEST_ID, keys[i].reshape(-1, 1)))
            if self.answers_version:
                answers[i].append(pb_utils.Tensor(MODEL_VERSION, np.full((rows, 1), run.version.number, dtype=np.int32)))
            start += rows


def _rows(feed: Columns) -> int:
    return len(next(iter(feed.values())))


def _session(model_file: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("FLYWHEEL_ORT_THREADS", "1"))
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def _writer(config: dict[str, Any], model: str, suffix: str = "") -> InferenceLogWriter | None:
    """The log writer the config asks for (``inference_log.from_config``): a column for every input
    and output, and a tabular version's ``label`` even where it answers none (blank)."""
    columns = tensor_columns([tensor for tensor in (*config["input"], *config["output"]) if tensor["name"] not in (REQUEST_ID, MODEL_VERSION)])
    if PREDICTION in columns:
        columns.setdefault(LABEL, pa.int32())
    return from_config(config, model, columns, suffix)


class _Metrics:
    """Requests, failures and the p99 latency of the last ``LATENCY_WINDOW_S`` seconds per version
    and role, on Triton's metrics endpoint (the Python backend's custom metrics); without that API,
    none (logged once)."""

    def __init__(self, model: str, project: str, versions: list[Version]) -> None:
        self.labels = {"project": project, "model": model}
        self.latencies: dict[tuple[int, str], deque[tuple[float, float]]] = {}
        self.published = 0.0
        try:
            kinds = pb_utils.MetricFamily
            self.requests = kinds("flywheel_router_requests_total", "Requests answered, by the version that answered and its role.", kinds.COUNTER)
            self.failures = kinds("flywheel_router_failures_total", "Requests answered with an error, by the version they were routed to.", kinds.COUNTER)
            self.p99 = kinds("flywheel_router_latency_p99_ms", f"p99 of the last {LATENCY_WINDOW_S:.0f} s of answered requests' latency, ms.", kinds.GAUGE)
            self.enabled = True
        except Exception as exc:  # noqa: BLE001 - an older Triton: serve without the metrics
            log.warning("router: no custom metrics in this Triton (%s); flywheel_router_* are not exported", exc)
            self.enabled = False
        self.series: dict[tuple[str, int, str], Any] = {}
        # Every count exported from 0 at load: Prometheus's increase() cannot see the first
        # failures of a series that appears only with them.
        for version in versions if self.enabled else []:
            self.metric(self.requests, "requests", version)
            self.metric(self.failures, "failures", version)

    def metric(self, family: Any, name: str, version: Version) -> Any:
        key = (name, version.number, version.role)
        if key not in self.series:
            self.series[key] = family.Metric(labels={**self.labels, "version": str(version.number), "role": version.role})
        return self.series[key]

    def count(self, routed: list[Version], errors: dict[int, str], latency_ms: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        for i, version in enumerate(routed):
            self.metric(self.requests, "requests", version).increment(1)
            if i in errors:
                self.metric(self.failures, "failures", version).increment(1)
            else:
                self.latencies.setdefault((version.number, version.role), deque(maxlen=100_000)).append((now, latency_ms))
        if now - self.published < 1.0:  # a percentile a second is plenty for a 60 s window
            return
        self.published = now
        for version in {v.number: v for v in routed}.values():
            recent = self.latencies.get((version.number, version.role), deque())
            while recent and recent[0][0] < now - LATENCY_WINDOW_S:
                recent.popleft()
            if recent:
                self.metric(self.p99, "p99", version).set(float(np.percentile([ms for _, ms in recent], 99)))


def _not_utf8(name: str, values: np.ndarray[Any, Any]) -> str:
    """The error for input ``name``: which row is not UTF-8, and its bytes."""
    for row, value in enumerate(values.reshape(-1)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"row {row} of input {name!r} is not UTF-8 ({exc.reason} at byte {exc.start} of {bytes(value)!r}); send UTF-8 strings"
    return f"input {name!r} is not UTF-8; send UTF-8 strings"
