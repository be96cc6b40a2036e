"""Did a run learn? summary.json's `diagnostics`, judged from the global history alone.

A final F1 of 0 is an optimisation failure to explain, not a result (docs/results/learning.md),
so every run says whether it produced an answer:

- `degenerate`: the final global model predicts (almost) one class: foreground in under
  ``DEGENERATE_SHARE`` of the test pixels (or background in under it), or one class for at least
  ``MAJORITY_SHARE`` of the test images, while the test set itself is not that lopsided;
- `plateau_rounds`: the rounds, from round 1, before the global model first stopped being
  degenerate (the all-background plateau); all of them when it never did;
- `stable`: the global metric's range (max - min) over the last quarter of the rounds, at least
  ``STABLE_WINDOW_MIN`` of them, is at most ``STABLE_RANGE``;
- `undecided` (segmentation): the final model's share of true foreground pixels with p(fg)
  near 0.5 (snowfed.evaluation). From ``UNDECIDED_SHARE`` on, an unsettled run is said to be
  undecided rather than short of rounds: more rounds do not settle it.

Segmentation reads the pooled pixel counts (tp, fp, fn, tn) every evaluation records;
classification reads `predicted_majority` and `label_majority` (snowfed.metrics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

DEGENERATE_SHARE = 0.01  # segmentation: under 1% of the test pixels predicted foreground
MAJORITY_SHARE = 0.95  # classification: one class predicted for 95% of the test images
STABLE_RANGE = 0.05  # the metric may move by at most this much (max - min) over the window
STABLE_WINDOW_MIN = 2  # rounds in the stability window, at least
# A foreground pixel is undecided when the model's p(foreground) lies within UNDECIDED_MARGIN
# of 0.5, the argmax threshold: small weight changes flip it. Pixel cross-entropy on labels that
# miss half the objects learns p near 0.5 on every object (docs/results/learning.md).
UNDECIDED_MARGIN = 0.1
UNDECIDED_SHARE = 0.5  # an unsettled run with this share of undecided foreground is undecided


def degenerate_reason(metrics: Mapping[str, Any]) -> str | None:
    """Why one evaluation's model predicts (almost) one class, in words; None when it does not,
    or when the metrics cannot tell (no pixel counts, no class shares)."""
    counts = [metrics.get(k) for k in ("tp", "fp", "fn", "tn")]
    if all(isinstance(c, int | float) for c in counts) and sum(counts) > 0:
        tp, fp, fn, tn = counts
        total = tp + fp + fn + tn
        predicted, actual = (tp + fp) / total, (tp + fn) / total
        if predicted < DEGENERATE_SHARE <= actual:
            return f"the model predicts no foreground ({predicted:.1%} of test pixels)"
        if 1 - predicted < DEGENERATE_SHARE <= 1 - actual:
            return f"the model predicts foreground everywhere ({predicted:.1%} of test pixels)"
        return None
    predicted, actual = metrics.get("predicted_majority"), metrics.get("label_majority")
    if isinstance(predicted, int | float) and isinstance(actual, int | float):
        if predicted >= MAJORITY_SHARE > actual:
            return f"the model predicts one class for {predicted:.0%} of test images"
    return None


def stability_window(rounds: int) -> int:
    """How many final rounds the stability check looks at: a quarter of them, at least 2."""
    return max(STABLE_WINDOW_MIN, math.ceil(rounds / 4))


def diagnose(history: Sequence[Mapping[str, Any]], metric: str = "f1") -> dict[str, Any]:
    """The `diagnostics` of a run from its global `history` (round 0 = the initial model)."""
    trained = sorted((r for r in history if r.get("round", 0) >= 1), key=lambda r: r["round"])
    if not trained:
        return {"degenerate": None, "plateau_rounds": None, "stable": None, "metric": metric,
                "reason": "no round completed"}
    reasons = [degenerate_reason(r) for r in trained]
    plateau = next((i for i, why in enumerate(reasons) if why is None), len(trained))
    window = trained[-stability_window(len(trained)):]
    values = [r.get(metric) for r in window]
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    moved = max(finite) - min(finite) if len(finite) == len(values) else None
    return {
        "degenerate": reasons[-1] is not None,
        "degenerate_reason": reasons[-1],
        "plateau_rounds": plateau,
        "stable": None if moved is None or len(window) < STABLE_WINDOW_MIN else moved <= STABLE_RANGE,
        "metric": metric,
        "window_rounds": len(window),
        "window_range": moved,
        "undecided": trained[-1].get("undecided"),
    }


def is_undecided(diagnostics: Mapping[str, Any]) -> bool:
    """An unsettled run whose final model is undecided on at least UNDECIDED_SHARE of the
    foreground pixels: more rounds do not settle it."""
    share = diagnostics.get("undecided")
    return (diagnostics.get("stable") is False and isinstance(share, int | float)
            and share >= UNDECIDED_SHARE)


def verdict(diagnostics: Mapping[str, Any]) -> str:
    """The diagnostics in words, for the last line of `snowfed run`."""
    if diagnostics.get("degenerate") is None:
        return f"not judged: {diagnostics.get('reason', 'no round completed')}"
    metric = diagnostics["metric"].upper() if diagnostics["metric"] == "f1" else diagnostics["metric"]
    plateau = diagnostics["plateau_rounds"]
    if diagnostics["degenerate"]:
        return f"degenerate: {diagnostics['degenerate_reason']}"
    since = f" (one class only for its first {plateau} rounds)" if plateau else ""
    window, moved = diagnostics["window_rounds"], diagnostics["window_range"]
    if diagnostics["stable"] is None:
        return f"not judged for stability: {metric} over {window} round(s){since}"
    if not diagnostics["stable"]:
        why = (f"; the model is undecided on {diagnostics['undecided']:.0%} of the foreground "
               f"pixels (p within {UNDECIDED_MARGIN} of 0.5), so small updates flip them"
               if is_undecided(diagnostics) else "")
        return (f"not converged: {metric} still moving ±{moved / 2:.2f} over the last {window} "
                f"rounds{since}{why}")
    return f"settled: {metric} within ±{moved / 2:.2f} over the last {window} rounds{since}"
