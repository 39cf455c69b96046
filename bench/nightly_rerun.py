"""What a night with no new data costs, against a night with new data, measured in one run.

The nightly DAG runs whether or not a batch landed. With nothing new, DVC's split stage is a
cache hit and the candidate trained on the same inputs is reused, so the night should cost a
small fraction of a real one. This runs the retrain steps (the functions the DAG's tasks call)
in a throwaway project twice: once after real months land (the baseline), once with nothing
new, and prints the ratio. Triton runs, so the publish step includes going live.

    .venv/bin/python bench/nightly_rerun.py [--months 2013-01 2013-02 2013-03] [--quick]

``--quick``: one month of 2,000 flights, 2 epochs of 256-row batches and the gate's floor at
0 (the small model is still published, so going live is measured), the same steps and a real
Triton; about 35 s on 2 cores, for tests/bench.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--months", nargs="+", default=None, help="default 2013-01 2013-02 2013-03; --quick: 2013-01")
    parser.add_argument("--quick", action="store_true", help="small data, few epochs: a check that the benchmark runs")
    args = parser.parse_args()
    months = args.months or (["2013-01"] if args.quick else ["2013-01", "2013-02", "2013-03"])
    rows, max_epochs, changes = (2000, 2, {"train": {"batch_size": 256}, "gate": {"floor": 0.0}}) if args.quick else (None, None, None)

    from project import QUICK_NOTE, print_ratio, retrain_night, throwaway_project

    from pipelines.launch.triton import TritonServer

    with throwaway_project(months, rows, changes) as config, TritonServer(config):  # publish goes live in it, as on a real night
        with_data, first = retrain_night(config, "bench_new_data", max_epochs)
        no_data, second = retrain_night(config, "bench_no_new_data", max_epochs)

    print(f"{'step':<14}{'new data (s)':>14}{'no new data (s)':>17}")
    for step in with_data:
        print(f"{step:<14}{with_data[step]:>14.2f}{no_data[step]:>17.2f}")
    total_with, total_without = sum(with_data.values()), sum(no_data.values())
    print(f"{'total':<14}{total_with:>14.2f}{total_without:>17.2f}")
    for name, night in (("new data", first), ("no new data", second)):
        published = night["publish"]
        split = "cache hit" if night["version_data"]["cache_hit"] else "new version"
        outcome = published["decision"] + (f" as version {published['version']}" if published["version"] else "")
        print(f"{name}: split {split}; {outcome} ({night['gate']['reason']}); served version {published['served_version']}")
    landed = f"{', '.join(months)} landed" + (f", {rows} flights each" if rows else "")
    print(f"no-new-data night / new-data night = {total_without / total_with:.3f} ({landed})")
    if args.quick:
        print(QUICK_NOTE)
    print_ratio("no-new-data night / new-data night", total_without / total_with)


if __name__ == "__main__":
    main()
