"""Search efficiency and tracking overhead, on the flights project.

1. **Search.** The best validation loss after ``--trials`` trials of tune__flights's search
   (Optuna's TPE sampler with the median pruner, ``pipelines.tuning``) against as many trials of
   random search (Optuna's RandomSampler, no pruning), same space (``tune.space`` of
   projects/flights/params.yaml), same seed, same data, same epochs a trial. Both studies start
   with params.yaml's own settings as trial 0, as every tune run does; TPE's first 10 trials
   are its random start-up (Optuna's default ``n_startup_trials``), drawn as random search draws
   them with the same seed, so the two differ from trial 11 on. Printed: best val_loss
   after each trial count, pruned trials, wall seconds per trial.
   Then the gate's metric on the test split of a candidate trained with the best trial's
   settings (what ``propose`` sends to retrain) against one trained with params.yaml's.
2. **Tracking overhead.** Seconds per epoch of the same training (seeded, ``--epochs``) with
   tracking off and logging to a real MLflow tracking server started here (the per-epoch
   curves; the run's params and summary are logged outside the timed fit), in alternating
   rounds after one warm-up fit. Two fits differ by more than tracking costs, so the ratio
   printed is (untracked epoch + the median time of an epoch's logging call) / untracked epoch,
   the call timed on its own against the same server.

    .venv/bin/python bench/search.py [--months 2013-01 2013-02 2013-03] [--trials 20] [--epochs 4] [--rounds 3] [--quick]

``--quick``: one month of 2,000 flights, 3 trials a search, 1 epoch, 1 round, for tests/bench.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.project import QUICK_NOTE, print_ratio, throwaway_project  # noqa: E402


def search(config, sampler_name: str, trials: int, epochs: int) -> dict:
    """One study of ``trials`` trials through tune's own objective; its best value, pruned count, seconds a trial."""
    import optuna

    from pipelines.tuning import _storage, best, check, trial_objective

    run = {"dag_id": "bench", "run_id": f"bench-{sampler_name}"}
    checked = check(config, {"n_trials": trials, "parallelism": 1, "study": f"bench-{sampler_name}"}, run)[0] | {"max_epochs": epochs}
    seed = checked["seed"]
    sampler, pruner = (
        (optuna.samplers.TPESampler(seed=seed), optuna.pruners.MedianPruner(**checked["pruner"]))
        if sampler_name == "tpe"
        else (optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner())
    )
    study = optuna.load_study(study_name=checked["study"], storage=_storage(config), sampler=sampler, pruner=pruner)
    started = time.perf_counter()
    study.optimize(trial_objective(config, checked, run), n_trials=trials, catch=(Exception,))
    seconds = time.perf_counter() - started
    values, best_so_far = [], []
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None:
            values.append(trial.value)
        best_so_far.append(min(values) if values else float("nan"))
    return {
        "best": min(values),
        "proposal": best(config, checked, run) if sampler_name == "tpe" else None,
        "curve": best_so_far,
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials),
        "seconds_per_trial": seconds / trials,
        "baseline": study.trials[0].value,
    }


def gate_metric(config, data_version: dict, hyperparameters: dict) -> float:
    """The gate's metric on the test split of a candidate trained as retrain would with these
    ``hyperparameters`` ({}: params.yaml's), exported and scored by the gate (no champion)."""
    from pipelines import steps

    trained = steps.train(config.name, data_version, hyperparameters)
    steps.export(config.name, trained["candidate"])
    return float(steps.gate(config.name, trained["candidate"], False, "")["challenger"][config.gate.metric])


def epoch_seconds(config, epochs: int, uri: str | None, round_: int) -> float:
    """Seconds an epoch of one seeded training, tracked to ``uri`` (None: off)."""
    from pipelines import tracking
    from pipelines.data.split import split_paths
    from pipelines.training.train import fit

    tracked_config = config.tracking.model_copy(update={"uri": uri})
    folder = config.artifacts_dir / "overhead" / f"{'on' if uri else 'off'}-{round_}"
    tracked = tracking.open_run(tracked_config, config.name, folder, folder.name, {"round": round_}, {})
    settings = config.train.model_copy(update={"max_epochs": epochs, "patience": epochs + 1})  # every epoch runs
    record = fit(settings, config.model, config.dataset, split_paths(config.split.output_dir), folder, tracked, tracked_config.timeout_s)
    tracking.finish(tracked)
    assert uri is None or tracked["status"] == "logged", tracked
    return record["fit_seconds"] / record["epochs"]


LOGGING_CALLS = 50


def epoch_logging_seconds(config, uri: str) -> float:
    """Median seconds of what tracking adds to an epoch: the one call ``EpochMetrics`` makes (an
    epoch's train_loss and val_loss, a batch to the server), timed ``LOGGING_CALLS`` times."""
    from pipelines import tracking

    tracked_config = config.tracking.model_copy(update={"uri": uri})
    record = tracking.open_run(tracked_config, config.name, config.artifacts_dir / "overhead" / "calls", "calls", {}, {})
    seconds = []
    for epoch in range(LOGGING_CALLS):
        started = time.perf_counter()
        assert tracking.log_to(record, {"train_loss": 0.5, "val_loss": 0.6}, step=epoch)
        seconds.append(time.perf_counter() - started)
    tracking.finish(record)
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--months", nargs="+", default=["2013-01", "2013-02", "2013-03"])
    parser.add_argument("--rows", type=int, default=None, help="flights a month (default: all)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help=QUICK_NOTE)
    args = parser.parse_args()
    if args.quick:
        args.months, args.rows, args.trials, args.epochs, args.rounds = ["2013-01"], 2000, 3, 1, 1
        print(QUICK_NOTE)

    from pipelines import steps
    from pipelines.config import Deployment, TrackingConfig
    from pipelines.launch.mlflow_server import MlflowServer
    from pipelines.launch.ports import free_ports

    with throwaway_project(args.months, args.rows, {"tune": {"max_epochs": args.epochs}}) as config:
        steps.validate(config.name)
        data_version = steps.version_data(config.name)["data_version"]
        print(f"data: {', '.join(args.months)} ({'all' if args.rows is None else args.rows} flights a month); {args.trials} trials a search, {args.epochs} epochs a trial")

        results = {name: search(config, name, args.trials, args.epochs) for name in ("tpe", "random")}
        print(f"\n{'trials':>6} {'TPE + median pruner':>20} {'random search':>14}   (best val_loss so far; trial 0 is params.yaml's settings)")
        for n in range(args.trials):
            print(f"{n + 1:>6} {results['tpe']['curve'][n]:>20.5f} {results['random']['curve'][n]:>14.5f}")
        for name, r in results.items():
            print(f"{name:>6}: best {r['best']:.5f} (params.yaml {r['baseline']:.5f}), {r['pruned']} pruned, {r['failed']} failed, {r['seconds_per_trial']:.1f} s a trial")
        print_ratio("best val_loss, TPE+pruning / random search (below 1: TPE better)", results["tpe"]["best"] / results["random"]["best"])
        print_ratio("seconds a trial, TPE+pruning / random search", results["tpe"]["seconds_per_trial"] / results["random"]["seconds_per_trial"])
        proposal = results["tpe"]["proposal"]
        print(f"\nproposed to retrain: {proposal['hyperparameters']} ({proposal['reason']})")
        defaults, tuned = gate_metric(config, data_version, {}), gate_metric(config, data_version, proposal["hyperparameters"])
        metric = config.gate.metric
        print(f"gate metric on the test split ({metric}): params.yaml {defaults:.4f}, best trial {tuned:.4f} (one seed each: the gate's seed_noise is {config.gate.seed_noise})")
        print_ratio(f"{metric} of the best trial's settings / params.yaml's", tuned / defaults)

        (port,) = free_ports(1)
        server_home = config.home / "mlflow-server"
        with MlflowServer(Deployment(home=server_home, tracking=TrackingConfig(uri=f"http://127.0.0.1:{port}"))) as server:
            epoch_seconds(config, args.epochs, None, -1)  # warm-up, not counted: the first fit of a process pays for imports and caches
            off, on = [], []
            for round_ in range(args.rounds):  # alternating, so drift in the machine's load hits both
                off.append(epoch_seconds(config, args.epochs, None, round_))
                on.append(epoch_seconds(config, args.epochs, server.url, round_))
            logging_s = epoch_logging_seconds(config, server.url)
        epoch_s = statistics.median(off)
        print(f"\nseconds an epoch: tracking off {epoch_s:.3f}, to MLflow {statistics.median(on):.3f} (median of {args.rounds} rounds; two fits differ by more than this under load)")
        print(f"an epoch's logging call (EpochMetrics: train_loss, val_loss to the server): {1000 * logging_s:.1f} ms, median of {LOGGING_CALLS}")
        print_ratio("epoch time, logged to MLflow / not tracked (target <= 1.05)", (epoch_s + logging_s) / epoch_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
