"""PostgreSQL and Redis on loopback, in throwaway folders, for Airflow on the CeleryExecutor.

The Debian packages `postgresql` and `redis-server` (installed by `make install`) provide the
servers. PostgreSQL refuses to run as root, so when the tests run as root (CI may) its commands
run as the `postgres` user the package creates, or `nobody`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_ports

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DATABASE = "airflow"


def _server_user() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL: None (ourselves) unless we are root."""
    if os.getuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL")


def _run_as(user: pwd.struct_passwd | None, args: list[str], cwd: Path) -> None:
    who = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, **who)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with code {result.returncode}:\n{result.stdout}{result.stderr}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 with an `airflow` database; yields its SQLAlchemy URL."""
    if not (PG_BIN / "pg_ctl").exists():
        pytest.fail(f"PostgreSQL 15 is not installed ({PG_BIN}/pg_ctl missing): run `make install`")
    user = _server_user()
    # Outside pytest's basetemp, which is private to the user running the tests.
    folder = Path(tempfile.mkdtemp(prefix="flywheel-postgres-"))
    if user:
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, (port,) = folder / "data", free_ports(1)
    _run_as(user, [str(PG_BIN / "initdb"), "-D", str(data), "-U", DATABASE, "--auth=trust", "-E", "UTF8"], folder)
    # Loopback TCP only; the Unix socket goes into the throwaway folder, not /var/run/postgresql.
    options = f"-h 127.0.0.1 -p {port} -k {folder}"
    _run_as(user, [str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "postgres.log"), "-w", "start"], folder)
    try:
        _run_as(user, [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DATABASE, DATABASE], folder)
        yield f"postgresql+psycopg2://{DATABASE}@127.0.0.1:{port}/{DATABASE}"
    finally:
        _run_as(user, [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis() -> Iterator[str]:
    """A Redis server on 127.0.0.1 that keeps nothing on disk; yields its URL for Celery."""
    import redis as client

    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: run `make install`")
    folder = Path(tempfile.mkdtemp(prefix="flywheel-redis-"))
    (port,) = free_ports(1)
    args = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(folder)]
    with (folder / "redis.log").open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.Redis.from_url(url).ping()
                break
            except client.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(folder / 'redis.log').read_text()}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
