"""The REST side of the local Airflow launcher against a stand-in api-server: the one fault a
real one shows only under load (SQLite's write lock held by the scheduler: "Database error")."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.launch import airflow as launch


@pytest.fixture
def api(tmp_path):
    """An api-server that answers a token, then ``answers`` (HTTP statuses) to PATCH /api/v2/dags/<dag>, in order."""
    seen: list[tuple[str, dict]] = []
    answers: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.reply(201, {"access_token": "t"})

        def do_PATCH(self) -> None:  # noqa: N802
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            status = answers.pop(0)
            self.reply(status, {} if status == 204 else {"reason": "Database error"})  # 204: no DAG to parse, the client returns nothing

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = launch.LocalAirflow(tmp_path / "airflow", tmp_path / "dags", tmp_path / "plugins", port=server.server_address[1])
    local.password_file.parent.mkdir(parents=True)
    local.password_file.write_text(json.dumps({launch.ADMIN_USER: "pw"}))
    yield local, answers, seen
    server.shutdown()


def test_unpause_sends_the_same_patch_again_after_a_database_error(api, monkeypatch):
    local, answers, seen = api
    monkeypatch.setattr(launch, "UNPAUSE_RETRY_S", 0.01)
    answers += [500, 500, 204]

    local.unpause("retrain__flights")

    assert [path for path, _ in seen] == ["/api/v2/dags/retrain__flights"] * 3 and {body["is_paused"] for _, body in seen} == {False}


def test_unpause_gives_up_after_its_attempts_and_a_4xx_at_once(api, monkeypatch):
    local, answers, seen = api
    monkeypatch.setattr(launch, "UNPAUSE_RETRY_S", 0.01)
    answers += [500] * launch.UNPAUSE_ATTEMPTS + [404]

    with pytest.raises(launch.AirflowApiError, match="HTTP 500"):
        local.unpause("retrain__flights")
    with pytest.raises(launch.AirflowApiError, match="HTTP 404"):
        local.unpause("retrain__flights")
    assert len(seen) == launch.UNPAUSE_ATTEMPTS + 1
