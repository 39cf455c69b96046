"""Throughput and latency through Triton with dynamic batching against the same model without it.

One Triton serves two copies of one trained version of the flights model: one with dynamic
batching (``serving.max_queue_delay_microseconds`` from params.yaml), one without. Clients
send one-row requests from ``--concurrency`` processes for ``--seconds`` each, first to the
model without batching (the baseline), then to the one with it, and the ratio is printed.

    .venv/bin/python bench/serving_batching.py [--concurrency 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np


def client(url: str, model: str, home: str, seconds: float) -> tuple[list[float], int]:
    """One client process: one-row requests for ``seconds``; latencies and failures."""
    import pandas as pd
    import tritonclient.http as http

    from pipelines.config import load_config
    from pipelines.data.split import split_paths
    from pipelines.serving.live import request_inputs

    config = load_config(home)
    rows = pd.read_parquet(split_paths(config)["test"]).head(1000)
    requests = [request_inputs(config, rows.iloc[i : i + 1], http) for i in range(len(rows))]
    triton = http.InferenceServerClient(url)
    latencies, failures, stop = [], 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        started = time.perf_counter()
        try:
            triton.infer(model, requests[len(latencies) % len(requests)])
        except Exception:  # noqa: BLE001
            failures += 1
            continue
        latencies.append(time.perf_counter() - started)
    return latencies, failures


COUNTERS = ("nv_inference_request_success", "nv_inference_exec_count")


def counters(url: str, model: str) -> np.ndarray:
    """Triton's own counters for a model: requests and model executions."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{url}/metrics").read().decode()
    values = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in values and f'model="{model}"' in line:
            values[name] += float(line.rsplit(" ", 1)[1])
    return np.array([values[name] for name in COUNTERS])


def load(config, metrics_url: str, model: str, concurrency: int, seconds: float) -> dict:
    """``concurrency`` client processes (the GIL would make threads the bottleneck) for ``seconds``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    before = counters(metrics_url, model)
    # spawn, not fork: a fork of this process (torch, gevent, threads) can deadlock
    with ProcessPoolExecutor(concurrency, mp_context=multiprocessing.get_context("spawn")) as pool:
        started = time.monotonic()
        results = list(pool.map(client, *zip(*[(config.serving.triton.url, model, str(config.home), seconds)] * concurrency)))
        elapsed = time.monotonic() - started
    requests, runs = counters(metrics_url, model) - before
    every = np.concatenate([np.array(latencies) for latencies, _ in results]) * 1000
    return {
        "requests/s": len(every) / elapsed,
        "p50 ms": float(np.percentile(every, 50)),
        "p99 ms": float(np.percentile(every, 99)),
        "rows/execution": requests / runs if runs else float("nan"),
        "failed": sum(failures for _, failures in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()

    from project import exported_candidate, throwaway_project

    config = throwaway_project(["2013-01", "2013-02"])
    candidate = exported_candidate(max_epochs=2)

    from pipelines.serving import repository
    from pipelines.serving.triton import TritonServer

    # The same version twice: with dynamic batching (as published) and without (the baseline).
    files = {"model.onnx": candidate / "model.onnx", "model.py": repository.BACKEND_MODEL}
    unbatched = config.model_copy(update={"model": config.model.model_copy(update={"name": config.model.name + "_unbatched"})})
    for project in (config, unbatched):
        version = repository.add_version(project.model_dir, files, {"bench": True})
        rendering = repository.model_config(project, version)
        if project is unbatched:
            rendering.ClearField("dynamic_batching")
        repository.write_model_config(project.model_dir, rendering)
    metrics_url = f"127.0.0.1:{config.serving.triton.metrics_port}"
    with TritonServer(config):
        load(config, metrics_url, unbatched.model.name, args.concurrency, 2)  # warm-up
        baseline = load(config, metrics_url, unbatched.model.name, args.concurrency, args.seconds)
        batched = load(config, metrics_url, config.model.name, args.concurrency, args.seconds)

    print(f"one-row requests, {args.concurrency} concurrent clients, {args.seconds:.0f} s each, Python backend + ONNX Runtime on CPU")
    print(f"{'':<18}{'requests/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'rows/execution':>16}{'failed':>8}")
    for name, result in (("without batching", baseline), ("dynamic batching", batched)):
        print(
            f"{name:<18}{result['requests/s']:>11.0f}{result['p50 ms']:>8.2f}{result['p99 ms']:>8.2f}"
            f"{result['rows/execution']:>16.1f}{result['failed']:>8}"
        )
    print(f"throughput ratio (dynamic batching / without) = {batched['requests/s'] / baseline['requests/s']:.2f}")
    shutil.rmtree(config.home)


if __name__ == "__main__":
    main()
