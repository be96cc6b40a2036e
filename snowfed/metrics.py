"""Pixel-level binary segmentation metrics from confusion counts.

`f1` is the pooled pixel F1 over the whole set (SNOW's "pixel F1"); `dice` is the mean of the
per-image Dice scores (an image where prediction and target are both empty scores 1.0). On one
image they coincide; over a set they differ, small images weigh more in `dice`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def _as_bool(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(bool)


@dataclass
class Confusion:
    """Accumulated pixel confusion counts (and per-image Dice) over a set of images."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    image_dice: list[float] = field(default_factory=list)

    def update(self, pred, target) -> Confusion:
        """Add a batch: boolean (B, H, W) or one (H, W) image; returns self."""
        p, t = _as_bool(pred), _as_bool(target)
        if p.shape != t.shape:
            raise ValueError(f"prediction {p.shape} and target {t.shape} differ in shape")
        if p.ndim == 2:
            p, t = p[None], t[None]
        axes = tuple(range(1, p.ndim))
        tp = np.count_nonzero(p & t, axis=axes)
        fp = np.count_nonzero(p & ~t, axis=axes)
        fn = np.count_nonzero(~p & t, axis=axes)
        self.tp += int(tp.sum())
        self.fp += int(fp.sum())
        self.fn += int(fn.sum())
        self.tn += int(p[0].size * len(p) - tp.sum() - fp.sum() - fn.sum())
        denom = 2 * tp + fp + fn
        self.image_dice.extend(np.where(denom == 0, 1.0, 2 * tp / np.maximum(denom, 1)).tolist())
        return self

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                         self.tn + other.tn, self.image_dice + other.image_dice)

    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0

    def dice(self) -> float:
        return float(np.mean(self.image_dice)) if self.image_dice else 1.0

    def mcc(self) -> float:
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / denom if denom else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"f1": self.f1(), "dice": self.dice(), "mcc": self.mcc(),
                "precision": self.precision(), "recall": self.recall()}
