"""The decision threshold chosen on validation scores, against a brute-force scan of every cut."""

import numpy as np
import pytest

from pipelines.config import DecisionThreshold
from pipelines.errors import NotRetryable
from pipelines.evaluation.threshold import ThresholdError, choose


def scores(rows: int = 3000, seed: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """Seeded validation rows: a rare positive class (about 20%) and float32 probabilities that
    rank it better than chance, rounded so that many rows tie on a score."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(rows) < 0.2).astype(int)
    logit = 1.5 * truth - 1.5 + rng.normal(0, 1.2, rows)
    return truth, np.round(1 / (1 + np.exp(-logit)), 3).astype(np.float32)


def scan(truth: np.ndarray, probability: np.ndarray) -> list[tuple[float, float, float, float]]:
    """(threshold, precision, recall, F1) of ``probability >= threshold``, for every distinct score."""
    cuts = []
    for t in np.unique(probability):
        predicted = probability >= t
        tp = int(np.sum(predicted & (truth == 1)))
        precision, recall = tp / int(predicted.sum()), tp / int((truth == 1).sum())
        cuts.append((float(t), precision, recall, 2 * precision * recall / (precision + recall) if tp else 0.0))
    return cuts


def test_the_f1_objective_picks_the_cut_of_the_best_f1_and_reports_its_validation_scores():
    truth, probability = scores()

    chosen = choose(truth, probability, DecisionThreshold())

    cuts = scan(truth, probability)
    best = max(f1 for _, _, _, f1 in cuts)
    assert chosen["validation"]["f1"] == pytest.approx(best)
    assert chosen["value"] == min(t for t, _, _, f1 in cuts if f1 == pytest.approx(best))  # the lowest of equal cuts
    (t, precision, recall, f1) = next(c for c in cuts if c[0] == chosen["value"])  # one of the scores: float32 cuts it exactly
    assert chosen["validation"] == pytest.approx({"precision": precision, "recall": recall, "f1": f1, "rows": len(truth)})
    assert (chosen["objective"], chosen["target"]) == ("f1", None)
    assert chosen["value"] != 0.5  # the data were made for a cut elsewhere: 20% positives


@pytest.mark.parametrize(("objective", "target"), [("precision", 0.5), ("precision", 0.7), ("recall", 0.6), ("recall", 0.9)])
def test_a_precision_or_recall_objective_keeps_its_target_with_the_best_of_the_other(objective, target):
    truth, probability = scores()

    chosen = choose(truth, probability, DecisionThreshold(objective=objective, target=target))

    kept, traded = (1, 2) if objective == "precision" else (2, 1)  # positions in a scanned cut
    eligible = [c for c in scan(truth, probability) if c[kept] >= target]
    best = max(eligible, key=lambda c: (c[traded], c[kept]))
    assert chosen["value"] == best[0]
    assert chosen["validation"][objective] >= target
    assert chosen["validation"][objective] == pytest.approx(best[kept])
    assert (chosen["objective"], chosen["target"]) == (objective, target)


def test_an_unreachable_target_names_it_and_the_best_reachable_value():
    truth, probability = scores()
    probability[np.argmax(probability)], truth[np.argmax(probability)] = 1.0, 0  # a negative scores highest: no cut is all positives
    reachable = max(precision for _, precision, _, _ in scan(truth, probability))

    with pytest.raises(ThresholdError, match=rf"no threshold reaches precision >= 0\.99 on the 3000 validation rows: the best reachable precision is {reachable:.4f}") as error:
        choose(truth, probability, DecisionThreshold(objective="precision", target=0.99))

    assert isinstance(error.value, NotRetryable)  # the same split would fail again: no retries


@pytest.mark.parametrize("only", [0, 1])
def test_a_validation_split_with_one_class_is_a_clear_error(only):
    truth, probability = scores(rows=200)

    with pytest.raises(ThresholdError, match=rf"the validation split holds only class {only} \(200 rows\): a decision threshold needs both classes"):
        choose(np.full_like(truth, only), probability, DecisionThreshold())
