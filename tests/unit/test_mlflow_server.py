"""The MLflow tracking server ``flywheel up`` and ``make demo`` run (pipelines.launch.mlflow_server):
a real ``mlflow server`` that a client logs to, a browser on localhost can open, that restarts
under ``supervise`` keeping its runs, stops with its whole process group, and refuses a busy
port or a tracking URI it cannot serve before starting anything."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
import uuid
from urllib.parse import urlsplit

import pytest

from pipelines.config import Deployment, TrackingConfig
from pipelines.launch.mlflow_server import MlflowServer, MlflowServerError, local_address
from pipelines.launch.triton import group_members
from pipelines.launch.up import supervise
from tests.conftest import free_ports


def deployment(home, uri: str | None) -> Deployment:
    return Deployment(home=home, tracking=TrackingConfig(uri=uri))


def request(url: str, method: str = "GET", path: str = "/", host: str | None = None, origin: str | None = None, body: dict | None = None) -> tuple[int, str]:
    """(status, body) of one HTTP request to the server at ``url``, with the ``Host`` (default:
    the URL's) and ``Origin`` headers a browser would send."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    headers = {"Host": host or parts.netloc, **({"Origin": origin} if origin else {}), "Content-Type": "application/json"}
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        connection.close()


def test_a_client_logs_a_metric_and_an_artifact_through_the_server(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment(f"server-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    for epoch, loss in enumerate([0.9, 0.6, 0.5]):
        client.log_metric(run.info.run_id, "val_loss", loss, step=epoch)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07onnx bytes")
    client.log_artifact(run.info.run_id, str(model))
    client.set_terminated(run.info.run_id)

    assert request(mlflow_server, path="/health")[0] == 200
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.6), (2, 0.5)]
    # proxied: the client uploaded over HTTP to the server, which keeps the file in its own store
    assert client.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    downloaded = client.download_artifacts(run.info.run_id, "model.onnx", str(tmp_path / "back"))
    assert open(downloaded, "rb").read() == b"\x08\x07onnx bytes"


def test_a_browser_on_localhost_or_127_0_0_1_opens_the_ui_and_its_api_calls_pass(mlflow_server):
    port = urlsplit(mlflow_server).port
    for origin in (f"http://localhost:{port}", f"http://127.0.0.1:{port}"):
        netloc = urlsplit(origin).netloc

        status, page = request(mlflow_server, host=netloc)
        # the UI's own calls: POSTs (runs/search lists an experiment's runs) from its origin
        searched, runs = request(mlflow_server, "POST", "/ajax-api/2.0/mlflow/runs/search", host=netloc, origin=origin, body={"experiment_ids": ["0"]})

        assert status == 200 and page.lower().startswith("<!doctype html>"), (origin, status, page[:200])
        assert searched == 200, (origin, searched, runs)
    # the security middleware is on: another site's page, or a rebinding host name, is refused
    assert request(mlflow_server, "POST", "/ajax-api/2.0/mlflow/runs/search", origin="http://elsewhere.example", body={"experiment_ids": ["0"]})[0] == 403
    assert request(mlflow_server, host="elsewhere.example")[0] == 403


def test_an_mlflow_server_that_dies_is_restarted_with_its_runs_and_stop_ends_its_whole_group(tmp_path):
    from mlflow import MlflowClient

    (port,) = free_ports(1)
    server = MlflowServer(deployment(tmp_path, f"http://localhost:{port}"))
    with server:
        first = server.pid
        assert first is not None and len(group_members(first)) >= 2  # the CLI and its uvicorn
        experiment = MlflowClient(tracking_uri=server.url).create_experiment("kept")

        os.killpg(first, signal.SIGKILL)  # the fault: the server dies under a running `up`
        supervise({"MLflow": server}, restartable={"MLflow"}, every_s=0.1, stopped=lambda: server.pid != first)

        assert server.poll() is None and server.healthy()
        assert MlflowClient(tracking_uri=server.url).get_experiment_by_name("kept").experiment_id == experiment
        second = server.pid
        assert second is not None and len(group_members(second)) >= 2
    assert second is not None and group_members(second) == []
    assert server.pid is None
    assert (tmp_path / ".mlflow" / "mlflow.db").is_file() and "Uvicorn running" in server.log_tail(200)
    with socket.socket() as probe:  # nothing listens on the port any more (its closed connections may linger in TIME_WAIT)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_a_busy_port_is_refused_before_anything_starts(tmp_path):
    (port,) = free_ports(1)
    server = MlflowServer(deployment(tmp_path, f"http://127.0.0.1:{port}"))
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()

        started = time.monotonic()
        with pytest.raises(MlflowServerError, match=rf"port {port} on 127.0.0.1 is already in use .*another MLflow server .* set tracking.uri in projects/defaults.yaml"):
            server.start()

    assert time.monotonic() - started < 1 and server.pid is None
    assert not (tmp_path / ".mlflow").exists()


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://127.0.0.1:5000", "its scheme is 'https', not 'http'"),
        ("http://mlflow:5000", "its host 'mlflow' is not this machine's loopback"),
        ("http://10.0.0.5:5000", "its host '10.0.0.5' is not this machine's loopback"),
        ("http://127.0.0.1", "it names no port"),
        ("http://127.0.0.1:5000/mlflow", "it has a path, query or fragment"),
        ("http://127.0.0.1:99999", "is not a URL"),
    ],
)
def test_a_tracking_uri_it_cannot_serve_is_refused_with_the_reason(tmp_path, uri, reason):
    with pytest.raises(MlflowServerError, match=rf"tracking.uri '{uri}' .*{reason}"):
        MlflowServer(deployment(tmp_path, uri))


def test_no_tracking_uri_means_no_server(tmp_path):
    with pytest.raises(MlflowServerError, match="tracking.uri is null"):
        MlflowServer(deployment(tmp_path, None))


def test_a_loopback_uri_gives_the_address_to_bind():
    assert local_address("http://127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert local_address("http://localhost:5001/") == ("127.0.0.1", 5001)
    assert local_address("http://[::1]:5002") == ("::1", 5002)
