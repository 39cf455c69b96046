"""``flywheel up`` supervises what it runs: a Triton that dies is restarted, one that keeps dying
stops ``up`` loudly, and a second ``up`` on the same home is refused naming the first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import tritonclient.http as http

from pipelines.config import load_deployment
from pipelines.launch.triton import TritonServer
from pipelines.launch.up import UpError, only_instance, supervise
from tests.conftest import REPO, free_ports, make_home

pytestmark = pytest.mark.e2e
pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) installs on x86_64 Linux only")


def test_a_triton_that_dies_is_restarted_and_one_that_keeps_dying_stops_up_loudly(tmp_path):
    http_port, grpc_port, metrics_port = free_ports(3)
    triton_ports = {"url": f"127.0.0.1:{http_port}", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    deployment = load_deployment(make_home(tmp_path, {"serving": {"triton": triton_ports}}))
    failures: list[BaseException] = []
    stop = threading.Event()

    def watch() -> None:
        try:
            supervise({"Triton": triton}, restartable={"Triton"}, max_restarts=1, every_s=0.2, stopped=stop.is_set)
        except UpError as error:
            failures.append(error)

    with TritonServer(deployment) as triton:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        first = triton.pid
        os.killpg(first, signal.SIGKILL)  # the fault: Triton dies under a running `up`

        deadline = time.monotonic() + 90
        while triton.pid == first or not _ready(triton.url):
            assert time.monotonic() < deadline and not failures, failures
            time.sleep(0.2)

        time.sleep(1)  # the supervisor's restart has returned (it polls the server every 0.2 s)
        # Dying again within the window is more than max_restarts allows: `up` stops, saying why
        os.killpg(triton.pid, signal.SIGKILL)
        watcher.join(30)
        stop.set()

    assert len(failures) == 1
    assert "Triton exited with code -9 2 times in 10 minutes; stopping everything" in str(failures[0])


def test_a_second_up_on_the_same_home_is_refused_naming_the_running_one(tmp_path):
    folder = tmp_path / ".airflow"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from pipelines.launch.up import only_instance\n"
            "with only_instance(Path(sys.argv[1]), airflow_port=8080, triton='127.0.0.1:8000'):\n"
            "    print('up', flush=True); time.sleep(60)"
        ), str(folder)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "up"
        with pytest.raises(UpError, match=rf"already running on .* \(pid {holder.pid}, airflow_port 8080, triton 127.0.0.1:8000, since .*\); use it, or stop it first"):
            with only_instance(folder, airflow_port=8081, triton="127.0.0.1:9000"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with only_instance(folder, airflow_port=8081, triton="127.0.0.1:9000"):  # the OS let go of the dead one's lock
        pass


def _ready(url: str) -> bool:
    try:
        with http.InferenceServerClient(url) as client:
            return bool(client.is_server_ready())
    except Exception:  # noqa: BLE001 - refused while it starts
        return False
