"""Throughput and latency through Triton with dynamic batching against the same model without it.

One Triton serves two copies of one trained version of the flights model: one with dynamic
batching (``serving.max_queue_delay_microseconds`` from params.yaml), one without. Clients
send one-row requests from ``--concurrency`` processes for ``--seconds`` each, first to the
model without batching (the baseline), then to the one with it, and the ratio is printed.

    .venv/bin/python bench/serving_batching.py [--concurrency 8] [--seconds 20] [--quick]

``--quick``: one month of 2,000 flights, one epoch, 2 clients for 2 s each; the same real
Triton and code paths, for tests/bench.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

_REQUESTS: dict[str, list] = {}  # by project home: a client process makes its requests once


def _requests(config) -> list:
    """One-row requests made of the first 1,000 test rows of ``config``'s project."""
    if str(config.home) in _REQUESTS:
        return _REQUESTS[str(config.home)]
    import pandas as pd
    from tritonclient import http

    from pipelines.data.split import split_paths
    from pipelines.serving.live import request_inputs

    rows = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(1000)
    made = _REQUESTS[str(config.home)] = [request_inputs(config.dataset, rows.iloc[i : i + 1], http) for i in range(len(rows))]
    return made


def client(config, model: str, seconds: float) -> tuple[list[float], int, float]:
    """One client process: one-row requests for ``seconds``; latencies, failures and the
    seconds it sent for (its requests/s is its own, not diluted by process start-up)."""
    from tritonclient import http

    requests = _requests(config)
    triton = http.InferenceServerClient(config.serving.triton.url)
    latencies, failures = [], 0
    started = time.monotonic()
    stop = started + seconds
    while time.monotonic() < stop:
        sent = time.perf_counter()
        try:
            triton.infer(model, requests[len(latencies) % len(requests)])
        except Exception:  # noqa: BLE001
            failures += 1
            continue
        latencies.append(time.perf_counter() - sent)
    return latencies, failures, time.monotonic() - started


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


def load(pool, config, metrics_url: str, model: str, concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients in the ``pool``'s processes (the GIL would make threads the bottleneck) for ``seconds``."""
    before = counters(metrics_url, model)
    results = list(pool.map(client, *zip(*[(config, model, seconds)] * concurrency)))
    requests, runs = counters(metrics_url, model) - before
    every = np.concatenate([np.array(latencies) for latencies, _, _ in results]) * 1000
    return {
        "requests/s": sum(len(latencies) / took for latencies, _, took in results),
        "p50 ms": float(np.percentile(every, 50)) if len(every) else float("nan"),
        "p99 ms": float(np.percentile(every, 99)) if len(every) else float("nan"),
        "rows/execution": requests / runs if runs else float("nan"),
        "failed": sum(failures for _, failures, _ in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=None, help="client processes (default 8; --quick: 2)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds of load a model (default 20; --quick: 2)")
    parser.add_argument("--quick", action="store_true", help="small data, short load: a check that the benchmark runs")
    args = parser.parse_args()
    concurrency = args.concurrency or (2 if args.quick else 8)
    seconds = args.seconds or (2.0 if args.quick else 20.0)
    months, landed, max_epochs = (["2013-01"], 2000, 1) if args.quick else (["2013-01", "2013-02"], None, 2)

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from project import QUICK_NOTE, exported_candidate, print_ratio, throwaway_project

    from pipelines.launch.triton import TritonServer
    from pipelines.serving import repository

    with throwaway_project(months, landed) as config:
        candidate = exported_candidate(config, max_epochs)
        # The same version twice: with dynamic batching (as published) and without (the baseline).
        files = {"model.onnx": candidate / "model.onnx", **repository.BACKEND_FILES}
        unbatched = config.model_copy(update={"model": config.model.model_copy(update={"name": config.model.name + "_unbatched"})})
        for project in (config, unbatched):
            version = repository.add_version(project.model_dir, files, {"bench": True})
            rendering = repository.model_config(project.model_dir, project.serving, project.dataset, version)
            if project is unbatched:
                rendering.ClearField("dynamic_batching")
            repository.write_model_config(project.model_dir, rendering)
        metrics_url = f"127.0.0.1:{config.serving.triton.metrics_port}"
        # spawn, not fork: a fork of this process (torch, gevent, threads) can deadlock. One pool
        # for the whole run: the clients start (imports, requests) once, in the warm-up.
        with TritonServer(config), ProcessPoolExecutor(concurrency, mp_context=multiprocessing.get_context("spawn")) as pool:
            for model in (unbatched.model.name, config.model.name):
                load(pool, config, metrics_url, model, concurrency, 0.5 if args.quick else 2)  # warm-up
            baseline = load(pool, config, metrics_url, unbatched.model.name, concurrency, seconds)
            batched = load(pool, config, metrics_url, config.model.name, concurrency, seconds)

    print(f"one-row requests, {concurrency} concurrent clients, {seconds:g} s each, Python backend + ONNX Runtime on CPU")
    print(f"{'':<18}{'requests/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'rows/execution':>16}{'failed':>8}")
    for name, result in (("without batching", baseline), ("dynamic batching", batched)):
        print(
            f"{name:<18}{result['requests/s']:>11.0f}{result['p50 ms']:>8.2f}{result['p99 ms']:>8.2f}"
            f"{result['rows/execution']:>16.1f}{result['failed']:>8}"
        )
    if args.quick:
        print(QUICK_NOTE)
    print_ratio("throughput with dynamic batching / without", batched["requests/s"] / baseline["requests/s"])


if __name__ == "__main__":
    main()
