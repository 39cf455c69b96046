"""Every benchmark in ``bench/`` still runs: each script, as a user runs it
(``python bench/<script>.py --quick``), exits 0 and prints its ratio against the baseline it
measured in the same run, a finite positive number. The figures themselves are not checked:
``--quick`` data is too small for them to mean anything.

A script is a benchmark when it is a ``bench/*.py`` that runs as ``__main__`` (``project.py``,
the shared helper, does not), so a new benchmark is covered without editing this file.
Benchmarks that start Triton (through ``pipelines.launch.triton.TritonServer``, for real) are
skipped where the ``nvidia-pytriton`` wheel, which ships ``tritonserver``, is not installed.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
NEEDS_TRITON = {"nightly_rerun.py", "serving_batching.py", "serving_log.py"}
# What bench/project.py's print_ratio writes: "ratio: <what> = <number>".
RATIO = re.compile(r"^ratio: (?P<what>.+) = (?P<value>\S+)$", re.MULTILINE)
TIMEOUT_S = 300  # each takes well under a minute on 2 idle cores; this is for a loaded CI machine

pytestmark = pytest.mark.bench


def test_every_benchmark_is_covered():
    assert {"drift_check.py", "feedback_join.py", "history_scale.py", "nightly_rerun.py", "onnx_runtime.py", "search.py", "serving_batching.py", "serving_log.py"} <= set(SCRIPTS)
    assert NEEDS_TRITON <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_runs_quick_and_prints_its_ratio(script, tmp_path):
    if script in NEEDS_TRITON and importlib.util.find_spec("pytriton") is None:
        pytest.skip("starts a real tritonserver, which ships in the nvidia-pytriton wheel (x86_64 Linux only), not installed here")
    # The checkout under test first on the path, for the script and the processes it starts (DVC's stage, clients).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"],
        cwd=tmp_path,  # nothing may depend on the working directory (task results name paths relative to the project home)
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    took = time.monotonic() - started
    output = done.stdout + done.stderr

    assert done.returncode == 0, f"bench/{script} --quick exited {done.returncode} after {took:.0f} s:\n{output[-6000:]}"
    ratios = {m["what"]: m["value"] for m in RATIO.finditer(done.stdout)}
    assert ratios, f"bench/{script} --quick printed no 'ratio: <what> = <number>' line:\n{done.stdout[-3000:]}"
    for what, value in ratios.items():
        number = float(value)  # a ValueError names the value that is not a number
        assert math.isfinite(number) and number > 0, f"bench/{script}: ratio {what} = {value}"
    print(f"bench/{script} --quick: {took:.1f} s; " + "; ".join(f"{w} = {v}" for w, v in ratios.items()))
