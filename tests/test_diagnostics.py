"""summary.json's `diagnostics`: degenerate models, the plateau, stability, in words."""

import math

import numpy as np
import pytest
import torch

from snowfed.diagnostics import DEGENERATE_SHARE, STABLE_RANGE, UNDECIDED_SHARE, diagnose, verdict
from snowfed.evaluation import evaluate
from snowfed.metrics import Confusion, classification_metrics
from snowfed.rundir import build_summary


def _seg(f1: float, predicted_fg: float, round_: int, truth_fg: float = 0.2) -> dict:
    """A segmentation record over 10_000 pixels with the given predicted foreground share."""
    total = 10_000
    positives, predicted = int(truth_fg * total), int(predicted_fg * total)
    tp = min(positives, predicted)
    return {"round": round_, "f1": f1, "tp": tp, "fp": predicted - tp, "fn": positives - tp,
            "tn": total - positives - (predicted - tp)}


def test_a_model_predicting_no_foreground_is_degenerate_and_counts_as_plateau():
    history = [_seg(0.3, 0.5, 0)] + [_seg(0.0, 0.0, r) for r in (1, 2, 3)]
    d = diagnose(history)
    assert d["degenerate"] is True
    assert d["plateau_rounds"] == 3
    assert "no foreground" in verdict(d)


def test_the_plateau_ends_at_the_first_round_with_foreground_predicted():
    history = [_seg(0.3, 0.5, 0), _seg(0.0, 0.0, 1), _seg(0.0, 0.001, 2),
               *(_seg(0.8, 0.18, r) for r in range(3, 9))]
    d = diagnose(history)
    assert d == {**d, "degenerate": False, "plateau_rounds": 2, "stable": True}
    assert verdict(d).startswith("settled") and "first 2 rounds" in verdict(d)


def test_foreground_everywhere_is_degenerate_too_but_an_empty_test_set_is_not():
    assert diagnose([_seg(0.3, 1.0, 1)])["degenerate"] is True
    # nothing to find and nothing predicted: the right answer, not a collapse
    assert diagnose([_seg(1.0, 0.0, 1, truth_fg=0.0)])["degenerate"] is False
    just_above = DEGENERATE_SHARE * 1.5
    assert diagnose([_seg(0.1, just_above, 1)])["degenerate"] is False


def test_stability_looks_at_the_last_quarter_of_rounds_at_least_two():
    swinging = [_seg(f1, 0.2, r) for r, f1 in enumerate([0.3, 0.8, 0.85, 0.4, 0.9, 0.45, 0.9], 0)]
    d = diagnose(swinging)
    assert d["window_rounds"] == 2 and d["stable"] is False
    assert math.isclose(d["window_range"], 0.45)
    assert verdict(d) == "not converged: F1 still moving ±0.23 over the last 2 rounds"
    late = [_seg(0.9 - (r == 12) * STABLE_RANGE * 2, 0.2, r) for r in range(0, 13)]
    assert diagnose(late)["window_rounds"] == 3 and diagnose(late)["stable"] is False
    assert diagnose(late[:-1])["stable"] is True


def test_an_unsettled_model_undecided_on_most_foreground_pixels_is_said_to_be():
    swinging = [_seg(0.3, 0.2, 0), _seg(0.8, 0.2, 1), {**_seg(0.5, 0.2, 2), "undecided": 0.74}]
    d = diagnose(swinging)
    assert d["stable"] is False and d["undecided"] == 0.74
    assert verdict(d).endswith("; the model is undecided on 74% of the foreground pixels "
                               "(p within 0.1 of 0.5), so small updates flip them")
    swinging[-1]["undecided"] = UNDECIDED_SHARE - 0.01
    assert "undecided" not in verdict(diagnose(swinging))


def test_undecided_is_the_share_of_true_foreground_pixels_near_the_threshold():
    """A model whose logits are the same for both classes (p = 0.5) on the left half of every
    image and confident foreground on the right: undecided = the foreground's share on the left."""

    class Halves(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(len(x), 2, *x.shape[2:])
            logits[:, 1, :, x.shape[3] // 2:] = 5.0
            return logits

    masks = np.zeros((2, 8, 8), np.uint8)
    masks[:, :, 1:6] = 1  # 3 of its 5 columns on the left half
    metrics = evaluate(Halves(), np.zeros((2, 8, 8, 3), np.uint8), masks)
    assert metrics["undecided"] == pytest.approx(3 / 5)
    # argmax: p = 0.5 is background; the right half is foreground (tp 2 columns, fp 2, fn 3)
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 3))


def test_a_non_finite_metric_is_not_judged_stable():
    history = [_seg(0.5, 0.2, 1), _seg(float("nan"), 0.2, 2)]
    assert diagnose(history)["stable"] is None


def test_classification_one_class_for_almost_every_image_is_degenerate():
    labels = [0, 1, 2, 3] * 25
    one_class = [[1.0, 0.0, 0.0, 0.0]] * 100
    import numpy as np

    metrics = classification_metrics(np.array(labels), np.array(one_class))
    assert metrics["predicted_majority"] == 1.0 and metrics["label_majority"] == 0.25
    assert diagnose([{"round": 1, **metrics}])["degenerate"] is True
    right = np.eye(4)[labels]
    assert diagnose([{"round": 1, **classification_metrics(np.array(labels), right)}])["degenerate"] is False


def test_the_summary_carries_diagnostics_of_the_recorded_history():
    confusion = Confusion()
    import numpy as np

    truth = np.zeros((2, 8, 8), bool)
    truth[:, 2:5, 2:5] = True
    confusion.update(np.zeros_like(truth), truth)
    records = [{"round": r, "scope": "global", **confusion.as_dict()} for r in (0, 1, 2)]
    summary = build_summary(records, {}, "completed", 1.0)
    assert summary["diagnostics"]["degenerate"] is True
    assert summary["diagnostics"]["plateau_rounds"] == 2
