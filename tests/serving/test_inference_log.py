"""Triton logs every row it answers, whatever the client (a real Triton, the tritonserver bundled
in nvidia-pytriton): raw tritonclient over HTTP and gRPC and curl are logged with their keys, a
clean shutdown under load loses nothing, a crash loses at most what the buffer held, and the
smoke test of a new version is not logged.

One Triton serves the module; the log flushes every 0.2 s here, so a test reads it at once.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.artifacts import LABEL_OUTPUT, MODEL_FILE, OUTPUT, REQUEST_ID
from pipelines.config import FeatureType
from pipelines.data.split import split_paths
from pipelines.data.versioning import version_split
from pipelines.evaluation.gate import evaluate
from pipelines.export.onnx import export, onnx_outputs
from pipelines.launch.triton import TritonServer, kill_group
from pipelines.serving import live, repository
from pipelines.serving.backend.inference_log import STANDARD
from pipelines.serving.client import log_columns, log_dir, read_log
from pipelines.serving.publish import publish
from pipelines.training.train import train
from tests.conftest import free_ports, make_project
from tests.unit.test_split import write_raw

pytestmark = pytest.mark.e2e
pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) installs on x86_64 Linux only")

FLUSH_SECONDS = 0.2
EXIT_TIMEOUT_S = 3  # how long a stopping Triton keeps serving open connections (Triton's default: 30)
UUID_HEX = re.compile(r"^[0-9a-f]{32}$")


def run(run_id: str) -> dict:
    return {"dag_id": "retrain", "run_id": run_id, "run_type": "manual", "logical_date": None}


def wait_logged(config, keys: set[str], timeout: float = 15) -> pd.DataFrame:
    """The logged rows of ``keys``, once every one of them is in the log (``AssertionError`` after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        logged = read_log(config.serving, config.served_model)
        rows = logged[logged[REQUEST_ID].isin(keys)] if len(logged) else logged
        if len(rows) and keys <= set(rows[REQUEST_ID]):
            return rows.set_index(REQUEST_ID)
        assert time.monotonic() < deadline, f"{len(keys - set(rows[REQUEST_ID] if len(rows) else []))} of {len(keys)} keys not logged after {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A project serving version 1 of a trained candidate in a Triton (0.2 s log flushes)."""
    http, grpc, metrics = free_ports(3)
    triton = {"url": f"127.0.0.1:{http}", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
    config = make_project(tmp_path_factory.mktemp("inference-log"), {"serving": {"triton": triton, "log": {"flush_rows": 1000, "flush_seconds": FLUSH_SECONDS}}})
    write_raw(config, "2013-01", "2013-02", rows=3000)
    data_version = version_split(config)["data_version"]
    candidate = train(config, data_version)["candidate"]
    export(config, candidate)
    rows = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(20)
    server = TritonServer(config, exit_timeout_s=EXIT_TIMEOUT_S)
    server.start()
    try:
        assert publish(config, candidate, evaluate(config, candidate), data_version, run("night1"))["served_version"] == 1
        yield config, data_version, candidate, rows, server
    finally:
        server.stop()


def test_raw_tritonclient_and_curl_requests_are_logged_with_their_keys(served):
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    config, _, _, rows, _ = served
    model = config.model.name
    http_client = http.InferenceServerClient(config.serving.triton.url)
    grpc_client = grpc.InferenceServerClient(f"127.0.0.1:{config.serving.triton.grpc_port}")
    started = pd.Timestamp.now(tz="UTC")

    # Given requests from every kind of client, with an id and without
    answers = {
        "http-1": http_client.infer(model, live.request_inputs(config.dataset, rows.head(1), http), request_id="http-1"),
        "http-none": http_client.infer(model, live.request_inputs(config.dataset, rows.iloc[1:2], http)),
        "grpc-3": grpc_client.infer(model, live.request_inputs(config.dataset, rows.iloc[2:5], grpc), request_id="grpc-3"),
        "grpc-none": grpc_client.infer(model, live.request_inputs(config.dataset, rows.iloc[5:6], grpc)),
    }
    keys = {name: [key.decode() for key in answer.as_numpy(REQUEST_ID)[:, 0]] for name, answer in answers.items()}
    curl = curl_infer(config, rows.iloc[6:7], "curl-1")
    # and one request that is answered with an error (not UTF-8): nothing of it is logged
    bad = live.request_inputs(config.dataset, rows.head(1), http)
    next(i for i in bad if i.name() == "dest").set_data_from_numpy(np.array([[b"MI\xc1"]], dtype=object))
    with pytest.raises(InferenceServerException, match="not UTF-8"):
        http_client.infer(model, bad, request_id="bad-1")

    # Then each is answered its rows' keys: the client's id, <id>/<i> for several rows, or one the server made
    assert keys["http-1"] == ["http-1"] and keys["grpc-3"] == ["grpc-3/0", "grpc-3/1", "grpc-3/2"]
    assert UUID_HEX.match(keys["http-none"][0]) and UUID_HEX.match(keys["grpc-none"][0]) and keys["http-none"] != keys["grpc-none"]
    assert curl["id"] == "curl-1" and next(o["data"] for o in curl["outputs"] if o["name"] == REQUEST_ID) == ["curl-1"]
    # and every answered row is logged under its key, with what was sent and answered
    sent = rows.head(7).reset_index(drop=True)
    order = [*keys["http-1"], *keys["http-none"], *keys["grpc-3"], *keys["grpc-none"], "curl-1"]
    logged = wait_logged(config, set(order)).loc[order]
    expected = onnx_outputs(config.model_dir / "1" / MODEL_FILE, sent)
    np.testing.assert_allclose(logged[OUTPUT], expected[OUTPUT], atol=1e-6)
    np.testing.assert_array_equal(logged[LABEL_OUTPUT].astype(int), expected[LABEL_OUTPUT])
    np.testing.assert_array_equal(logged["dest"], sent["dest"].astype(str))
    np.testing.assert_allclose(logged["distance"], sent["distance"].astype("float32"))
    assert set(logged["model"]) == {model} and set(logged["model_version"]) == {1}
    assert logged["served_at"].between(started, pd.Timestamp.now(tz="UTC")).all() and (logged["latency_ms"] > 0).all()
    assert not read_log(config.serving, model)[REQUEST_ID].str.startswith("bad-1").any()
    http_client.close()
    grpc_client.close()
    # in the server's schema, the one the project writes too (pipelines.serving.client.log_columns)
    chunk = next(log_dir(config.serving, model).rglob("part-*.parquet"))
    assert dict(zip(pq.read_schema(chunk).names, pq.read_schema(chunk).types)) == {**log_columns(config), **STANDARD}


def curl_infer(config, rows: pd.DataFrame, request_id: str) -> dict:
    """Triton's answer to ``curl`` posting ``rows`` as JSON (KServe v2), with ``"id"``."""
    categorical = {f.name for f in config.dataset.features if f.type == FeatureType.categorical}
    inputs = [
        {"name": f.name, "shape": [len(rows), 1], "datatype": "BYTES" if f.name in categorical else "FP32", "data": rows[f.name].astype(str if f.name in categorical else float).tolist()}
        for f in config.dataset.features
    ]
    url = f"http://{config.serving.triton.url}/v2/models/{config.model.name}/infer"
    body = json.dumps({"id": request_id, "inputs": inputs})
    done = subprocess.run(["curl", "-sS", "--fail-with-body", "-H", "Content-Type: application/json", "-d", body, url], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_the_smoke_test_of_a_new_version_is_not_logged(served):
    config, data_version, candidate, rows, _ = served
    before = read_log(config.serving, config.served_model)
    forced = evaluate(config, candidate, force_publish=True, force_reason="test: a second version")

    result = publish(config, candidate, forced, data_version, run("night2"))

    assert result["served_version"] == 2
    time.sleep(5 * FLUSH_SECONDS)  # what the smoke test's 64 rows would have been flushed by
    assert [p.name for p in config.serving.inference_log.iterdir()] == [config.served_model]  # no <model>__smoke log
    assert len(read_log(config.serving, config.served_model)) == len(before)
    # and the new version logs what it serves
    answered = live.answer(live.connect(config.serving.triton), config.model.name, config.dataset, rows.head(2), request_id="after-smoke")
    assert answered.version == 2 and answered.request_ids == ["after-smoke/0", "after-smoke/1"]
    assert set(wait_logged(config, set(answered.request_ids))["model_version"]) == {2}


class Senders:
    """``threads`` clients sending one-row requests with ids ``<prefix><thread>-<i>`` over HTTP
    until one fails (the server went away); the keys of the answered ones."""

    def __init__(self, config, rows: pd.DataFrame, prefix: str, threads: int = 4) -> None:
        self.config, self.rows, self.prefix = config, rows, prefix
        self.answered: list[str] = []
        self.threads = [threading.Thread(target=self.send, args=(t,), daemon=True) for t in range(threads)]
        for thread in self.threads:
            thread.start()

    def send(self, thread: int) -> None:
        import tritonclient.http as http

        client = http.InferenceServerClient(self.config.serving.triton.url)
        for i in range(1_000_000):
            row = self.rows.iloc[i % len(self.rows) : i % len(self.rows) + 1]
            try:
                answer = client.infer(self.config.model.name, live.request_inputs(self.config.dataset, row, http), request_id=f"{self.prefix}{thread}-{i}")
            except Exception:  # noqa: BLE001 - refused or cut: the server is going
                return
            self.answered.append(answer.as_numpy(REQUEST_ID)[0, 0].decode())

    def join(self) -> list[str]:
        for thread in self.threads:
            thread.join(60)
        return self.answered


def test_a_sigterm_under_load_loses_none_of_the_answered_requests(served):
    """Triton stopped as ``TritonServer.stop`` does (SIGTERM to its process group) while clients
    keep sending on their open connections: Triton serves them until its exit timeout, then exits
    without unloading the model (no ``finalize``). The stubs got the SIGTERM too, so from then on
    the log writes each row before it is answered: every answered request is in the log, once."""
    config, _, _, rows, server = served
    senders = Senders(config, rows, "term-")
    while len(senders.answered) < 200:
        time.sleep(0.01)

    server.stop()  # SIGTERM to tritonserver's process group, as TritonServer.stop does
    answered = senders.join()

    logged = read_log(config.serving, config.served_model)
    counts = logged.loc[logged[REQUEST_ID].str.startswith("term-"), REQUEST_ID].value_counts()
    assert len(answered) >= 200 and set(answered) <= set(counts.index) and counts.max() == 1
    # beyond them, at most one request a client: answered by the model as Triton cut its connection
    assert len(counts) - len(answered) <= len(senders.threads)
    server.start()  # for the next test: it serves version 2 again from config.pbtxt


def test_a_sigkill_loses_at_most_the_rows_the_buffer_held(served):
    """A crash (SIGKILL of Triton and its Python-backend stubs) loses the rows the log had not yet
    written: fewer than ``serving.log.flush_rows`` buffered ones, plus a chunk being written at the
    moment of the crash (none here: the test waits for answers, not for a write). With
    flush_rows 100 and flush_seconds an hour, 250 one-row requests leave two chunks of 100
    written and 50 rows in the buffer, which the crash loses."""
    config, _, _, rows, server = served
    flush_rows = 100
    patient = config.model_copy(update={"serving": config.serving.model_copy(update={"log": config.serving.log.model_copy(update={"flush_rows": flush_rows, "flush_seconds": 3600.0})})})
    client = live.connect(config.serving.triton)
    live.switch(patient, client, repository.served_version(config.model_dir))  # reloaded with these bounds
    answered = [live.answer(client, config.model.name, config.dataset, rows.iloc[i % 20 : i % 20 + 1], request_id=f"kill-{i}").request_ids[0] for i in range(250)]
    client.close()

    kill_group(server.pid)  # SIGKILL to tritonserver and its stubs (their shared memory removed after)
    server.wait()

    logged = read_log(config.serving, config.served_model)
    ours = logged[logged[REQUEST_ID].str.startswith("kill-")]
    lost = len(answered) - len(ours)
    assert lost < flush_rows, f"a crash lost {lost} rows, more than the {flush_rows} the buffer holds at most"
    assert sorted(ours[REQUEST_ID], key=lambda k: int(k.split("-")[1])) == answered[:200]  # the two chunks written; the 50 buffered rows lost
