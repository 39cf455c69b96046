"""The decision threshold of a classifier: the cut of its probability that the served ``label`` makes.

Chosen on the validation split (never the test split, which the gate scores), from
scikit-learn's ``precision_recall_curve``: every distinct validation probability is a candidate
threshold ``t``, a row is predicted positive when its probability is ``>= t``. Per
``gate.threshold.objective``:

* ``f1``: the threshold of the best F1 (the lowest such threshold on a tie);
* ``precision``: among thresholds whose precision is at least ``target``, the best recall
  (then the best precision);
* ``recall``: among thresholds whose recall is at least ``target``, the best precision
  (then the best recall).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pipelines.config import DecisionThreshold, ThresholdObjective
from pipelines.errors import NotRetryable
from pipelines.lineage import Record


class ThresholdError(NotRetryable, ValueError):
    """No threshold can be chosen on the validation split: one class only, or the target is out of reach."""


def choose(truth: npt.NDArray[np.integer], probability: npt.NDArray[np.floating], setting: DecisionThreshold) -> Record:
    """The threshold ``setting`` asks for, from the validation rows' ``truth`` (shape (rows,),
    0 or 1) and predicted ``probability`` of class 1 (shape (rows,)).

    Returns ``{"value", "objective", "target", "validation": {"precision", "recall", "f1",
    "rows"}}``: ``value`` is one of the given probabilities (so a float32 probability compares
    with it exactly), the validation scores are those of ``probability >= value``.

    ``ThresholdError`` when ``truth`` holds fewer than two classes, or no threshold reaches the
    target (the message names the target and the best that is reachable).
    """
    from sklearn.metrics import precision_recall_curve

    rows = len(truth)
    classes = np.unique(truth)
    if len(classes) < 2:
        held = f"only class {classes[0]}" if len(classes) else "no labelled rows"
        raise ThresholdError(f"the validation split holds {held} ({rows} rows): a decision threshold needs both classes to be chosen")
    # The last point of the curve (precision 1, recall 0) has no threshold.
    precision, recall, thresholds = (np.asarray(a) for a in precision_recall_curve(truth, probability))
    precision, recall = precision[:-1], recall[:-1]
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0)
    objective, target = setting.objective, setting.target
    if objective == ThresholdObjective.f1:
        best = int(np.argmax(f1))
    else:
        kept, traded = (precision, recall) if objective == ThresholdObjective.precision else (recall, precision)
        assert target is not None  # DecisionThreshold requires it with these objectives
        eligible = np.flatnonzero(kept >= target)
        if not len(eligible):
            raise ThresholdError(
                f"no threshold reaches {objective.value} >= {target:g} on the {rows} validation rows: the best reachable {objective.value} is {kept.max():.4f}; lower gate.threshold.target"
            )
        best = int(eligible[np.lexsort((kept[eligible], traded[eligible]))[-1]])  # the best traded, then the best kept
    return {
        "value": float(thresholds[best]),
        "objective": objective.value,
        "target": target,
        "validation": {"precision": float(precision[best]), "recall": float(recall[best]), "f1": float(f1[best]), "rows": rows},
    }
