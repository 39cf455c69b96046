"""Throughput through Triton with the server-side inference log on against the same model with it off.

One Triton serves two copies of one trained version of the flights model, the same files and
config except the log: one logs every answered row (``serving.log``'s flush bounds from
params.yaml), the other has the ``inference_log`` parameter empty (the baseline). Clients send
the same requests of ``--rows`` rows from ``--concurrency`` processes (raw tritonclient over
HTTP), for ``--seconds`` a model and round, the models taking turns over ``--rounds`` rounds
(so a busy moment of the machine falls on both); rows/s are summed over the rounds and the ratio
logged / not logged printed. Afterwards the log is read back: every row the logged model
answered must be in it.

    .venv/bin/python bench/serving_log.py [--concurrency 8] [--seconds 10] [--rounds 3] [--rows 1] [--quick]

``--quick``: one month of 2,000 flights, one epoch, 2 clients, one round of 2 s; the same real
Triton and code paths, for tests/bench.
"""

from __future__ import annotations

import argparse
import time

_REQUESTS: dict[tuple[str, int], list] = {}  # by (project home, rows): a client process makes its requests once


def _requests(config, rows: int) -> list:
    """Requests of ``rows`` rows each, made of the first 1,000 test rows of ``config``'s project."""
    key = (str(config.home), rows)
    if key not in _REQUESTS:
        import pandas as pd
        from tritonclient import http

        from pipelines.data.split import split_paths
        from pipelines.serving.live import request_inputs

        test = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(1000)
        _REQUESTS[key] = [request_inputs(config.dataset, test.iloc[i : i + rows], http) for i in range(0, len(test) - rows + 1, rows)]
    return _REQUESTS[key]


def client(config, model: str, rows: int, seconds: float) -> tuple[int, int, float]:
    """One client process: requests for ``seconds``; answered rows, failures and the seconds it sent for."""
    from tritonclient import http

    requests = _requests(config, rows)
    answered, failures = 0, 0
    with http.InferenceServerClient(config.serving.triton.url) as triton:
        started = time.monotonic()
        while time.monotonic() < started + seconds:
            try:
                triton.infer(model, requests[(answered // rows + failures) % len(requests)])
            except Exception:  # noqa: BLE001
                failures += 1
                continue
            answered += rows
    return answered, failures, time.monotonic() - started


def load(pool, config, model: str, rows: int, concurrency: int, seconds: float) -> tuple[float, int, int]:
    """``concurrency`` clients in the ``pool``'s processes (the GIL would make threads the
    bottleneck): rows/s over all of them, rows answered, failures."""
    results = list(pool.map(client, *zip(*[(config, model, rows, seconds)] * concurrency)))
    return sum(answered / took for answered, _, took in results), sum(r[0] for r in results), sum(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=None, help="client processes (default 8; --quick: 2)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds of load a model and round (default 10; --quick: 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, the models taking turns (default 3; --quick: 1)")
    parser.add_argument("--rows", type=int, default=1, help="rows a request (default 1)")
    parser.add_argument("--quick", action="store_true", help="small data, short load: a check that the benchmark runs")
    args = parser.parse_args()
    concurrency = args.concurrency or (2 if args.quick else 8)
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    rounds = args.rounds or (1 if args.quick else 3)
    months, landed, max_epochs = (["2013-01"], 2000, 1) if args.quick else (["2013-01", "2013-02"], None, 2)

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from project import QUICK_NOTE, exported_candidate, print_ratio, throwaway_project

    from pipelines.launch.triton import TritonServer
    from pipelines.serving import repository
    from pipelines.serving.client import read_log

    with throwaway_project(months, landed) as config:
        candidate = exported_candidate(config, max_epochs)
        # The same version twice: logging (as published) and not (the baseline).
        files = {"model.onnx": candidate / "model.onnx", **repository.BACKEND_FILES}
        unlogged = config.model_copy(update={"model": config.model.model_copy(update={"name": config.model.name + "_unlogged"})})
        for project in (config, unlogged):
            version = repository.add_version(project.model_dir, files, {"bench": True})
            rendering = repository.model_config(project.model_dir, project.serving, project.dataset, version, logged=project is config)
            repository.write_model_config(project.model_dir, rendering)
        models = {"log off": unlogged.model.name, "log on": config.model.name}
        totals = {name: [0.0, 0, 0] for name in models}  # rows/s summed over rounds, rows, failures
        # spawn, not fork: a fork of this process (torch, threads) can deadlock. One pool for the
        # whole run: the clients start (imports, requests) once, in the warm-up.
        with TritonServer(config), ProcessPoolExecutor(concurrency, mp_context=multiprocessing.get_context("spawn")) as pool:
            warm = {name: load(pool, config, model, args.rows, concurrency, 0.5 if args.quick else 2)[1] for name, model in models.items()}
            for round_ in range(rounds):
                for name in list(models)[:: 1 if round_ % 2 == 0 else -1]:
                    rate, answered, failed = load(pool, config, models[name], args.rows, concurrency, seconds)
                    totals[name] = [totals[name][0] + rate, totals[name][1] + answered, totals[name][2] + failed]
        logged = len(read_log(config.serving, config.served_model))  # the server stopped: every chunk written

    print(f"{args.rows}-row requests, {concurrency} concurrent clients, {rounds} round(s) of {seconds:g} s a model, Python backend + ONNX Runtime on CPU")
    print(f"{'':<10}{'rows/s':>10}{'rows':>10}{'failed':>8}")
    for name, (rate, answered, failed) in totals.items():
        print(f"{name:<10}{rate / rounds:>10.0f}{answered:>10}{failed:>8}")
    answered = warm["log on"] + totals["log on"][1]
    print(f"logged: {logged} rows; answered with the log on: {answered} (warm-up included)")
    if logged != answered:
        raise SystemExit(f"the inference log holds {logged} rows, but the logged model answered {answered}")
    if args.quick:
        print(QUICK_NOTE)
    print_ratio("throughput with the inference log on / off", totals["log on"][0] / totals["log off"][0])


if __name__ == "__main__":
    main()
