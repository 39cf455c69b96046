"""``flywheel up`` runs the MLflow tracking server of ``tracking.uri`` beside Airflow and Triton
(stand-ins here that record what ``up`` does with them; the server's own life cycle is
tests/unit/test_mlflow_server.py's): launched before them, ready before ``up`` says where
everything is, supervised, stopped when ``up`` ends; none when the URI is null, and a busy port
refused before anything starts."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from types import TracebackType

import pytest

from pipelines import cli
from pipelines.launch.mlflow_server import MlflowServer
from tests.conftest import free_ports, make_home


class StandIn:
    """Airflow or Triton as ``cmd_up`` uses them: a context manager that ``supervise`` polls;
    ``events`` records what happened to it, in order with the others'."""

    def __init__(self, name: str, home: Path, events: list[str], interrupt: bool = False) -> None:
        self.name, self.events, self.interrupt = name, events, interrupt
        self.airflow_home, self.url, self.password = home / ".airflow", "127.0.0.1:1", "secret"

    def __enter__(self) -> StandIn:
        self.events.append(f"{self.name} started")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.events.append(f"{self.name} stopped")

    def poll(self) -> int | None:
        self.events.append(f"{self.name} polled")
        if self.interrupt:
            raise KeyboardInterrupt  # Ctrl-C while `up` supervises
        return None

    def start(self, timeout: float = 0) -> None:
        pass

    def log_tail(self, lines: int = 0) -> str:
        return ""


def stand_ins(monkeypatch, home: Path, events: list[str]) -> None:
    """Airflow and Triton replaced by stand-ins, and ``MlflowServer`` by one that records its calls."""

    class RecordedMlflow(MlflowServer):
        def launch(self) -> None:
            events.append("MLflow launched")

        def wait_ready(self, timeout: float = 60) -> None:
            events.append("MLflow ready")

        def poll(self) -> int | None:
            events.append("MLflow polled")
            return None

        def stop(self, timeout: float = 15) -> None:
            events.append("MLflow stopped")

    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setattr("pipelines.launch.airflow.LocalAirflow", lambda *args, **kwargs: StandIn("Airflow", home, events, interrupt=True))
    monkeypatch.setattr("pipelines.launch.triton.TritonServer", lambda *args, **kwargs: StandIn("Triton", home, events))
    monkeypatch.setattr("pipelines.launch.mlflow_server.MlflowServer", RecordedMlflow)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # main's SIGTERM handler: not for the test process


def test_up_runs_the_mlflow_server_beside_airflow_and_triton_and_stops_it_last(monkeypatch, tmp_path, capsys):
    port = 5123
    home = make_home(tmp_path, {"tracking": {"uri": f"http://127.0.0.1:{port}", "ui": f"http://localhost:{port}"}})
    events: list[str] = []
    stand_ins(monkeypatch, home, events)

    cli.cmd_up(argparse.Namespace(port=8080))

    assert events == [
        "MLflow launched",  # first, and waited for last: its start-up runs beside the others'
        "Triton started",
        "Airflow started",
        "MLflow ready",
        "Triton polled",
        "Airflow polled",  # Ctrl-C
        "Airflow stopped",
        "Triton stopped",
        "MLflow stopped",  # last: tasks still running may log to it while Airflow stops
    ]
    printed = capsys.readouterr().out
    assert f"MLflow:  http://localhost:{port} (tracking server http://127.0.0.1:{port}; runs in {home / '.mlflow' / 'mlflow.db'}" in printed
    assert "Restarted if it exits: Triton, MLflow." in printed


def test_up_starts_no_mlflow_server_when_tracking_is_off(monkeypatch, tmp_path, capsys):
    home = make_home(tmp_path)  # tracking.uri null
    events: list[str] = []
    stand_ins(monkeypatch, home, events)

    cli.cmd_up(argparse.Namespace(port=8080))

    assert not [event for event in events if event.startswith("MLflow")]
    printed = capsys.readouterr().out
    assert "MLflow:  off (tracking.uri is null" in printed and "Restarted if it exits: Triton." in printed


def test_up_refuses_a_busy_mlflow_port_in_one_line_before_starting_anything(monkeypatch, tmp_path):
    (port,) = free_ports(1)
    home = make_home(tmp_path, {"tracking": {"uri": f"http://127.0.0.1:{port}"}})
    events: list[str] = []
    stand_ins(monkeypatch, home, events)
    monkeypatch.setattr("pipelines.launch.mlflow_server.MlflowServer", MlflowServer)  # the real one
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()

        with pytest.raises(SystemExit, match=rf"^flywheel up: port {port} on 127.0.0.1 is already in use .* set tracking.uri in projects/defaults.yaml"):
            cli.main(["up"])

    assert events == []
