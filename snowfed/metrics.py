"""Evaluation metrics: pixel-level binary segmentation (accumulated over a whole evaluation
set) and image-level classification (scikit-learn's implementations).

Segmentation:

Two kinds of overlap score, because the literature mixes them up:
- ``f1`` pools the pixel counts of every image, then scores once (the SNOW reference results'
  "pixel F1"): large objects weigh more, and an empty image adds only its false positives;
- ``dice`` is the mean over images of each image's own Dice (also ``mean_image_dice``): every
  image weighs the same, and an image where prediction and target are both empty scores 1.0.
Precision, recall and MCC are pooled, like ``f1``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch


def _as_bool_array(a: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype != np.bool_:
        # refuse silent casts: logits or probabilities would all count as positive
        raise TypeError(f"{what} must be a boolean mask, got dtype {a.dtype}")
    return a


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


@dataclass
class Confusion:
    """Pixel confusion counts over a set of images, plus the per-image Dice scores' sum."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    dice_sum: float = 0.0
    n_images: int = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add boolean masks: (H, W) is one image, (B, ...) is B images."""
        p = _as_bool_array(pred, "pred")
        t = _as_bool_array(target, "target")
        if p.shape != t.shape:
            raise ValueError(f"pred shape {p.shape} != target shape {t.shape}")
        if p.ndim <= 2:
            p, t = p[None], t[None]
        p, t = p.reshape(len(p), -1), t.reshape(len(t), -1)
        tp = np.count_nonzero(p & t, axis=1)
        fp = np.count_nonzero(p & ~t, axis=1)
        fn = np.count_nonzero(~p & t, axis=1)
        self.tp += int(tp.sum())
        self.fp += int(fp.sum())
        self.fn += int(fn.sum())
        self.tn += int(p.size - tp.sum() - fp.sum() - fn.sum())
        den = 2 * tp + fp + fn
        self.dice_sum += float(np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0).sum())
        self.n_images += len(p)

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.tn + other.tn,
            self.dice_sum + other.dice_sum,
            self.n_images + other.n_images,
        )

    def precision(self) -> float:
        """tp / (tp + fp); with nothing predicted, 1.0 if nothing was to be found, else 0.0."""
        return _ratio(self.tp, self.tp + self.fp, 1.0 if self.fn == 0 else 0.0)

    def recall(self) -> float:
        """tp / (tp + fn); with nothing to find, 1.0 if nothing was predicted, else 0.0."""
        return _ratio(self.tp, self.tp + self.fn, 1.0 if self.fp == 0 else 0.0)

    def f1(self) -> float:
        """Pooled pixel F1, 2tp / (2tp + fp + fn); 1.0 when there is nothing to get wrong."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, 1.0)

    def mean_image_dice(self) -> float:
        """Mean of the per-image Dice scores; 1.0 for an empty set, like ``f1``."""
        return self.dice_sum / self.n_images if self.n_images else 1.0

    def dice(self) -> float:
        """Mean per-image Dice (see the module docstring for how it differs from ``f1``)."""
        return self.mean_image_dice()

    def mcc(self) -> float:
        """Pooled Matthews correlation; 0.0 when a marginal is empty (undefined)."""
        den = math.sqrt(self.tp + self.fp) * math.sqrt(self.tp + self.fn)
        den *= math.sqrt(self.tn + self.fp) * math.sqrt(self.tn + self.fn)
        return (self.tp * self.tn - self.fp * self.fn) / den if den else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "f1": self.f1(),
            "dice": self.dice(),
            "mcc": self.mcc(),
            "precision": self.precision(),
            "recall": self.recall(),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
        }


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1 (as ``f1``, the key every report ranks by), macro
    precision and recall, and macro one-vs-rest ROC AUC over the classes that have both positives
    and negatives in `labels` (nan when none has). `probs` is (N, C) class probabilities."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    labels = np.asarray(labels)
    classes = list(range(probs.shape[1]))
    pred = probs.argmax(axis=1)
    present = [c for c in classes if 0 < np.count_nonzero(labels == c) < len(labels)]
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in present]
    macro = {"labels": classes, "average": "macro", "zero_division": 0}
    with warnings.catch_warnings():  # a small split may lack a class the model predicts
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(labels, pred))
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": balanced,
        "f1": float(f1_score(labels, pred, **macro)),
        "precision": float(precision_score(labels, pred, **macro)),
        "recall": float(recall_score(labels, pred, **macro)),
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
    }
