"""Performance estimated without labels: NannyML's CBPE for classifiers and DLE for regressors,
on scikit-learn.

NannyML itself is not used: nannyml 0.13.1, the newest, excludes pins the stack holds (pyarrow
26.0.1, python-dateutil 4.0.0, cachetools 8, importlib-metadata 10; ``shared/DEPENDENCIES.md``),
so the two estimators are implemented here as NannyML documents them ("How it works: performance
estimation", https://nannyml.readthedocs.io/en/stable/how_it_works/performance_estimation.html).
Both learn from the served version's performance reference (``pipelines.feedback.reference``:
its labelled test rows with the scores its ``model.onnx`` gives them) and are applied to the rows
a window served (features and ``prediction``), whose labels may not have come back.

**CBPE** (Confidence-based Performance Estimation). A calibrated score is the chance that the row
is positive, so the confusion matrix of a set of rows has an expected value without labels.

1. Calibration, fitted on the reference. As NannyML, only when calibrating helps: the expected
   calibration error of the raw scores and of isotonic-calibrated ones are compared on held-out
   stratified shuffle splits of the reference (``needs_calibration``); if calibrating lowers it,
   an ``IsotonicRegression`` (score -> truth, clipped to [0, 1]) fitted on all reference rows
   maps each served score to its probability ``p``; else ``p`` is the score itself.
2. At a cut ``t`` of the scores: expected TP = sum of ``p`` over rows called positive, FP = sum
   of ``1 - p`` over them, FN = sum of ``p`` over the others (and TN the rest).
3. ROC AUC: the expected TPR and FPR at every cut, area by trapezoids (NannyML's
   ``estimate_roc_auc``). That area is the Mann-Whitney statistic of the rows each counted once
   as a positive of weight ``p`` and once as a negative of weight ``1 - p``
   (``bootstrap.roc_auc`` with those weights). F1, precision and recall: the expected confusion
   at the version's served threshold. Log loss: the mean of ``-(p log s + (1 - p) log(1 - s))``.

**DLE** (Direct Loss Estimation). A "nanny" model, here scikit-learn's
``HistGradientBoostingRegressor`` (NannyML uses LightGBM), learns on the reference each row's
loss from its features and the prediction: the squared error for RMSE, the absolute error for
MAE. A window's estimate is the mean predicted loss (its square root for RMSE).

Limits, the same as NannyML's: both assume that what the reference saw of the relation between
inputs and target still holds. They follow covariate shift (more rows where the model is unsure,
or wrong by more), not concept drift: the same inputs with other outcomes (a new delay policy,
mis-joined or shuffled labels) leave the scores unchanged, so the estimate does not move; only
realized metrics see that. CBPE also needs scores whose order carries the signal, and the
estimate is of the metric's expectation: a window's realized value scatters around it by its
own sampling noise (about the realized interval's half-width). A window needs rows: with few,
the estimate is as noisy as a realized metric on as many labelled rows. Isotonic calibration on
a small reference spreads the probabilities too far (it fits the reference's own noise), which
biases CBPE's ROC AUC up (+0.02 measured with 900 reference rows of deliberately miscalibrated
scores). DLE's squared-error model leaks large losses into rows of small ones: where the errors
of two groups of rows differ twentyfold, the small group's RMSE came out three times too large
(its MAE within 5%; tests/unit/test_performance.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipelines.artifacts import OUTPUT
from pipelines.config import DatasetConfig, FeatureType, Task
from pipelines.evaluation import bootstrap
from pipelines.lineage import Record

CBPE, DLE = "CBPE", "DLE"
BINS = 10  # equal-width bins of the expected calibration error
CALIBRATION_SPLITS = 10  # held-out splits of the reference that decide whether to calibrate
MAX_CATEGORIES = 255  # HistGradientBoosting's limit of categories a feature; above it, codes are numbers


def expected_calibration_error(truth: np.ndarray, predicted: np.ndarray, bins: int = BINS, equal_mass: bool = False) -> float:
    """The expected calibration error (Naeini et al. 2015): over ``bins`` equal-width bins of the
    predicted probability on [0, 1] (``equal_mass``: bins of as many rows each, ordered by the
    prediction, the adaptive ECE of Nixon et al. 2019), the share of rows in each bin times the
    gap between their mean probability and the share of them that are positive, summed.
    ``truth`` (0/1) and ``predicted`` have shape (rows,); nan without rows. 0 for a calibrated
    model on many rows."""
    if len(truth) == 0:
        return float("nan")
    predicted = np.clip(predicted.astype(np.float64), 0, 1)
    if equal_mass:
        bin_of = np.empty(len(predicted), dtype=int)
        bin_of[np.argsort(predicted, kind="stable")] = np.arange(len(predicted)) * bins // len(predicted)
    else:
        bin_of = np.minimum((predicted * bins).astype(int), bins - 1)  # 1.0 falls in the last bin
    rows = np.bincount(bin_of, minlength=bins)
    gaps = np.bincount(bin_of, weights=predicted, minlength=bins) - np.bincount(bin_of, weights=truth.astype(np.float64), minlength=bins)
    return float(np.abs(gaps).sum() / rows.sum())


def _isotonic(truth: np.ndarray, scores: np.ndarray) -> Any:  # sklearn is untyped
    """Isotonic regression of the truth on the scores, clipped to [0, 1] (NannyML's calibrator)."""
    from sklearn.isotonic import IsotonicRegression

    return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores.astype(np.float64), truth.astype(np.float64))


def needs_calibration(truth: np.ndarray, scores: np.ndarray, seed: int, splits: int = CALIBRATION_SPLITS) -> bool:
    """Whether isotonic calibration lowers the expected calibration error of ``scores`` on rows it
    was not fitted on (NannyML's check): mean ECE over ``splits`` stratified shuffle splits (90%
    fit, 10% held out, seeded) of the calibrated scores against the raw ones. The ECE here has
    bins of equal mass: with a rare class every score sits in the lowest equal-width bins, which
    hide an under-confident model (measured: a 3% class whose scores stay under 0.15 at ROC AUC
    0.94 was left uncalibrated and estimated at 0.74). False for one class or a perfect ranking
    (nothing to learn; NannyML says the same)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedShuffleSplit

    if np.unique(truth).size < 2 or roc_auc_score(truth, scores) == 1:
        return False
    raw, calibrated = [], []
    for fit, held in StratifiedShuffleSplit(n_splits=splits, test_size=0.1, random_state=seed).split(scores, truth):
        raw.append(expected_calibration_error(truth[held], scores[held], equal_mass=True))
        calibrated.append(expected_calibration_error(truth[held], _isotonic(truth[fit], scores[fit]).predict(scores[held].astype(np.float64)), equal_mass=True))
    return float(np.mean(calibrated)) < float(np.mean(raw))


def expected_roc_auc(probability: np.ndarray) -> float:
    """CBPE's ROC AUC of rows whose chance of being positive is ``probability`` (shape (rows,)):
    the area under the expected ROC curve, computed as the weighted Mann-Whitney statistic of each
    row taken as a positive of weight p and as a negative of weight 1 - p, ranked by p. Nan when
    every p is 0 or every p is 1 (no expected positive or negative)."""
    doubled = np.concatenate([probability, probability]).astype(np.float64)
    truth = np.concatenate([np.ones(len(probability)), np.zeros(len(probability))])
    weights = np.concatenate([probability, 1 - probability]).astype(np.float64)[None, :]
    return float(bootstrap.roc_auc(truth, doubled, weights)[0])


def expected_confusion(probability: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """Expected true positives, false positives and false negatives of the cut ``scores >=
    threshold`` when row i is positive with chance ``probability[i]``."""
    called = scores >= threshold
    return float(probability[called].sum()), float((1 - probability[called]).sum()), float(probability[~called].sum())


def cbpe(metric: str, reference_truth: np.ndarray, reference_scores: np.ndarray, scores: np.ndarray, threshold: float, seed: int) -> Record:
    """CBPE's estimate of ``metric`` (a classification metric of ``bootstrap.CLASSIFICATION``) on
    rows scored ``scores`` (shape (rows,)), learnt from the reference's ``reference_truth`` (0/1)
    and ``reference_scores``; ``threshold`` is the served cut (f1, precision, recall). Returns
    ``value`` (None where undefined), ``method``, ``rows``, ``calibrated`` (whether the scores
    were calibrated). ``KeyError`` for another metric."""
    if metric not in bootstrap.CLASSIFICATION:
        raise KeyError(f"CBPE estimates {', '.join(bootstrap.CLASSIFICATION)}, not {metric!r}")
    scores = scores.astype(np.float64)
    calibrated = needs_calibration(reference_truth, reference_scores.astype(np.float64), seed)
    p = _isotonic(reference_truth, reference_scores).predict(scores) if calibrated else np.clip(scores, 0, 1)
    if metric == "roc_auc":
        value = expected_roc_auc(p)
    elif metric == "log_loss":
        s = np.clip(scores, bootstrap.EPSILON, 1 - bootstrap.EPSILON)
        value = float(np.mean(-(p * np.log(s) + (1 - p) * np.log1p(-s)))) if len(s) else float("nan")
    else:
        tp, fp, fn = expected_confusion(p, scores, threshold)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = float({"precision": np.divide(tp, tp + fp), "recall": np.divide(tp, tp + fn), "f1": np.divide(2 * tp, 2 * tp + fp + fn)}[metric])
    return {"value": value if np.isfinite(value) else None, "method": CBPE, "rows": len(scores), "calibrated": calibrated}


def _design(dataset: DatasetConfig, frame: pd.DataFrame, categories: dict[str, pd.Index]) -> np.ndarray:
    """DLE's inputs: each feature (a category as its code among ``categories``, unknown or blank
    as missing; numbers as float64) and the prediction: shape (rows, features + 1)."""
    columns = []
    for feature in dataset.features:
        values = frame[feature.name]
        if feature.type == FeatureType.categorical:
            codes = pd.Categorical(values.astype("string"), categories=categories[feature.name]).codes.astype(np.float64)
            codes[codes < 0] = np.nan
            columns.append(codes)
        else:
            columns.append(pd.to_numeric(values, errors="coerce").to_numpy(np.float64))
    columns.append(frame[OUTPUT].to_numpy(np.float64))
    return np.column_stack(columns)


def dle(dataset: DatasetConfig, metric: str, reference: pd.DataFrame, window: pd.DataFrame, seed: int) -> Record:
    """DLE's estimate of ``metric`` (``rmse`` or ``mae``) on the ``window``'s rows (features and
    ``prediction``), from a loss model fitted on the ``reference`` (features, the label column,
    ``prediction``; ``pipelines.feedback.reference``). Returns ``value``, ``method``, ``rows``.
    ``KeyError`` for another metric."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    if metric not in bootstrap.REGRESSION:
        raise KeyError(f"DLE estimates {', '.join(bootstrap.REGRESSION)}, not {metric!r}")
    categorical = dataset.columns_of(FeatureType.categorical)
    categories = {c: pd.Index(reference[c].dropna().astype("string").unique()) for c in categorical}
    mask = [f.type == FeatureType.categorical and len(categories[f.name]) <= MAX_CATEGORIES for f in dataset.features] + [False]
    error = reference[dataset.label.column].to_numpy(np.float64) - reference[OUTPUT].to_numpy(np.float64)
    loss = error**2 if metric == "rmse" else np.abs(error)
    nanny = HistGradientBoostingRegressor(categorical_features=np.array(mask), random_state=seed)
    nanny.fit(_design(dataset, reference, categories), loss)
    predicted = np.clip(nanny.predict(_design(dataset, window, categories)), 0, None)  # a loss is never negative
    mean = float(predicted.mean()) if len(predicted) else float("nan")
    value = float(np.sqrt(mean)) if metric == "rmse" else mean
    return {"value": value if np.isfinite(value) else None, "method": DLE, "rows": len(window)}


def estimate(dataset: DatasetConfig, metric: str, reference: pd.DataFrame, window: pd.DataFrame, threshold: float, seed: int) -> Record:
    """``metric`` estimated on the ``window``'s served rows (features and ``prediction``) from the
    version's performance ``reference``: CBPE for a classifier, DLE for a regressor. Returns
    ``value``, ``method``, ``rows`` (and CBPE's ``calibrated``); ``{"value": None, "reason"}``
    for a window without rows or a reference without both classes."""
    if window.empty:
        return {"value": None, "reason": "no served rows in the window"}
    truth = reference[dataset.label.column].to_numpy(np.float64)
    if dataset.label.task == Task.classification:
        if np.unique(truth).size < 2:
            return {"value": None, "reason": f"the performance reference holds one class only ({len(truth)} rows): nothing to calibrate the scores on"}
        return cbpe(metric, truth, reference[OUTPUT].to_numpy(np.float64), window[OUTPUT].to_numpy(np.float64), threshold, seed)
    return dle(dataset, metric, reference, window, seed)
