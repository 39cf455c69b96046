"""The always-valid sequential test of a rollout stage: continue, promote or abort, at every look.

The data are paired per-row score differences ``d_i = score_challenger_i - score_champion_i``
(higher is better: the caller scores, e.g. negative Brier ``-(p - y)^2`` or negative squared
error). The test is the mixture sequential probability ratio test (mSPRT) with a normal mixture
``N(0, tau^2)`` over the mean difference ``theta`` (Robbins 1970, "Statistical methods related to
the law of the iterated logarithm"; Johari, Koomen, Pekelis & Walsh 2022, "Always valid
inference: continuous monitoring of A/B tests", Operations Research), and its dual confidence
sequence (Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic
confidence sequences", normal mixture boundary). With ``V`` the sample variance of the ``n``
differences (plug-in, floored at ``VARIANCE_FLOOR``) and mean ``x``::

    Lambda_n(theta) = sqrt(V / (V + n tau^2)) * exp(n^2 tau^2 (x - theta)^2 / (2 V (V + n tau^2)))
    r_n = sqrt(2 V (V + n tau^2) / (n^2 tau^2) * log(sqrt((V + n tau^2) / V) / alpha))

``x +- r_n`` holds the true mean at every ``n`` at once with probability ``>= 1 - alpha``, so
looking after every batch of labels does not inflate the false-alarm rate (a fixed-n interval
looked at repeatedly does). ``Lambda_n(theta) >= 1 / alpha`` exactly when ``theta`` is outside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from pipelines.errors import NotRetryable

PROMOTE, ABORT, CONTINUE = "promote", "abort", "continue"
VARIANCE_FLOOR = 1e-12  # (score units)^2: identical answers (all d_i = 0) still give a finite, positive radius


class SequentialTestError(NotRetryable, ValueError):
    """A sequential test asked with bad arguments: the message names the argument and what it must be."""


@dataclass(frozen=True)
class SequentialDecision:
    """One look of ``mixture_sprt``: the decision, a sentence saying why, and its statistics (score units)."""

    decision: str  # PROMOTE | ABORT | CONTINUE
    reason: str  # one sentence for a person: the bounds, n, alpha, margin, why
    rows: int  # n, the paired rows used
    mean: float  # mean difference challenger - champion; nan when rows == 0
    sd: float  # sqrt(V); nan when rows < 2
    lower: float  # mean - r_n; -inf when rows < 2
    upper: float  # mean + r_n; +inf when rows < 2
    likelihood_ratio: float  # Lambda_n(-margin); 1 when rows < 2, inf past float range
    alpha: float
    tau: float
    margin: float

    def as_record(self) -> dict[str, float | int | str | None]:
        """The fields as a JSON-able dict (for lineage): a non-finite float (inf, nan) becomes None."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}


def radius(variance: npt.ArrayLike, rows: npt.ArrayLike, alpha: float, tau: float) -> npt.NDArray[np.float64]:
    """The half-width ``r_n`` of the confidence sequence (module docstring), elementwise over
    ``variance`` (V, floored at ``VARIANCE_FLOOR``) and ``rows`` (n >= 1), which broadcast."""
    v = np.maximum(np.asarray(variance, dtype=np.float64), VARIANCE_FLOOR)
    n = np.asarray(rows, dtype=np.float64)
    spread = v + n * tau**2
    r: npt.NDArray[np.float64] = np.sqrt(2 * v * spread / (n**2 * tau**2) * (0.5 * np.log(spread / v) - math.log(alpha)))
    return r


def _check(alpha: float, tau: float, margin: float, min_rows: int, max_rows: int | None) -> None:
    """``SequentialTestError`` naming the first argument out of its range."""
    checks = [
        ("alpha", alpha, 0 < alpha < 0.5, "a false-alarm rate in (0, 0.5)"),
        ("tau", tau, 0 < tau < math.inf, "a finite sd > 0 of the mixture, in score units"),
        ("margin", margin, 0 <= margin < math.inf, "a finite margin >= 0, in score units"),
        ("min_rows", min_rows, isinstance(min_rows, (int, np.integer)) and min_rows >= 2, "an integer >= 2"),
        ("max_rows", max_rows, max_rows is None or (isinstance(max_rows, (int, np.integer)) and max_rows >= min_rows), f"None or an integer >= min_rows ({min_rows})"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise SequentialTestError(f"{name}={value!r}: expected {expected}")


def mixture_sprt(differences: npt.ArrayLike, alpha: float, tau: float, margin: float = 0.0, min_rows: int = 100, max_rows: int | None = None, out_of_time: bool = False) -> SequentialDecision:
    """Decide a rollout stage from all ``differences`` seen so far (shape (rows,), score units).

    ``alpha``: the chance, over all looks together, of promoting a challenger whose true mean
    difference is ``-margin`` (or of aborting one that is exactly there). ``tau``: the sd of the
    mixture over theta, in score units, about the effect size expected (config ``min_effect``).
    Promote when the lower bound is above ``-margin``; abort when the upper bound is below it;
    otherwise continue. With fewer than ``min_rows`` rows it continues whatever the bounds say.
    When it would continue but ``rows >= max_rows`` or ``out_of_time``: abort as undecided (the
    champion keeps serving). ``SequentialTestError`` (a ``NotRetryable`` ``ValueError``) for an
    argument out of range or a difference that is not a finite number.
    """
    _check(alpha, tau, margin, min_rows, max_rows)
    try:
        d = np.asarray(differences, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise SequentialTestError(f"differences: expected numbers, one per paired row ({error})") from None
    if d.ndim != 1:
        raise SequentialTestError(f"differences: expected shape (rows,), got {d.shape}")
    bad = np.flatnonzero(~np.isfinite(d))
    if bad.size:
        raise SequentialTestError(f"differences: expected finite numbers, got {bad.size} non-finite (first at row {bad[0]}: {d[bad[0]]})")
    n, boundary = d.size, 0.0 - margin  # 0.0 - 0.0 is 0.0, not -0.0, in the reason
    mean = float(d.mean()) if n else math.nan
    sd, lower, upper, ratio = math.nan, -math.inf, math.inf, 1.0
    if n >= 2:
        v = max(float(d.var(ddof=1)), VARIANCE_FLOOR)
        sd, r = math.sqrt(v), float(radius(v, n, alpha, tau))
        lower, upper = mean - r, mean + r
        log_ratio = 0.5 * math.log(v / (v + n * tau**2)) + n**2 * tau**2 * (mean - boundary) ** 2 / (2 * v * (v + n * tau**2))
        ratio = math.exp(log_ratio) if log_ratio < 700 else math.inf
    bounds = f"the always-valid {100 * (1 - alpha):g}% bounds of the mean score difference challenger - champion are [{lower:.4g}, {upper:.4g}] on {n} paired rows (alpha {alpha:g}, margin {margin:g})"
    undecided = "ran out of time" if out_of_time else (f"reached max_rows {max_rows}" if max_rows is not None and n >= max_rows else "")
    if n >= min_rows and lower > boundary:
        decision, why = PROMOTE, f"the lower bound is above -margin ({boundary:g}): the challenger is not worse than the champion beyond the margin"
    elif n >= min_rows and upper < boundary:
        decision, why = ABORT, f"the upper bound is below -margin ({boundary:g}): the challenger is worse than the champion beyond the margin"
    elif undecided:
        decision, why = ABORT, f"the stage {undecided} undecided, so it cannot show the challenger is not worse and the champion keeps serving"
    elif n < min_rows:
        decision, why = CONTINUE, f"{min_rows - n} more paired rows are needed before deciding (min_rows {min_rows})"
    else:
        decision, why = CONTINUE, f"the bounds contain -margin ({boundary:g}): not decided yet"
    return SequentialDecision(decision, f"{decision}: {bounds}; {why}.", n, mean, sd, lower, upper, ratio, alpha, tau, margin)
