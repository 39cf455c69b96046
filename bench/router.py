"""Throughput through the rollout router (``pipelines/serving/backend/model.py``) against the
served model alone.

One Triton serves three copies of one trained version of the flights model: ``alone`` (no
rollout: the baseline), ``canary`` (a canary of 20% of request ids to a second version, the
other version of each request run off the request path into the shadow log) and ``shadow``
(the champion answers all, the challenger runs every request off the path). The challenger is a
copy of the same model, so the cost measured is the router's (and its second ONNX Runtime run),
not a difference between models. Clients send the same requests from ``--concurrency``
processes, the models taking turns over ``--rounds`` rounds; rows/s and the ratios routed /
alone are printed. With no rollout the router adds nothing: ``alone`` runs the same code
with no challenger, so ``alone`` is also the router "with shadow off".

    .venv/bin/python bench/router.py [--concurrency 8] [--seconds 10] [--rounds 3] [--rows 1] [--quick]

``--quick``: one month of 2,000 flights, one epoch, 2 clients, one round of 2 s.
"""

from __future__ import annotations

import argparse


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
    from serving_log import load

    from pipelines.launch.triton import TritonServer
    from pipelines.serving import repository
    from pipelines.serving.repository import CANARY, SHADOW, Route

    with throwaway_project(months, landed) as config:
        candidate = exported_candidate(config, max_epochs)
        files = {"model.onnx": candidate / "model.onnx", **repository.BACKEND_FILES}
        routes = {"alone": None, "canary 20%": Route(2, CANARY, 0.2), "shadow": Route(2, SHADOW, 0.0)}
        models = {}
        for name, route in routes.items():
            model_dir = config.model_dir.with_name(f"{config.model.name}_{name.split()[0]}")
            for _ in range(2):  # champion and challenger: the same model twice
                repository.add_version(model_dir, files, {"bench": True})
            repository.write_model_config(model_dir, repository.model_config(model_dir, config.serving, config.dataset, 1, route=route, project=config.name))
            models[name] = model_dir.name
        totals = {name: [0.0, 0, 0] for name in models}  # rows/s summed over rounds, rows, failures
        with TritonServer(config), ProcessPoolExecutor(concurrency, mp_context=multiprocessing.get_context("spawn")) as pool:
            for model in models.values():
                load(pool, config, model, args.rows, concurrency, 0.5 if args.quick else 2)  # warm-up
            for round_ in range(rounds):
                for name in list(models)[:: 1 if round_ % 2 == 0 else -1]:
                    rate, answered, failed = load(pool, config, models[name], args.rows, concurrency, seconds)
                    totals[name] = [totals[name][0] + rate, totals[name][1] + answered, totals[name][2] + failed]

    print(f"{args.rows}-row requests, {concurrency} concurrent clients, {rounds} round(s) of {seconds:g} s a model, Python backend + ONNX Runtime on CPU")
    print(f"{'':<12}{'rows/s':>10}{'rows':>10}{'failed':>8}")
    for name, (rate, answered, failed) in totals.items():
        print(f"{name:<12}{rate / rounds:>10.0f}{answered:>10}{failed:>8}")
    if any(failed for _, _, failed in totals.values()):
        raise SystemExit("requests failed: the router must answer every request")
    if args.quick:
        print(QUICK_NOTE)
    print_ratio("throughput in a canary (20%) / alone", totals["canary 20%"][0] / totals["alone"][0])
    print_ratio("throughput in shadow / alone", totals["shadow"][0] / totals["alone"][0])


if __name__ == "__main__":
    main()
