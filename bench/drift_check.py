"""Cost of the drift check: the project's ``drift.compare`` (calibrated p-values, the missing
values' test, and Evidently's report) against the same statistical tests written directly with
scipy/numpy/pandas (the floor: the distances, judged on the same calibrated nulls, and nothing
else), with Evidently's default ``Report([DataDriftPreset()])`` (method chosen per column)
beside them for reference, in one run. Also the calibration a publish runs
(``drift.calibrate``): its seconds for the default reference (20,000 rows) and for this one.

Data: seeded, flights-like, ``--rows`` reference rows and as many current rows, 20 columns:
12 numeric (int-valued hours, minutes, distances; float delays, times, fares) and 8 categorical
string columns of 10 to 300 categories, as a logged window arrives (strings, not ``category``).
A shift is planted in a few columns (2 numeric, 2 categorical) so that some drift and most do
not. The project's check is timed end to end, its input preparation included. Before any time
is printed, the project's per-column scores must equal the scipy ones (1e-9 relative) and the
verdicts must be identical; otherwise the run exits non-zero saying which column differs.

    .venv/bin/python bench/drift_check.py [--rows 1000000] [--repeat 3] [--skip-default] [--quick]

``--quick``: 20,000 rows a side, best of 2; the same checks (scores and verdicts compared
before any time is printed), for tests/bench.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import pandas as pd

# name: (categories, Zipf-like skew) for the categorical columns
CATEGORICAL = {
    "carrier": (16, 1.1),
    "origin": (120, 1.0),
    "dest": (300, 1.0),
    "tailnum": (250, 0.6),
    "aircraft": (40, 0.9),
    "fare_class": (10, 0.8),
    "route_group": (60, 0.7),
    "dep_weekday_slot": (28, 0.3),
}
SHIFTED = ("dep_delay", "distance", "origin", "fare_class")


def flights(rows: int, seed: int, shifted: bool) -> pd.DataFrame:
    """``rows`` flights-like rows; ``shifted`` moves the columns in ``SHIFTED``."""
    rng = np.random.default_rng(seed)
    dep_hour = rng.choice(24, rows, p=np.bincount(np.clip(rng.normal(13, 4, 100_000).round(), 0, 23).astype(int), minlength=24) / 100_000)
    air_time = rng.gamma(4.0, 40.0, rows)
    distance = (air_time * 7.5 + rng.normal(0, 40, rows)).clip(80, 5000).round().astype(np.int64)
    if shifted:  # longer routes this window: +0.3 reference std of distance
        distance = distance + int(0.3 * distance.std())
    dep_delay = rng.standard_t(3, rows) * 12 + rng.exponential(8, rows)
    if shifted:  # delays up: +0.5 reference std
        dep_delay = dep_delay + 0.5 * 20.0
    frame = {
        "dep_hour": dep_hour.astype(np.int64),
        "dep_minute": rng.integers(0, 60, rows),
        "arr_hour": ((dep_hour + (air_time // 60).astype(int) + 1) % 24).astype(np.int64),
        "arr_minute": rng.integers(0, 60, rows),
        "distance": distance,
        "seats": rng.choice([50, 76, 120, 150, 180, 220, 300], rows, p=[0.1, 0.2, 0.15, 0.25, 0.15, 0.1, 0.05]),
        "air_time": air_time,
        "dep_delay": dep_delay,
        "arr_delay": dep_delay * 0.9 + rng.normal(0, 10, rows) if not shifted else (dep_delay - 10.0) * 0.9 + rng.normal(0, 10, rows),
        "taxi_out": rng.lognormal(2.7, 0.4, rows),
        "fare": rng.lognormal(5.3, 0.5, rows),
        "load_factor": rng.beta(8, 2, rows),
    }
    for name, (n, skew) in CATEGORICAL.items():
        weights = 1.0 / np.arange(1, n + 1) ** skew
        if shifted and name in SHIFTED:  # the popular categories lose share to the rare ones
            weights = weights[::-1] ** 0.4 * weights ** 0.6
        labels = np.array([f"{name}_{i:03d}" for i in range(n)], dtype=object)
        frame[name] = labels[rng.choice(n, rows, p=weights / weights.sum())]
    return pd.DataFrame(frame)


def scipy_check(reference: pd.DataFrame, current: pd.DataFrame, columns: dict, nulls: dict, rate: float) -> dict[str, tuple[float, bool]]:
    """The same tests as Evidently's ``wasserstein`` and ``jensenshannon``, straight on the
    columns, judged on the calibrated ``nulls`` (the data has no missing values, so the distance
    decides at half the rate): {column: (score, drifted)}."""
    from scipy import stats
    from scipy.spatial import distance

    out = {}
    for column, kind in columns.items():
        ref, cur = reference[column], current[column]
        if kind == "numeric":
            ref = ref.to_numpy(dtype=np.float64)
            cur = cur.to_numpy(dtype=np.float64)
            ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
            score = stats.wasserstein_distance(ref, cur) / max(float(np.std(ref)), 0.001)
        else:
            ref_counts, cur_counts = ref.value_counts(dropna=True), cur.value_counts(dropna=True)
            ref_counts, cur_counts = ref_counts.align(cur_counts, join="outer", fill_value=0)
            score = float(distance.jensenshannon(ref_counts.to_numpy() / ref_counts.sum(), cur_counts.to_numpy() / cur_counts.sum()))
        out[column] = (float(score), 2 * nulls[column].p_value(score, len(cur), len(ref)) <= rate)
    return out


def default_preset(reference: pd.DataFrame, current: pd.DataFrame, columns: dict) -> dict[str, tuple[float, str]]:
    """Evidently's default ``DataDriftPreset`` (it picks each column's method): {column: (score, method)}."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(
        numerical_columns=[c for c, k in columns.items() if k == "numeric"],
        categorical_columns=[c for c, k in columns.items() if k == "categorical"],
    )
    snapshot = Report([DataDriftPreset()]).run(
        Dataset.from_pandas(current, data_definition=definition), Dataset.from_pandas(reference, data_definition=definition)
    )
    out = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith("ValueDrift") and config.get("column") in columns:
            out[config["column"]] = (float(metric["value"]), config.get("method"))
    return out


def timed(calls: dict, repeat: int) -> tuple[dict[str, float], dict]:
    """{name: fastest seconds of ``repeat`` calls}, {name: last result}; the calls take turns
    (a, b, a, b, ...), so a busy machine slows each of them alike."""
    times, results = {name: [] for name in calls}, {}
    for _ in range(repeat):
        for name, call in calls.items():
            started = time.perf_counter()
            results[name] = call()
            times[name].append(time.perf_counter() - started)
    return {name: min(t) for name, t in times.items()}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="rows a side (default 1,000,000; --quick: 20,000)")
    parser.add_argument("--repeat", type=int, default=None, help="calls of (a) and (b), taking turns; the fastest is printed (default 3; --quick: 2)")
    parser.add_argument("--skip-default", action="store_true", help="leave out Evidently's DataDriftPreset")
    parser.add_argument("--quick", action="store_true", help="small data, few repeats: a check that the benchmark runs")
    args = parser.parse_args()
    args.rows = args.rows or (20_000 if args.quick else 1_000_000)
    args.repeat = args.repeat or (2 if args.quick else 3)

    from project import QUICK_NOTE, print_ratio

    from pipelines.config import DriftTests, MonitoringConfig
    from pipelines.monitoring import drift
    from pipelines.monitoring.drift import ColumnKind

    started = time.perf_counter()
    reference = flights(args.rows, seed=1, shifted=False)
    current = flights(args.rows, seed=2, shifted=True)
    made = time.perf_counter() - started
    kinds = {c: ColumnKind.numeric if pd.api.types.is_numeric_dtype(reference[c]) else ColumnKind.categorical for c in reference.columns}
    tests, monitoring = DriftTests(), MonitoringConfig()
    drift_share, rate = monitoring.drift_share, monitoring.false_alarm_rate
    kinds_by_value = {c: k.value for c, k in kinds.items()}

    # the calibration a publish runs: the default reference (20,000 training rows) beside the rest
    pool = flights(min(args.rows, 200_000), seed=3, shifted=False)
    started = time.perf_counter()
    drift.calibrate(pool.head(monitoring.reference_rows), pool.iloc[monitoring.reference_rows :], kinds, monitoring.min_rows, monitoring.null_draws, seed=1)
    calibrate_default_s = time.perf_counter() - started
    started = time.perf_counter()
    nulls = drift.calibrate(reference, pool, kinds, monitoring.min_rows, monitoring.null_draws, seed=1)
    calibrate_s = time.perf_counter() - started

    # warm-up on a slice: imports (Evidently, scipy) are not what is measured
    drift.compare(reference.head(1000), current.head(1000), kinds, tests, drift_share, rate, nulls)
    scipy_check(reference.head(1000), current.head(1000), kinds_by_value, nulls, rate)

    seconds, results = timed(
        {
            "project": lambda: drift.compare(reference, current, kinds, tests, drift_share, rate, nulls),
            "scipy": lambda: scipy_check(reference, current, kinds_by_value, nulls, rate),
        },
        args.repeat,
    )
    (project_s, result), (scipy_s, direct) = (seconds["project"], results["project"]), (seconds["scipy"], results["scipy"])

    mismatches = []
    for c in result.columns:
        score, drifted = direct[c.column]
        if c.drifted != drifted or not math.isclose(c.score, score, rel_tol=1e-9, abs_tol=1e-12):
            mismatches.append(f"  {c.column}: project score {c.score!r} drifted={c.drifted}, scipy score {score!r} drifted={drifted}")
    if mismatches:
        sys.exit("the project's drift check and the direct scipy tests disagree:\n" + "\n".join(mismatches))

    default_s = preset = None
    if not args.skip_default:
        started = time.perf_counter()
        preset = default_preset(reference, current, kinds_by_value)
        default_s = time.perf_counter() - started

    print(f"{args.rows} reference rows vs {args.rows} current rows, {len(kinds)} columns "
          f"({sum(k == ColumnKind.numeric for k in kinds.values())} numeric, {sum(k == ColumnKind.categorical for k in kinds.values())} categorical); "
          f"data made in {made:.1f} s; shift planted in {', '.join(SHIFTED)}")
    print(f"{'column':<18}{'kind':<13}{'method':<15}{'project':>12}{'scipy':>12}{'drifted':>9}" + ("" if preset is None else f"{'default':>12}  default method"))
    for c in result.columns:
        line = f"{c.column:<18}{c.kind:<13}{c.method:<15}{c.score:>12.6f}{direct[c.column][0]:>12.6f}{'yes' if c.drifted else 'no':>9}"
        if preset is not None and c.column in preset:
            line += f"{preset[c.column][0]:>12.6f}  {preset[c.column][1]}"
        print(line)
    print(f"verdicts identical, scores equal to 1e-9 relative; {len(result.drifted_columns)}/{len(result.columns)} drifted, "
          f"share {result.share:.2f}, dataset drift {result.dataset_drift} (drift_share {drift_share}, false_alarm_rate {rate})")
    print(f"calibration at publish ({monitoring.null_draws} windows a size): {calibrate_default_s:.2f} s for a {monitoring.reference_rows}-row reference, "
          f"{calibrate_s:.2f} s for this {args.rows}-row one ({len(next(iter(nulls.values())).sizes)} sizes)")
    print()
    print(f"{'check':<44}{'seconds':>9}{'vs scipy':>10}")
    print(f"{'(a) project drift.compare (with its report)':<44}{project_s:>9.2f}{project_s / scipy_s:>9.2f}x")
    print(f"{'(b) scipy/numpy/pandas, same tests':<44}{scipy_s:>9.2f}{1:>9.2f}x")
    if default_s is not None:
        print(f"{'(c) Evidently DataDriftPreset (default)':<44}{default_s:>9.2f}{default_s / scipy_s:>9.2f}x")
    print(f"best of {args.repeat} for (a) and (b) (taking turns), one call for (c); CPU ({os.cpu_count()} cores)")
    if args.quick:
        print(QUICK_NOTE)
    print_ratio("project drift.compare seconds / scipy seconds", project_s / scipy_s)


if __name__ == "__main__":
    main()
