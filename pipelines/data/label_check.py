"""The label check of a labelled batch: does the served model keep its skill on the batch's own labels?

Before a batch that passed validation joins the raw data, the champion (the version in service)
scores it with its ``model.onnx``, and its **skill** on the batch's labels is compared with its
skill on its own test split (the version's ``performance_reference.parquet``, written at publish:
``pipelines.feedback.reference``). Skill is scale-free, so a batch and a test split of other
base rates or spreads compare:

* classification: the Gini coefficient ``2 * ROC AUC - 1`` (0: no better than chance, 1: perfect);
* regression: ``R^2 = 1 - MSE / Var`` (0: no better than the batch's own mean label).

Shuffled, shifted or mis-joined labels leave a model about no skill; a real change in the world
(a new season, a new route) costs it some, not all. So a batch is **held** when even the upper
bound of its skill is below ``performance.label_check_min_skill`` times the test skill. The bound is
one-sided at level ``1 - performance.false_alarm_rate``: the normal bootstrap interval (Efron &
Tibshirani 1993, ch. 13) of ``performance.resamples`` resamples of the batch's rows, seeded by
``performance.seed``, with the weighted metrics of ``pipelines.evaluation.bootstrap``. The test
skill is taken as known: its split is usually many times the batch, and a batch is held only
below a quarter (by default) of it.

How many rows it takes: labels that carry no signal give a Gini of 0 give or take ``se``, about
``2 * sqrt((1/positives + 1/negatives) / 12)`` (the Mann-Whitney null), and are held when
``z * se`` falls below ``min_skill * G`` for a test Gini ``G`` (``z = 2.33`` at a false-alarm
rate of 1%). With ``G = 0.3``, 20% positives and the default 0.25: held half of the time from
about 2,000 rows, 95% of the time from about 6,000. A smaller batch passes unless its labels are
worse than chance.

The check is not run (and the batch ingested, with the reason recorded) when no version is
served, when the served version has no performance reference (published before it existed) or
does not fit the project's columns (changed since it was published), when the batch has fewer than ``MIN_ROWS`` labelled rows or one class only (its skill is
undefined), or when the champion has no skill on its own test split to lose.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.artifacts import MODEL_FILE, OUTPUT
from pipelines.config import DatasetConfig, PerformanceConfig, Task
from pipelines.evaluation import bootstrap
from pipelines.lineage import Record

PASSED, HELD, NOT_RUN, CONFIRMED = "passed", "held", "not run", "confirmed"
MIN_ROWS = 50  # fewer labelled rows: no check (a bootstrap of so few says nothing)
METHOD = "bootstrap of the batch's rows, one-sided normal interval"
MEASURES = {Task.classification: "gini", Task.regression: "r2"}
DEFINITIONS = {Task.classification: "2 * roc_auc - 1", Task.regression: "1 - mse / var"}


def skill(task: Task, truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The skill of ``predicted`` against ``truth`` (both shape (rows,)) per line of ``weights``
    (B, rows): shape (B,). Classification: Gini, ``2 * ROC AUC - 1`` (truth 0/1, predicted the
    probability of 1); regression: ``R^2 = 1 - MSE / Var``, the variance of the (weighted) truth
    around its own mean. Weights of ones give sklearn's ``2 * roc_auc_score - 1`` and ``r2_score``.
    Nan where a line holds one class, or a constant truth."""
    if task == Task.classification:
        gini: np.ndarray = 2 * bootstrap.roc_auc(truth, predicted, weights) - 1
        return gini
    centred = truth - truth.mean()  # the variance is shift-free; centring first keeps it exact
    total = weights.sum(axis=1)
    mean = (weights @ centred) / total
    variance = (weights @ centred**2) / total - mean**2
    error = (weights @ (truth - predicted.astype(np.float64)) ** 2) / total
    with np.errstate(invalid="ignore", divide="ignore"):
        r2: np.ndarray = np.where(variance > 0, 1 - error / np.where(variance > 0, variance, 1), np.nan)
    return r2


def resampled_skill(task: Task, truth: np.ndarray, predicted: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``skill`` on ``resamples`` bootstrap resamples of the rows (seeded by ``seed``): shape
    (resamples,), drawn in chunks of at most ``bootstrap.CHUNK_CELLS`` weights."""
    out = np.empty(resamples)
    for start, weights in bootstrap.weight_chunks(seed, len(truth), resamples):
        out[start : start + len(weights)] = skill(task, truth, predicted, weights)
    return out


def check(dataset: DatasetConfig, performance: PerformanceConfig, champion: Path | None, batch: pd.DataFrame) -> Record:
    """The label check of ``batch`` (typed as ``pipelines.data.schema.typed`` types it) against
    the served version whose folder is ``champion`` (None: nothing is served). Returns the
    evidence: ``status`` (``passed``, ``held`` or ``not run`` with its ``reason``), ``version``,
    ``measure`` and its ``definition``, ``rows`` (labelled rows of the batch), ``batch_skill``
    (``value``, the one-sided ``upper`` bound, ``confidence``, ``resamples``, ``seed``, ``method``),
    ``test_skill`` (``value``, ``rows``), ``floor`` (= ``min_skill`` * the test skill) and the
    ``rule`` in words. A version that takes or was tested on columns the project no longer has
    is not run against, with the reason."""
    label, task = dataset.label, dataset.label.task
    measure = MEASURES[task]
    evidence: Record = {
        "status": NOT_RUN,
        "reason": None,
        "version": int(champion.name) if champion is not None else None,
        "measure": measure,
        "definition": DEFINITIONS[task],
        "rows": int(batch[label.column].notna().sum()) if label.column in batch else 0,
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    def not_run(reason: str) -> Record:
        return evidence | {"reason": reason}

    if champion is None:
        return not_run("no version is served yet: there is no model to check the labels against")
    # Imported here: the first nights serve nothing, and the gate's imports cost seconds and memory.
    from pipelines.evaluation.gate import predict_onnx
    from pipelines.feedback.reference import PerformanceReferenceError, missing, read_reference

    try:
        reference = read_reference(champion, dataset)
    except PerformanceReferenceError as error:  # the project's columns changed since the version was published
        return not_run(f"version {champion.name} does not fit the project's columns: {error}")
    if reference is None:
        return not_run(missing(int(champion.name)))
    labelled = batch[batch[label.column].notna()].reset_index(drop=True)
    truth = labelled[label.column].to_numpy("float64")
    if len(labelled) < MIN_ROWS:
        return not_run(f"{len(labelled)} labelled rows, fewer than {MIN_ROWS}: too few to tell labels that carry no signal from chance")
    if np.unique(truth).size < 2:
        kind = "one class" if task == Task.classification else "one value"
        return not_run(f"the labels hold {kind} only ({truth[0]:g}): {measure} is undefined on them")
    known = reference[reference[label.column].notna()]
    test = float(skill(task, known[label.column].to_numpy("float64"), known[OUTPUT].to_numpy("float64"), np.ones((1, len(known))))[0])
    if not test > 0:
        return not_run(f"version {champion.name} has no skill on its own test split ({measure} {test:.4f}): it has none to lose on these labels")

    try:
        predicted = predict_onnx(champion / MODEL_FILE, labelled).astype(np.float64)
    except KeyError as error:
        return not_run(f"version {champion.name} does not fit the project's columns: {error.args[0]}")
    observed = float(skill(task, truth, predicted, np.ones((1, len(truth))))[0])
    resampled = resampled_skill(task, truth, predicted, performance.resamples, performance.seed)
    confidence = 1 - performance.false_alarm_rate
    _, upper = bootstrap.normal_interval(observed, resampled, 1 - 2 * performance.false_alarm_rate)  # its upper bound is one-sided at `confidence`
    floor = performance.label_check_min_skill * test
    held = upper < floor
    rule = (
        f"held when the upper bound of the batch's {measure} ({confidence:.0%} one-sided) is below "
        f"performance.label_check_min_skill {performance.label_check_min_skill:g} x the version's test {measure}"
    )
    return evidence | {
        "status": HELD if held else PASSED,
        "batch_skill": {
            "value": observed, "upper": upper, "confidence": confidence,
            "resamples": performance.resamples, "seed": performance.seed, "method": METHOD,
        },
        "test_skill": {"value": test, "rows": len(known)},
        "min_skill": performance.label_check_min_skill,
        "floor": floor,
        "rule": rule,
    }


def describe(evidence: Record) -> str:
    """One line of a check's outcome: the skills, the bound and the floor, or why it was not run."""
    if evidence["status"] in (NOT_RUN, CONFIRMED):
        return f"label check {evidence['status']}: {evidence['reason']}"
    measure, batch, test = evidence["measure"], evidence["batch_skill"], evidence["test_skill"]
    return (
        f"label check {evidence['status']}: version {evidence['version']} has {measure} {batch['value']:.4f} on the batch's "
        f"{evidence['rows']:,} labelled rows (at most {batch['upper']:.4f}, {batch['confidence']:.0%} one-sided, "
        f"{batch['resamples']} resamples) against {test['value']:.4f} on its test split; the floor is "
        f"{evidence['min_skill']:g} x {test['value']:.4f} = {evidence['floor']:.4f}"
    )
