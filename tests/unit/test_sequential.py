"""The always-valid sequential test of a rollout stage (mixture SPRT and its confidence sequence):
its false-alarm rate under looks after every batch, its power, and its decision rule."""

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from pipelines.errors import NotRetryable
from pipelines.evaluation.sequential import ABORT, CONTINUE, PROMOTE, VARIANCE_FLOOR, SequentialTestError, mixture_sprt, radius

ALPHA, TAU, SD = 0.05, 0.01, 0.1  # tau: the config's default min_effect; SD: per-row sd of the differences
STREAMS, ROWS, EVERY, MIN_ROWS = 2000, 2000, 25, 100
LOOKS = np.arange(MIN_ROWS, ROWS + 1, EVERY)  # 77 looks: after every 25 rows, from min_rows on
# Monte Carlo tolerance: were the true rate alpha, the share of 2,000 streams exceeds alpha + 3 binomial
# standard errors (3 * sqrt(0.05 * 0.95 / 2000) = 0.0146) with chance about 0.0013 (normal approximation).
TOLERANCE = 3 * math.sqrt(ALPHA * (1 - ALPHA) / STREAMS)


def null_streams(kind: str, seed: int = 7) -> np.ndarray:
    """(STREAMS, ROWS) differences whose true mean is exactly 0: normal, or negative-Brier
    differences of two equally good classifiers (exchangeable, so E[d] = 0; bounded, spiky)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0.0, SD, (STREAMS, ROWS))
    p = rng.uniform(0.05, 0.6, (STREAMS, ROWS))
    y = rng.random((STREAMS, ROWS)) < p
    champion, challenger = (np.clip(p + rng.normal(0, 0.15, p.shape), 0, 1) for _ in range(2))
    return -((challenger - y) ** 2) + (champion - y) ** 2


def at_looks(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample variance (ddof 1) of each stream's first n rows, n in LOOKS: (STREAMS, looks) each."""
    total, squares = np.cumsum(d, axis=1)[:, LOOKS - 1], np.cumsum(d * d, axis=1)[:, LOOKS - 1]
    return total / LOOKS, (squares - total**2 / LOOKS) / (LOOKS - 1)


@pytest.mark.parametrize("kind", ["normal", "brier"])
def test_looking_after_every_batch_keeps_the_false_promotion_rate_under_alpha_where_a_fixed_n_test_does_not(kind):
    d = null_streams(kind)
    mean, variance = at_looks(d)

    r = radius(variance, LOOKS, ALPHA, TAU)
    promoted = ((mean - r) > 0).any(axis=1)
    outside = (np.abs(mean) > r).any(axis=1)  # the true mean 0 ever left the confidence sequence
    fixed = NormalDist().inv_cdf(1 - ALPHA / 2) * np.sqrt(variance / LOOKS)  # a fixed-n z interval, same looks

    assert promoted.mean() <= ALPHA + TOLERANCE  # measured: 0.007 (normal), 0.008 (brier)
    assert outside.mean() <= ALPHA + TOLERANCE  # measured: 0.019 (normal), 0.012 (brier)
    assert ((mean - fixed) > 0).any(axis=1).mean() > ALPHA + TOLERANCE  # measured: 0.157 (normal), 0.166 (brier)
    # The vectorised bounds are the function's: its decision at every look of 40 streams agrees.
    for s in range(40):
        for i in range(0, len(LOOKS), 4):
            decision = mixture_sprt(d[s, : LOOKS[i]], ALPHA, TAU, min_rows=MIN_ROWS)
            assert decision.lower == pytest.approx(mean[s, i] - r[s, i], abs=1e-12)
            assert (decision.decision == PROMOTE) == (mean[s, i] - r[s, i] > 0)


@pytest.mark.parametrize(("theta", "expected"), [(0.02, PROMOTE), (-0.02, ABORT)])
def test_a_clearly_better_challenger_is_promoted_and_a_worse_one_aborted_within_1000_rows(theta, expected):
    rows_until = []
    for seed in range(100):
        stream = np.random.default_rng(100 + seed).normal(theta, SD, 1000)
        for n in range(EVERY, len(stream) + 1, EVERY):
            decision = mixture_sprt(stream[:n], ALPHA, TAU, min_rows=MIN_ROWS)
            if decision.decision != CONTINUE:
                break
        assert decision.decision == expected, decision.reason
        rows_until.append(decision.rows)

    assert np.median(rows_until) <= 300  # measured: median 250, 90th percentile ~450, max 725 (+0.02) / 825 (-0.02)


def test_the_margin_moves_the_boundary_of_both_decisions():
    slightly_worse = np.random.default_rng(3).normal(-0.005, SD, 20000)

    strict = mixture_sprt(slightly_worse, ALPHA, TAU)
    tolerant = mixture_sprt(slightly_worse, ALPHA, TAU, margin=0.02)

    assert strict.decision == ABORT and strict.upper < 0
    assert tolerant.decision == PROMOTE and tolerant.lower > -0.02
    assert (strict.lower, strict.upper) == (tolerant.lower, tolerant.upper)  # the bounds do not depend on the margin
    assert "margin 0.02" in tolerant.reason and "not worse" in tolerant.reason
    # Lambda at -margin crosses 1/alpha exactly where -margin leaves the bounds (the duality of test and sequence).
    for margin in (0.0, 0.003, 0.0045, 0.01, 0.02):
        decision = mixture_sprt(slightly_worse, ALPHA, TAU, margin=margin)
        assert (decision.likelihood_ratio >= 1 / ALPHA) == (not decision.lower <= -margin <= decision.upper)
        assert (decision.decision == CONTINUE) == (decision.lower <= -margin <= decision.upper)


def test_fewer_than_min_rows_continues_whatever_the_bounds_say():
    much_better = np.random.default_rng(4).normal(0.5, SD, 50)

    waiting = mixture_sprt(much_better, ALPHA, TAU, min_rows=100)

    assert waiting.decision == CONTINUE and waiting.lower > 0
    assert "50 more paired rows" in waiting.reason
    assert mixture_sprt(much_better, ALPHA, TAU, min_rows=10).decision == PROMOTE


def test_undecided_at_max_rows_or_out_of_time_aborts_and_the_champion_keeps_serving():
    null = np.random.default_rng(5).normal(0.0, SD, 500)
    better = np.random.default_rng(6).normal(0.05, SD, 500)

    assert mixture_sprt(null, ALPHA, TAU, max_rows=501).decision == CONTINUE
    at_max = mixture_sprt(null, ALPHA, TAU, max_rows=500)
    late = mixture_sprt(null, ALPHA, TAU, out_of_time=True)
    assert at_max.decision == ABORT and "reached max_rows 500 undecided" in at_max.reason
    assert late.decision == ABORT and "ran out of time undecided" in late.reason and "champion keeps serving" in late.reason
    assert mixture_sprt([], ALPHA, TAU, out_of_time=True).decision == ABORT  # no labels came in time
    assert mixture_sprt(better, ALPHA, TAU, max_rows=500, out_of_time=True).decision == PROMOTE  # a decision stands


def test_identical_answers_give_finite_bounds_and_do_not_promote_without_a_margin():
    same = mixture_sprt(np.zeros(5000), ALPHA, TAU)

    assert same.decision == CONTINUE
    assert same.sd == math.sqrt(VARIANCE_FLOOR) and 0 < same.upper < 1e-6 and same.lower == -same.upper
    assert math.isfinite(same.likelihood_ratio)
    assert mixture_sprt(np.zeros(5000), ALPHA, TAU, margin=0.001).decision == PROMOTE


def test_no_rows_or_one_row_has_unbounded_bounds_and_a_json_record():
    empty, one = mixture_sprt([], ALPHA, TAU), mixture_sprt([0.3], ALPHA, TAU)

    assert empty.decision == one.decision == CONTINUE
    assert math.isnan(empty.mean) and one.mean == 0.3
    assert (one.lower, one.upper, one.likelihood_ratio) == (-math.inf, math.inf, 1.0)
    record = json.loads(json.dumps(empty.as_record(), allow_nan=False))
    assert record["mean"] is None and record["lower"] is None and record["upper"] is None and record["rows"] == 0
    full = mixture_sprt(np.random.default_rng(8).normal(0.02, SD, 1000), ALPHA, TAU).as_record()
    assert json.loads(json.dumps(full, allow_nan=False)) == full and full["decision"] == PROMOTE
    assert set(full) == {"decision", "reason", "rows", "mean", "sd", "lower", "upper", "likelihood_ratio", "alpha", "tau", "margin"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"alpha": 0.0}, "alpha=0.0: expected a false-alarm rate in (0, 0.5)"),
        ({"alpha": 0.5}, "alpha=0.5"),
        ({"tau": 0.0}, "tau=0.0: expected a finite sd > 0"),
        ({"margin": -0.01}, "margin=-0.01: expected a finite margin >= 0"),
        ({"min_rows": 1}, "min_rows=1: expected an integer >= 2"),
        ({"max_rows": 50}, "max_rows=50: expected None or an integer >= min_rows (100)"),
        ({"differences": [0.1, float("nan"), 0.2]}, "differences: expected finite numbers, got 1 non-finite (first at row 1: nan)"),
        ({"differences": [[0.1, 0.2]]}, "differences: expected shape (rows,), got (1, 2)"),
        ({"differences": ["a"]}, "differences: expected numbers"),
    ],
)
def test_bad_arguments_raise_a_not_retryable_value_error_naming_them(arguments, message):
    given = {"differences": [0.1, 0.2], "alpha": ALPHA, "tau": TAU} | arguments

    with pytest.raises(SequentialTestError) as raised:
        mixture_sprt(**given)

    assert message in str(raised.value)
    assert isinstance(raised.value, NotRetryable) and isinstance(raised.value, ValueError)
