"""Where a model came from: code version, content hashes, and the JSON records that carry them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, TypeAlias

PACKAGE_DIR = Path(__file__).resolve().parent
# A JSON-able mapping: a task's result, a lineage record, a report's summary.
Record: TypeAlias = dict[str, Any]


def code_version() -> str:
    """The git commit of the Flywheel code, with ``-dirty`` if it has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def fingerprint(payload: Any) -> str:
    """A stable hash of a JSON-able payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: Path, payload: Any) -> Path:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(partial, path)
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
