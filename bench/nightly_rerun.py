"""What a night with no new data costs, against a night with new data, measured in one run.

The nightly DAG runs whether or not a batch landed. With nothing new, DVC's split stage is a
cache hit and the candidate trained on the same inputs is reused, so the night should cost a
small fraction of a real one. This runs the retrain steps (the functions the DAG's tasks call)
in a throwaway project twice: once after real months land (the baseline), once with nothing
new, and prints the ratio. Triton runs, so the publish step includes going live.

    .venv/bin/python bench/nightly_rerun.py [--months 2013-01 2013-02 2013-03]
"""

from __future__ import annotations

import argparse
import shutil
import time


def night(run_id: str) -> dict[str, float]:
    """Every step of the retrain DAG, in order; returns seconds per step."""
    from pipelines import retrain as steps

    seconds: dict[str, float] = {}

    def timed(name, call, *args):
        start = time.perf_counter()
        result = call(*args)
        seconds[name] = time.perf_counter() - start
        return result

    timed("validate", steps.validate)
    versioned = timed("version_data", steps.version_data)
    trained = timed("train", steps.train, versioned["data_version"], None, None)
    timed("export", steps.export, trained["candidate"])
    decision = timed("gate", steps.gate, trained["candidate"], False, "")
    run = {"dag_id": "retrain", "run_id": run_id, "run_type": "manual", "logical_date": None}
    timed("publish", steps.publish, trained["candidate"], decision, versioned["data_version"], run, {})
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--months", nargs="+", default=["2013-01", "2013-02", "2013-03"])
    args = parser.parse_args()

    from project import throwaway_project

    config = throwaway_project(args.months)
    from pipelines.serving.triton import TritonServer

    with TritonServer(config):  # publish goes live in it, as on a real night
        with_data = night("bench_new_data")
        no_data = night("bench_no_new_data")

    print(f"{'step':<14}{'new data (s)':>14}{'no new data (s)':>17}")
    for step in with_data:
        print(f"{step:<14}{with_data[step]:>14.2f}{no_data[step]:>17.2f}")
    total_with, total_without = sum(with_data.values()), sum(no_data.values())
    print(f"{'total':<14}{total_with:>14.2f}{total_without:>17.2f}")
    print(f"no-new-data night / new-data night = {total_without / total_with:.3f} ({', '.join(args.months)} landed)")
    shutil.rmtree(config.home)


if __name__ == "__main__":
    main()
