"""The gate: challenger and champion scored on the same test split; only a model better beyond
noise, and worse on no slice beyond noise, passes.

Both are scored from their ONNX files with ONNX Runtime, the artifact that is (or would be)
served, so the comparison is of what clients get, not of two different code paths.

Retraining on the same data with another seed moves ROC AUC by about 0.015, so a difference of
point estimates on one test split is a coin flip. The gate estimates the difference (challenger -
champion in ``gate.metric``, signed so that positive is better) with a paired bootstrap of the
test rows and its normal interval (``pipelines.evaluation.bootstrap``; Efron & Tibshirani 1993,
ch. 13), widened by the seed-to-seed noise of training (``gate.seed_noise``, which resampling the
test rows cannot see; ``flywheel seed-noise`` measures it), and promotes only when the
interval's lower bound clears ``gate.min_improvement``. On
each slice (a value of a categorical feature with ``gate.min_slice_rows`` test rows, or a
configured ``gate.slices`` query) it refuses a challenger whose interval lies wholly below
``-gate.max_slice_regression``, at a Bonferroni-adjusted level so that many slices do not refuse
by chance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import tracking
from pipelines.config import LOWER_IS_BETTER, ConfigError, DatasetConfig, FeatureType, GateConfig, Label, ProjectConfig, Task
from pipelines.evaluation import bootstrap
from pipelines.lineage import Record

log = logging.getLogger(__name__)
PROMOTED, NOT_PROMOTED = "promoted", "not promoted"
METHOD = "paired bootstrap, normal interval"
DEFAULT_THRESHOLD = 0.5  # the cut of a model exported without a chosen threshold


class SliceError(ConfigError):
    """A ``gate.slices`` query that does not run on the test split (bad syntax, an unknown column)."""


def check_override(force_publish: bool, force_reason: str | None) -> None:
    """Refuse a forced publish that does not say why: the reason goes into the lineage."""
    if force_publish and not (force_reason or "").strip():
        raise ValueError("force_publish is set but force_reason is empty: say why the gate is overridden")


def metrics(task: Task, truth: np.ndarray, predicted: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Classification: ROC AUC, log loss, and F1, precision and recall of ``predicted >=
    threshold``; regression: RMSE and MAE. ``truth`` and ``predicted`` have shape (rows,); a
    probability of the positive class is predicted for a classification. A metric the rows leave
    undefined is nan (ROC AUC of one class, precision with no row called positive)."""
    names = bootstrap.CLASSIFICATION if task == Task.classification else bootstrap.REGRESSION
    ones = np.ones((1, len(truth)))
    return {name: float(bootstrap.weighted(name, truth, predicted, ones, threshold)[0]) for name in names}


def predict_onnx(model_file: Path, frame: pd.DataFrame) -> np.ndarray:
    """Score raw rows with an exported model, feeding each input the graph asks for: its
    ``prediction``, shape (rows,). ``KeyError`` when ``frame`` lacks a column the model takes."""
    import onnxruntime as ort

    from pipelines.artifacts import OUTPUT

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in frame.columns:
            raise KeyError(f"{model_file} needs column {spec.name!r}, which the rows to score do not have")
        column = frame[spec.name]
        values = column.astype(str).to_numpy(object) if spec.type == "tensor(string)" else column.to_numpy("float32")
        feeds[spec.name] = values.reshape(-1, 1)
    out: np.ndarray
    (out,) = session.run([OUTPUT], feeds)  # a classifier also answers its `label`
    return out[:, 0]


def beats(metric: str, challenger: float, champion: float, margin: float) -> bool:
    """Whether ``challenger`` is better than ``champion`` by at least ``margin`` in the metric's
    direction. A tie is never better, whatever the margin: a challenger equal to the champion
    (the same model retrained on the same data) is not promoted."""
    gain = champion - challenger if metric in LOWER_IS_BETTER else challenger - champion
    return gain > 0 and gain >= margin


def passes_floor(metric: str, value: float, floor: float) -> bool:
    return value <= floor if metric in LOWER_IS_BETTER else value >= floor


def score(label: Label, test: pd.DataFrame, model_file: Path, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """``metrics`` of an exported model on the labelled rows of ``test`` against their ``label.column``."""
    labelled = test[test[label.column].notna()]
    return metrics(label.task, labelled[label.column].to_numpy("float64"), predict_onnx(model_file, labelled), threshold)


@dataclass(frozen=True)
class Scored:
    """One model's predictions on the labelled test rows, shape (rows,), and its decision
    threshold: the one chosen at its export (``source`` "export") or ``DEFAULT_THRESHOLD``."""

    predicted: np.ndarray
    threshold: float = DEFAULT_THRESHOLD
    source: str = "default"


def threshold_of(export: Record | None) -> tuple[float, str]:
    """A classifier's decision threshold and where it comes from, given its export record
    (a candidate's ``export.json``, a version's lineage ``export``): ``(value, "export")``, or
    ``(0.5, "default")`` for a model exported before thresholds were chosen."""
    value = ((export or {}).get("threshold") or {}).get("value")
    return (float(value), "export") if isinstance(value, int | float) else (DEFAULT_THRESHOLD, "default")


def slices(dataset: DatasetConfig, gate: GateConfig, test: pd.DataFrame) -> dict[str, np.ndarray]:
    """The slices of the (labelled) ``test`` rows, by name, each an array of row positions: every
    value of a categorical feature with at least ``gate.min_slice_rows`` rows (``carrier=UA``),
    then every ``gate.slices`` query (a ``DataFrame.query`` expression over the test columns).
    ``SliceError`` names a query that does not run (syntax, an unknown column, not a condition)
    or a name taken by a categorical slice."""
    found: dict[str, np.ndarray] = {}
    for column in dataset.columns_of(FeatureType.categorical):
        codes, values = pd.factorize(test[column])  # a blank is -1: no slice
        counts = np.bincount(codes[codes >= 0], minlength=len(values))
        for code in sorted(np.flatnonzero(counts >= gate.min_slice_rows), key=lambda c: str(values[c])):
            found[f"{column}={values[code]}"] = np.flatnonzero(codes == code)
    positions = test.reset_index(drop=True)  # a query's index: the row positions
    for name, query in gate.slices.items():
        if name in found:
            raise SliceError(f"gate.slices names {name!r}, the name of a categorical slice; give the query {query!r} another name")
        columns = ", ".join(map(str, test.columns))
        try:
            # no local or global names: a query reads the test split's columns and nothing else
            chosen = positions.eval(query, local_dict={}, global_dict={})
        except Exception as error:  # noqa: BLE001 - pandas raises many kinds; all mean the query is wrong
            raise SliceError(f"gate.slices.{name}: the query {query!r} does not run on the test split ({type(error).__name__}: {str(error)[:200]}); its columns are {columns}") from error
        if not (isinstance(chosen, pd.Series) and pd.api.types.is_bool_dtype(chosen)):
            raise SliceError(f"gate.slices.{name}: the query {query!r} is not a condition (true or false for each test row); its columns are {columns}")
        found[name] = np.flatnonzero(chosen.to_numpy())
    return found


def _finite(value: float) -> float | None:
    """JSON has no nan: an undefined metric is recorded as null."""
    return value if np.isfinite(value) else None


def _metrics_record(task: Task, truth: np.ndarray, model: Scored) -> Record:
    """A model's ``metrics`` as the decision records them; a classifier's with its threshold."""
    values: Record = {name: _finite(value) for name, value in metrics(task, truth, model.predicted, model.threshold).items()}
    if task == Task.classification:
        values |= {"threshold": model.threshold, "threshold_source": model.source}
    return values


def _percent(level: float) -> str:
    return f"{100 * level:.4g}%"


def compare(gate: GateConfig, task: Task, truth: np.ndarray, challenger: Scored, champion: Scored, groups: dict[str, np.ndarray]) -> Record:
    """The paired comparison of challenger and champion on the test rows (``truth``, predictions
    of shape (rows,)) and on each slice in ``groups`` (name -> row positions).

    Returns ``difference`` (challenger - champion in ``gate.metric``, positive is better, so
    negated for metrics in ``LOWER_IS_BETTER``), its ``interval`` (``low``, ``high``) at
    ``confidence``, ``resamples``, ``seed``, ``method``, and ``slices``: per slice its ``rows``,
    both models' metric, the difference and its interval at ``slice_confidence`` (Bonferroni:
    1 - (1 - confidence) / the number of slices scored), and ``refused`` when the interval's
    upper bound is below ``-gate.max_slice_regression``. A slice where the metric is undefined
    (ROC AUC of one class, no rows) is not scored: ``skipped`` says why.
    """
    metric, thresholds = gate.metric, (challenger.threshold, champion.threshold)

    def observed(members: np.ndarray) -> tuple[float, float]:
        ones = np.ones((1, len(members)))
        ours, theirs = (bootstrap.weighted(metric, truth[members], m.predicted[members], ones, t)[0] for m, t in zip((challenger, champion), thresholds))
        return float(ours), float(theirs)

    table: list[Record] = []
    scored: dict[str, np.ndarray] = {}
    for name, members in groups.items():
        row: Record = {"slice": name, "rows": len(members), "challenger": None, "champion": None, "difference": None, "interval": None, "refused": False, "skipped": None}
        if len(members) == 0:
            row["skipped"] = "no test rows"
        else:
            ours, theirs = observed(members)
            row |= {"challenger": _finite(ours), "champion": _finite(theirs)}
            if np.isfinite(ours) and np.isfinite(theirs):
                scored[name] = members
            else:
                classes = np.unique(truth[members])
                only = f"only class {classes[0]:g} in its {len(members)} rows: " if task == Task.classification and classes.size == 1 else ""
                row["skipped"] = f"{only}{metric} is undefined"
        table.append(row)

    everything = np.arange(len(truth))
    differences = bootstrap.paired_differences(metric, truth, challenger.predicted, champion.predicted, [everything, *scored.values()], gate.resamples, gate.seed, thresholds)
    ours, theirs = observed(everything)
    difference = float(bootstrap.improvement(metric, ours, theirs))
    low, high = bootstrap.normal_interval(difference, differences[0], gate.confidence, gate.seed_noise)
    slice_confidence = 1 - (1 - gate.confidence) / len(scored) if scored else None
    by_name = dict(zip(scored, differences[1:]))
    for row in table:
        if row["skipped"] is not None:
            continue
        observed_difference = float(bootstrap.improvement(metric, row["challenger"], row["champion"]))
        slice_low, slice_high = bootstrap.normal_interval(observed_difference, by_name[row["slice"]], slice_confidence or gate.confidence, gate.seed_noise)
        if not np.isfinite(slice_high):
            row["skipped"] = f"{metric} is undefined in all but a few resamples of its {row['rows']} rows"
            continue
        row |= {"difference": observed_difference, "interval": {"low": slice_low, "high": slice_high}, "refused": slice_high < -gate.max_slice_regression}
    return {
        "difference": difference,
        "interval": {"low": low, "high": high},
        "confidence": gate.confidence,
        "resamples": gate.resamples,
        "seed": gate.seed,
        "seed_noise": gate.seed_noise,
        "method": METHOD,
        "slice_confidence": slice_confidence,
        "slices": table,
    }


def _slice_refusal(gate: GateConfig, comparison: Record) -> str | None:
    """Why the slices refuse the challenger (the worst refused slice, then the others), or None."""
    refused = sorted((s for s in comparison["slices"] if s["refused"]), key=lambda s: s["interval"]["high"])
    if not refused:
        return None
    worst, scored = refused[0], sum(s["skipped"] is None for s in comparison["slices"])
    text = (
        f"worse on {worst['slice']}: {gate.metric} {worst['challenger']:.4f} vs the champion's {worst['champion']:.4f}, difference "
        f"{worst['difference']:+.4f} [{worst['interval']['low']:.4f}, {worst['interval']['high']:.4f}] "
        f"({_percent(comparison['slice_confidence'])}, Bonferroni over {scored} slices), beyond max_slice_regression {gate.max_slice_regression:g}"
    )
    if len(refused) > 1:
        text += f"; also worse on {', '.join(s['slice'] for s in refused[1:])}"
    return text


def _verdict(gate: GateConfig, challenger: Record, champion: Record | None, comparison: Record | None) -> tuple[bool, str]:
    metric, ours = gate.metric, challenger[gate.metric]
    if not passes_floor(metric, ours, gate.floor):
        return False, f"{metric} {ours:.4f} does not pass the floor {gate.floor:g}"
    if champion is None:
        return True, f"no champion yet; {metric} {ours:.4f} passes the floor {gate.floor:g}"
    if comparison is None:
        return False, f"{metric} {ours:.4f} vs the champion's {champion[metric]:.4f} on point estimates only: the gate promotes over a champion only on the interval of a paired comparison"
    low, high = comparison["interval"]["low"], comparison["interval"]["high"]
    said = (
        f"{metric} {ours:.4f} vs the champion's {champion[metric]:.4f}: {comparison['difference']:+.4f} [{low:.4f}, {high:.4f}] "
        f"({_percent(comparison['confidence'])}, {comparison['resamples']} paired resamples, "
        f"{'seed noise ' + format(gate.seed_noise, 'g') if gate.seed_noise else 'seed noise not set: flywheel seed-noise measures it'})"
    )
    clears = low > 0 and low >= gate.min_improvement  # False for a nan bound
    if gate.min_improvement == 0:
        said += f"; lower bound {'is' if clears else 'is not'} above 0"
    else:
        said += f"; lower bound {'clears' if clears else 'does not clear'} min_improvement {gate.min_improvement:g}"
    refusal = _slice_refusal(gate, comparison)
    if refusal:
        return False, f"{said}; but {refusal}" if clears else f"{said}; also {refusal}"
    if clears:
        scored = sum(s["skipped"] is None for s in comparison["slices"])
        said += f"; no slice worse beyond max_slice_regression {gate.max_slice_regression:g} ({scored} slices)" if scored else ""
    return clears, said


def decide(
    gate: GateConfig,
    challenger: Record,
    champion: Record | None,
    force_publish: bool = False,
    force_reason: str | None = None,
    comparison: Record | None = None,
) -> Record:
    """The gate's verdict on a challenger's test ``metrics`` against the champion's (None: no
    champion yet): it must pass ``gate.floor`` and, over a champion, the lower bound of the
    interval of the difference in ``comparison`` (``compare``) must clear ``gate.min_improvement``
    (and be above 0), with no slice refused, unless forced. Without a ``comparison`` (metrics
    alone, no rows to resample) a champion is never beaten. Returns the decision, the reason,
    the metric, whether it was forced, both sets of metrics and the ``comparison``'s fields
    (null without one); ``ValueError`` for a forced publish without a reason."""
    check_override(force_publish, force_reason)
    promoted, reason = _verdict(gate, challenger, champion, comparison)
    return _decision(gate, promoted, reason, challenger, champion, comparison, force_publish, force_reason)


def _decision(
    gate: GateConfig,
    promoted: bool,
    reason: str,
    challenger: Record,
    champion: Record | None,
    comparison: Record | None,
    force_publish: bool,
    force_reason: str | None,
) -> Record:
    if force_publish and not promoted:
        promoted, reason = True, f"forced: {(force_reason or '').strip()} (the gate said: {reason})"
    empty = dict.fromkeys(("difference", "interval", "confidence", "resamples", "seed", "seed_noise", "method", "slice_confidence"), None) | {"slices": []}
    decision = {
        "decision": PROMOTED if promoted else NOT_PROMOTED,
        "reason": reason,
        "metric": gate.metric,
        "forced": force_publish,
        "challenger": challenger,
        "champion": champion,
        **(comparison or empty),
    }
    log.info("gate: %s (%s)", decision["decision"], reason)
    return decision


def judge(
    gate: GateConfig,
    task: Task,
    truth: np.ndarray,
    challenger: Scored,
    champion: Scored | None,
    groups: dict[str, np.ndarray] | None = None,
    force_publish: bool = False,
    force_reason: str | None = None,
) -> Record:
    """The decision on a challenger from the labelled test rows: ``truth`` and both models'
    predictions have shape (rows,), ``groups`` are the slices (``slices``). Metrics of both
    (classifiers' at their own thresholds), the paired ``compare`` over a champion, then ``decide``.

    A classifier's test split holding one class only is a not-promoted decision, not an error:
    ROC AUC is undefined there and no comparison of classifiers on it means anything, the reason
    says so and what to fix, and the decision reaches the lineage, the Models page and the
    rejections-in-a-row alert like any refusal (and a forced publish can still override it).
    ``ValueError`` for a forced publish without a reason."""
    check_override(force_publish, force_reason)
    ours = _metrics_record(task, truth, challenger)
    theirs = _metrics_record(task, truth, champion) if champion else None
    if task == Task.classification and (classes := np.unique(truth)).size < 2:
        held = f"only class {classes[0]:g} ({len(truth)} labelled rows)" if classes.size else "no labelled rows"
        reason = (
            f"the test split holds {held}: roc_auc is undefined, and precision and recall say nothing of the other class; "
            "no comparison of classifiers on it means anything: check split.test, the time column and the labels of the newest rows"
        )
        return _decision(gate, False, reason, ours, theirs, None, force_publish, force_reason)
    comparison = compare(gate, task, truth, challenger, champion, groups or {}) if champion else None
    return decide(gate, ours, theirs, force_publish, force_reason, comparison)


def evaluate(config: ProjectConfig, candidate: str, force_publish: bool = False, force_reason: str | None = None) -> Record:
    """Gate the ``candidate`` folder (relative to the home) against the version in service, if
    any, both scored from their ``model.onnx`` on the labelled rows of the test split at their
    own decision thresholds (the candidate's ``export.json``, the version's ``lineage.json``;
    ``judge``). The decision, with ``test_rows`` and ``champion_version``, is also written to the
    candidate's ``gate.json``. A test split of one class is a not-promoted decision (``judge``);
    ``SliceError`` for a ``gate.slices`` query that does not run, before any model is scored."""
    from pipelines.artifacts import MODEL_FILE
    from pipelines.data.split import split_paths
    from pipelines.lineage import read_json, write_json
    from pipelines.serving.repository import lineage_of, served_version

    check_override(force_publish, force_reason)
    label, folder = config.dataset.label, config.path(Path(candidate))
    test = pd.read_parquet(split_paths(config.split.output_dir)["test"])
    labelled = test[test[label.column].notna()].reset_index(drop=True)
    groups = slices(config.dataset, config.gate, labelled)
    export_file = folder / "export.json"
    challenger = Scored(predict_onnx(folder / MODEL_FILE, labelled), *threshold_of(read_json(export_file) if export_file.is_file() else None))
    champion_version = served_version(config.model_dir)
    champion = None
    if champion_version:
        try:
            exported = lineage_of(config.model_dir, champion_version).get("export")
        except FileNotFoundError:
            exported = None
        champion = Scored(predict_onnx(config.model_dir / str(champion_version) / MODEL_FILE, labelled), *threshold_of(exported))
    decision = judge(config.gate, label.task, labelled[label.column].to_numpy("float64"), challenger, champion, groups, force_publish, force_reason)
    decision |= {"test_rows": len(test), "champion_version": champion_version}
    write_json(folder / "gate.json", decision)
    tracking.log_decision(folder, decision, config.tracking.timeout_s)
    return decision
