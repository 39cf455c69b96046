"""A real Triton Inference Server on one machine, started and stopped by the project.

The ``tritonserver`` binary (Python backend only) ships in the ``nvidia-pytriton``
wheel. Three things make it serve the CPU rendering of a version:

* a backend directory holding the wheel's Python backend plus its stub for Python 3.11;
* ``LD_LIBRARY_PATH`` with this interpreter's own ``libpython`` (the stub otherwise loads
  whatever ``libpython3.11`` the system has) and the wheel's bundled libraries;
* ``PATH`` starting with the backend environment (``make install`` creates it beside the
  venv): the stub's embedded interpreter takes its ``sys.prefix`` from the first ``python3``
  on ``PATH`` and ignores ``PYTHONPATH``. That environment has numpy 1.x, because the stub is
  built against numpy 1's C ABI and reads garbage through numpy 2.

The server runs with ``--model-control-mode=explicit``: nothing is loaded until the project
loads it, so a version goes live only after its smoke test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType

from pipelines.config import Deployment
from pipelines.errors import TritonUnavailable
from pipelines.serving import repository

log = logging.getLogger(__name__)

BACKEND_ENV = Path(sys.prefix) / "triton-python"  # made by `make install`
RUNTIME_DIR = ".triton"  # in the project home: backends, logs
SHARED_MEMORY = re.compile(r"/dev/shm/triton_python_backend_shm_region_\S+")  # a stub's, and its server's


def _bundled() -> Path:
    try:
        import pytriton
    except ImportError:
        raise TritonUnavailable("nvidia-pytriton is not installed: it ships the tritonserver binary (run `make install`)") from None
    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_backends(runtime: Path) -> Path:
    """``<runtime>/backends/python``: the wheel's Python backend with the 3.11 stub beside it."""
    bundled = _bundled()
    python = runtime / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = [*(bundled / "backends" / "python").iterdir(), bundled / "python_backend_stubs" / version / "triton_python_backend_stub"]
    for source in sources:
        # Beside, then renamed: a stub of a server that is still shutting down may be running
        # the old file, which cannot be overwritten in place ("Text file busy").
        partial = python / f".{source.name}.partial"
        shutil.copy2(source, partial)
        os.replace(partial, python / source.name)
    return runtime / "backends"


def server_env() -> dict[str, str]:
    if not (BACKEND_ENV / "bin" / "python3").exists():
        raise TritonUnavailable(f"{BACKEND_ENV}: the Python backend's environment is missing (run `make install`)")
    libs = [sysconfig.get_config_var("LIBDIR"), str(_bundled().parents[1] / "nvidia_pytriton.libs")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
    env["PATH"] = os.pathsep.join([str(BACKEND_ENV / "bin"), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return env


class TritonServer:
    """``tritonserver`` on the project's model repository, loopback ports from ``serving.triton``."""

    def __init__(self, config: Deployment, host: str = "127.0.0.1", exit_timeout_s: int = 30) -> None:
        self.config = config
        # How long a stopping Triton serves the client connections still open, then waits for
        # the models to unload, before it exits regardless (Triton's --exit-timeout-secs).
        self.exit_timeout_s = exit_timeout_s
        self.repository = config.serving.model_repository
        self.runtime = config.home / RUNTIME_DIR
        self.log_file = self.runtime / "tritonserver.log"
        self.host = host
        self.ports = config.serving.triton
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.ports.http_port}"

    @property
    def pid(self) -> int | None:
        """PID of tritonserver (also its process group's id), if started."""
        return self._proc.pid if self._proc else None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        """Start the server, wait until it is ready, then load every model that has a served version."""
        import tritonclient.http as http

        # A server already on a port would answer the readiness check for us, and versions would
        # go live in someone else's Triton: refuse instead.
        for port in (self.ports.http_port, self.ports.grpc_port, self.ports.metrics_port):
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.host, port))
                except OSError as exc:
                    raise TritonUnavailable(
                        f"port {port} on {self.host} is already in use ({exc.strerror}); is another Triton running? "
                        "Stop it, or set serving.triton's ports in projects/defaults.yaml"
                    ) from None
        self.repository.mkdir(parents=True, exist_ok=True)
        command = [
            str(_bundled() / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={prepare_backends(self.runtime)}",
            "--model-control-mode=explicit",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--http-port={self.ports.http_port}",
            f"--grpc-port={self.ports.grpc_port}",
            f"--metrics-port={self.ports.metrics_port}",
            "--allow-metrics=true",
            "--exit-on-error=false",
            # Ready means "up": a version that failed its load must not make the whole server unready.
            "--strict-readiness=false",
            "--log-verbose=0",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            self._proc = subprocess.Popen(command, env=server_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        # Closed after: a connection left open holds up the server's shutdown by 30 s.
        with http.InferenceServerClient(self.url) as client:
            deadline = time.monotonic() + timeout
            while True:
                if self._proc.poll() is not None:
                    raise TritonUnavailable(f"tritonserver exited with code {self._proc.returncode}; see {self.log_file}:\n{self.log_tail()}")
                try:
                    if client.is_server_ready():
                        break
                except Exception:  # noqa: BLE001 - connection refused while it starts
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TritonUnavailable(f"tritonserver not ready on {self.url} after {timeout:.0f} s; see {self.log_file}")
                time.sleep(0.2)
            for model_dir in sorted(self.repository.iterdir()):
                if repository.served_version(model_dir) is not None:
                    client.load_model(model_dir.name)
                    log.info("loaded %s version %s", model_dir.name, repository.served_version(model_dir))
        log.info("Triton ready on %s (gRPC %d, metrics %d)", self.url, self.ports.grpc_port, self.ports.metrics_port)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM to the server's process group, its Python-backend stubs included (whose
        inference logs then write each answered row before answering it: ``backend/model.py``);
        SIGKILL if it has not exited after ``timeout`` seconds (default: its exit timeout + 10)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        timeout = self.exit_timeout_s + 10 if timeout is None else timeout
        os.killpg(proc.pid, signal.SIGTERM)  # Triton drains in-flight requests, then exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # A server that exits at its exit timeout does not unload its models, and a stub caught
        # in a request then hangs without its server: never left running.
        left = kill_group(proc.pid)
        if left:
            log.warning("tritonserver exited leaving %d Python-backend stubs running; killed", left)

    def wait(self) -> int:
        if self._proc is None:
            raise TritonUnavailable("tritonserver is not running")
        return self._proc.wait()

    def poll(self) -> int | None:
        """The exit code of a tritonserver that stopped, None while it runs (``TritonUnavailable`` if never started)."""
        if self._proc is None:
            raise TritonUnavailable("tritonserver is not running")
        return self._proc.poll()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


def group_members(group: int) -> list[int]:
    """The live processes (zombies aside) of process group ``group``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgid = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(pgid) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


def kill_group(group: int, timeout: float = 10) -> int:
    """SIGKILL every process of a tritonserver's process group ``group`` (the server, whose pid
    it is, and its Python-backend stubs), wait until they are gone and remove the shared-memory
    regions they held, which killed stubs leave in /dev/shm. Returns how many it killed."""
    members = group_members(group)
    regions: set[str] = set()
    for pid in members:
        with contextlib.suppress(OSError):
            regions |= set(SHARED_MEMORY.findall(Path(f"/proc/{pid}/maps").read_text()))
    if not members:
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while group_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    for region in regions:
        Path(region).unlink(missing_ok=True)
    return len(members)
