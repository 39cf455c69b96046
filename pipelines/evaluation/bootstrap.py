"""Weighted metrics, vectorised over bootstrap resamples, and the paired bootstrap of a difference.

A resample of ``rows`` test rows is a vector of counts (how often each row was drawn), so a
metric on B resamples is the metric with B weight vectors: a ``(B, rows)`` matrix. Every metric
here takes such a matrix and returns shape ``(B,)``; weights of all ones give the plain metric
(sklearn's value), integer weights the metric on the rows repeated that many times.

The interval of a difference is the normal bootstrap interval (Efron & Tibshirani 1993, *An
Introduction to the Bootstrap*, ch. 13): the observed difference +- z times the standard error of
the resampled differences. Both models are scored on the same resampled rows (a paired
bootstrap), so what the rows share (hard rows, easy rows) cancels out of the difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from statistics import NormalDist

import numpy as np

from pipelines.config import LOWER_IS_BETTER

EPSILON = 1e-7  # predicted probabilities are clipped to [EPSILON, 1 - EPSILON] for the log loss
# Cells of one chunk of the weights matrix (resamples x rows): 4 Mi float64, 32 MiB.
CHUNK_CELLS = 1 << 22


def resample_weights(rng: np.random.Generator, rows: int, count: int) -> np.ndarray:
    """``count`` bootstrap resamples of ``rows`` rows, each drawn with replacement: shape
    ``(count, rows)``, the times each row was drawn (each line sums to ``rows``). The same
    distribution as ``rng.multinomial(rows, [1 / rows] * rows, count)``, drawn much faster."""
    drawn = rng.integers(0, rows, size=(count, rows))
    drawn += np.arange(count)[:, None] * rows  # line i counts into cells [i * rows, (i + 1) * rows)
    return np.bincount(drawn.ravel(), minlength=count * rows).reshape(count, rows).astype(np.float64)


def weight_chunks(seed: int, rows: int, resamples: int) -> Iterator[tuple[int, np.ndarray]]:
    """``resamples`` bootstrap resamples of ``rows`` rows (``resample_weights``, seeded), in chunks
    of at most ``CHUNK_CELLS`` weights, so memory stays bounded when rows are millions: yields
    ``(first, weights)``, the index of the chunk's first resample and its ``(count, rows)`` matrix."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, CHUNK_CELLS // max(rows, 1)))
    for first in range(0, resamples, chunk):
        yield first, resample_weights(rng, rows, min(chunk, resamples - first))


def roc_auc(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted ROC AUC, the Mann-Whitney statistic (Hanley & McNeil 1982): the weighted share of
    (positive, negative) pairs the positive outranks, a tie counting half (midranks). ``truth``
    (0/1) and ``predicted`` have shape (rows,), ``weights`` (B, rows); nan where a resample holds
    one class only. The scores are sorted once; per resample, each positive adds its weight times
    the weight of the negatives below it plus half the weight of those tied with it."""
    positive = truth == 1
    negatives = np.flatnonzero(~positive)
    order = np.argsort(predicted[negatives], kind="stable")
    ranked, negatives = predicted[negatives][order], negatives[order]
    below = np.searchsorted(ranked, predicted[positive], side="left")
    up_to = np.searchsorted(ranked, predicted[positive], side="right")
    negative_weights = weights[:, negatives]
    cumulative = np.zeros((len(weights), len(negatives) + 1))
    np.cumsum(negative_weights, axis=1, out=cumulative[:, 1:])
    positive_weights = weights[:, positive]
    # below + tied / 2 == (weight below + weight up to and including the ties) / 2
    pairs = (positive_weights * (cumulative[:, below] + cumulative[:, up_to])).sum(axis=1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc: np.ndarray = pairs / (positive_weights.sum(axis=1) * cumulative[:, -1])
    return auc


def _mean(weights: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    """The weighted mean of a per-row quantity, per resample: ``weights @ per_row / weights.sum(1)``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean: np.ndarray = (weights @ per_row) / weights.sum(axis=1)
    return mean


def log_loss(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted binary log loss (nats per row) of probabilities clipped to [1e-7, 1 - 1e-7]."""
    p = np.clip(predicted.astype(np.float64), EPSILON, 1 - EPSILON)
    return _mean(weights, -(truth * np.log(p) + (1 - truth) * np.log1p(-p)))


def rmse(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted root mean squared error, in the label's unit."""
    root: np.ndarray = np.sqrt(_mean(weights, (truth - predicted.astype(np.float64)) ** 2))
    return root


def mae(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean absolute error, in the label's unit."""
    return _mean(weights, np.abs(truth - predicted.astype(np.float64)))


def confusion(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted true positives, false positives and false negatives of the cut ``predicted >=
    threshold``, per resample: three arrays of shape (B,)."""
    called, positive = predicted >= threshold, truth == 1
    hits = weights @ np.stack([called & positive, called & ~positive, ~called & positive], axis=1).astype(np.float64)
    return hits[:, 0], hits[:, 1], hits[:, 2]


def precision(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray, threshold: float) -> np.ndarray:
    """TP / (TP + FP) at ``threshold``; nan where no row is called positive (sklearn says 0 and warns)."""
    tp, fp, _ = confusion(truth, predicted, weights, threshold)
    with np.errstate(invalid="ignore"):
        share: np.ndarray = tp / (tp + fp)
    return share


def recall(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray, threshold: float) -> np.ndarray:
    """TP / (TP + FN) at ``threshold``; nan where no row is positive."""
    tp, _, fn = confusion(truth, predicted, weights, threshold)
    with np.errstate(invalid="ignore"):
        share: np.ndarray = tp / (tp + fn)
    return share


def f1(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray, threshold: float) -> np.ndarray:
    """2 TP / (2 TP + FP + FN) at ``threshold``; nan where no row is positive or called positive."""
    tp, fp, fn = confusion(truth, predicted, weights, threshold)
    with np.errstate(invalid="ignore"):
        score: np.ndarray = 2 * tp / (2 * tp + fp + fn)
    return score


CLASSIFICATION = ("roc_auc", "f1", "precision", "recall", "log_loss")
REGRESSION = ("rmse", "mae")
AT_THRESHOLD = frozenset({"f1", "precision", "recall"})


def weighted(metric: str, truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``metric`` (one of ``CLASSIFICATION`` or ``REGRESSION``) per line of ``weights`` (B, rows):
    shape (B,). ``threshold`` is the cut of f1, precision and recall; ``KeyError`` for another name."""
    if metric in AT_THRESHOLD:
        return {"f1": f1, "precision": precision, "recall": recall}[metric](truth, predicted, weights, threshold)
    return {"roc_auc": roc_auc, "log_loss": log_loss, "rmse": rmse, "mae": mae}[metric](truth, predicted, weights)


def improvement(metric: str, challenger: np.ndarray | float, champion: np.ndarray | float) -> np.ndarray:
    """challenger - champion in ``metric``, negated where lower is better: positive means better."""
    difference = np.subtract(challenger, champion)
    return -difference if metric in LOWER_IS_BETTER else difference


def paired_differences(
    metric: str,
    truth: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    groups: Sequence[np.ndarray],
    resamples: int,
    seed: int,
    thresholds: tuple[float, float] = (0.5, 0.5),
) -> np.ndarray:
    """The paired bootstrap of ``improvement`` in ``metric`` on each group of rows: shape
    ``(len(groups), resamples)``. ``truth``, ``challenger`` and ``champion`` (predictions) have
    shape (rows,); a group is an array of row indices (a slice). Each resample draws ``rows`` rows
    with replacement (seeded by ``seed``), the same rows for both models; a group's value is the
    metric on its rows of that resample. ``thresholds``: the challenger's and champion's cuts.
    Nan where a group's resample leaves the metric undefined (one class for ROC AUC)."""
    out = np.empty((len(groups), resamples))
    for start, weights in weight_chunks(seed, len(truth), resamples):
        for g, members in enumerate(groups):
            sample = weights[:, members]
            ours = weighted(metric, truth[members], challenger[members], sample, thresholds[0])
            theirs = weighted(metric, truth[members], champion[members], sample, thresholds[1])
            out[g, start : start + len(weights)] = improvement(metric, ours, theirs)
    return out


def normal_interval(observed: float, resampled: np.ndarray, confidence: float, seed_noise: float = 0.0) -> tuple[float, float]:
    """The normal bootstrap interval at two-sided level ``confidence``: ``observed`` +- z * the
    standard deviation of the ``resampled`` values (Efron & Tibshirani 1993, ch. 13); resamples
    where the statistic is undefined (nan) are left out. (nan, nan) with fewer than two left.

    ``seed_noise``: the standard deviation of the metric between trainings that differ only in
    their seed. Resampling the test rows cannot see it, so the difference of two independently
    trained models gets its variance twice on top: ``se^2 + 2 * seed_noise^2``."""
    finite = resampled[np.isfinite(resampled)]
    if finite.size < 2:
        return float("nan"), float("nan")
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(float(finite.var(ddof=1)) + 2 * seed_noise**2)
    return observed - half, observed + half
