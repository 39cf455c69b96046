"""How large a drift statistic is by chance: its distribution under no drift, at every window size.

A distance between a window and the reference is never zero, and the smaller the window the
larger it is by chance alone, so a fixed threshold fires on noise in small windows and misses
real shifts in large ones. The null distribution here is a bootstrap (Efron & Tibshirani 1993):
``draws`` windows drawn with replacement from a pool of the version's training rows that the
reference sample does not hold, at a doubling ladder of sizes, each scored against the
reference with the statistic the check uses. Scored against the very reference the check uses,
the null keeps that sample's own chance deviation, so the false-alarm rate holds for this
reference, not only on average over references.

Under no drift both distances shrink as ``1 / sqrt(n_eff)``, where a window of ``n`` rows
against a reference of ``m`` has the effective size ``n_eff = n m / (n + m)`` of a two-sample
comparison (normed Wasserstein: del Barrio, Giné & Matrán 1999; Jensen-Shannon:
``8 n_eff JS^2`` tends to chi-square with K - 1 degrees of freedom). The null is therefore kept
scaled, as ``statistic * sqrt(size)``, and a window is judged on the calibrated size nearest
its ``n_eff``: the scaled null moves little between neighbouring sizes, and the finite-size
effects (few rows, rare categories) stay in it. The p-value is the bootstrap one,
``(1 + #{null >= observed}) / (draws + 1)`` (Davison & Hinkley 1997, eq. 4.11), so it is never
below ``1 / (draws + 1)``.

Draws are Poisson counts over the pool's distinct values, each window normalised by its own
total (the Poisson bootstrap; conditional on its total it is the multinomial one): B x K
numbers per size instead of B x n. A numeric column with more than ``MAX_SUPPORT`` distinct
values is calibrated on that many equal-mass quantile groups of the reference (each at its
mean), which smooths the null of a continuous column by a few per cent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

MAX_SUPPORT = 1024  # distinct values a numeric column is calibrated on
NORM_FLOOR = 0.001  # Evidently's floor of the reference's std when it norms the Wasserstein distance

Floats = npt.NDArray[np.float64]


def wasserstein_normed(reference: Floats, current: Floats) -> float:
    """Evidently's ``wasserstein`` score: scipy's 1-Wasserstein distance of the two samples
    (1-D arrays of finite numbers) divided by the reference's standard deviation (floored at 0.001)."""
    from scipy import stats

    return float(stats.wasserstein_distance(reference, current)) / max(float(np.std(reference)), NORM_FLOOR)


def jensen_shannon(reference_counts: Floats, current_counts: Floats) -> float:
    """Evidently's ``jensenshannon`` score: scipy's Jensen-Shannon distance (natural log) of the
    two category frequency vectors (counts of the same categories, in the same order)."""
    from scipy.spatial import distance

    return float(distance.jensenshannon(reference_counts / reference_counts.sum(), current_counts / current_counts.sum()))


@dataclass(frozen=True)
class NullDistribution:
    """The scaled null of one column's statistic: ``scaled[i]`` holds ``draws`` values of
    ``statistic * sqrt(sizes[i])`` under no drift, sorted ascending."""

    sizes: npt.NDArray[np.int64]  # (S,) calibrated effective window sizes, ascending
    scaled: Floats  # (S, draws)

    @staticmethod
    def effective_size(window_rows: int, reference_rows: int) -> float:
        return window_rows * reference_rows / (window_rows + reference_rows)

    def _row(self, rows: int) -> Floats:
        row: Floats = self.scaled[int(np.argmin(np.abs(np.log(self.sizes) - math.log(rows))))]
        return row

    def p_value(self, statistic: float, rows: int, reference_rows: int) -> float:
        """The bootstrap p-value of ``statistic`` measured on a window of ``rows`` rows against
        ``reference_rows`` reference rows."""
        row = self._row(rows)
        scaled = statistic * math.sqrt(self.effective_size(rows, reference_rows))
        return (1 + len(row) - int(np.searchsorted(row, scaled, side="left"))) / (len(row) + 1)

    def threshold(self, level: float, rows: int, reference_rows: int) -> float:
        """The statistic above which (strictly) ``p_value <= level`` for a window of ``rows``
        rows; ``inf`` when ``level`` is below the smallest p-value the draws can give."""
        row = self._row(rows)
        allowed = math.floor(level * (len(row) + 1)) - 1  # null draws that may lie at or above it
        if allowed < 0:
            return math.inf
        return float(row[len(row) - 1 - allowed]) / math.sqrt(self.effective_size(rows, reference_rows))


def ladder(smallest: int, largest: int) -> npt.NDArray[np.int64]:
    """Sizes from ``smallest`` doubling up to ``largest`` (both included): the calibrated sizes."""
    smallest = max(1, min(smallest, largest))
    steps = max(0, math.ceil(math.log2(largest / smallest)))
    return np.unique(np.minimum(smallest * 2 ** np.arange(steps + 1), largest)).astype(np.int64)


def _draws(probabilities: Floats, size: int, draws: int, rng: np.random.Generator) -> Floats:
    """(draws, K) frequencies of windows of about ``size`` rows from ``probabilities`` (K,)."""
    counts = rng.poisson(size * probabilities, size=(draws, len(probabilities))).astype(np.float64)
    frequencies: Floats = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return frequencies


def _scale(size: int, reference_rows: int, bootstrap: bool) -> float:
    """What a null statistic at ``size`` is multiplied by: ``sqrt(n_eff)`` for windows from an
    independent pool (both samples' noise is in the statistic), ``sqrt(size)`` for windows
    bootstrapped from the reference itself (only the window's is: the one-sample statistic
    scaled by sqrt(n) has the two-sample one's limit)."""
    return math.sqrt(size if bootstrap else NullDistribution.effective_size(size, reference_rows))


def numeric_null(reference: Floats, pool: Floats | None, sizes: npt.NDArray[np.int64], draws: int, rng: np.random.Generator) -> NullDistribution:
    """The scaled null of ``wasserstein_normed`` against ``reference`` for windows drawn from
    ``pool`` (both 1-D finite numbers; None: from the reference itself, a bootstrap)."""
    bootstrap = pool is None
    pool = reference if pool is None else pool
    norm = max(float(np.std(reference)), NORM_FLOOR)
    pooled = np.concatenate([reference, pool])
    support, index = np.unique(pooled, return_inverse=True)
    if len(support) > MAX_SUPPORT:  # equal-mass groups of the pooled values, each at its mean
        edges = np.quantile(pooled, np.linspace(0, 1, MAX_SUPPORT + 1)[1:-1])
        _, index = np.unique(np.searchsorted(edges, pooled, side="right"), return_inverse=True)
        support = np.bincount(index, weights=pooled) / np.bincount(index)
    reference_cdf = np.cumsum(np.bincount(index[: len(reference)], minlength=len(support)) / len(reference))[:-1]
    pool_probabilities = np.bincount(index[len(reference) :], minlength=len(support)) / len(pool)
    gaps = np.diff(support)
    scaled = np.empty((len(sizes), draws))
    for i, size in enumerate(sizes):
        window_cdf = np.cumsum(_draws(pool_probabilities, int(size), draws, rng), axis=1)[:, :-1]
        # W1 of two distributions on one support: the area between their CDFs (scipy's _cdf_distance)
        distance = np.abs(window_cdf - reference_cdf) @ gaps / norm
        scaled[i] = distance * _scale(int(size), len(reference), bootstrap)
    return NullDistribution(sizes, np.sort(scaled, axis=1))


def categorical_null(reference: Floats, pool: Floats | None, sizes: npt.NDArray[np.int64], draws: int, rng: np.random.Generator) -> NullDistribution:
    """The scaled null of ``jensen_shannon`` against a reference with category counts
    ``reference`` for windows drawn from a pool with counts ``pool`` (both (K,), same categories;
    None: from the reference itself, a bootstrap)."""
    from scipy.special import rel_entr

    bootstrap = pool is None
    pool = reference if pool is None else pool
    kept = (reference + pool) > 0
    reference_frequencies, pool_probabilities = reference[kept] / reference.sum(), pool[kept] / pool.sum()
    scaled = np.empty((len(sizes), draws))
    for i, size in enumerate(sizes):
        window = _draws(pool_probabilities, int(size), draws, rng)
        middle = (reference_frequencies + window) / 2
        divergence = (rel_entr(reference_frequencies, middle) + rel_entr(window, middle)).sum(axis=1) / 2
        scaled[i] = np.sqrt(np.maximum(divergence, 0.0)) * _scale(int(size), int(reference.sum()), bootstrap)
    return NullDistribution(sizes, np.sort(scaled, axis=1))


def write(nulls: Mapping[str, NullDistribution], path: Path) -> Path:
    """Store the nulls of each column as parquet (column, size, draw, scaled): ``path``."""
    frames = [
        pd.DataFrame(
            {
                "column": column,
                "size": np.repeat(null.sizes, null.scaled.shape[1]),
                "draw": np.tile(np.arange(null.scaled.shape[1]), len(null.sizes)),
                "scaled": null.scaled.ravel(),
            }
        )
        for column, null in nulls.items()
    ]
    pd.concat(frames, ignore_index=True).to_parquet(path, index=False)
    return path


def read(path: Path) -> dict[str, NullDistribution]:
    """The nulls ``write`` stored in ``path``, by column."""
    frame = pd.read_parquet(path)
    nulls = {}
    for column, rows in frame.groupby("column", sort=False):
        table = rows.pivot(index="size", columns="draw", values="scaled").sort_index()
        nulls[str(column)] = NullDistribution(table.index.to_numpy(np.int64), np.sort(table.to_numpy(np.float64), axis=1))
    return nulls
