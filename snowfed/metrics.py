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


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy.stats.rankdata's default, which is not
    used because importing scipy.stats takes 1.6 s, paid by every Ray actor at its first
    evaluation)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.r_[True, ordered[1:] != ordered[:-1]]  # where each run of equal values starts
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(new) - 1]  # mean of ranks start+1..end
    return ranks


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1 (as ``f1``, the key every report ranks by), macro
    precision and recall, the predicted and the true majority class's shares, and macro
    one-vs-rest ROC AUC over the classes that have both positives
    and negatives in `labels` (nan when none has). `probs` is (N, C) class probabilities.

    The same numbers as scikit-learn's metrics (tests/test_classification.py compares them), from
    one confusion matrix and one ranking per class: scikit-learn validates its inputs on every call,
    about 30 ms per evaluation, which was half of a small site's round."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    confusion = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    aucs = []
    for c in np.flatnonzero((support > 0) & (support < len(labels))):  # both classes present
        positive = labels == c
        ranks = _average_ranks(probs[:, c])  # ties share their mean rank: the trapezoidal ROC area
        n_pos = support[c]
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(labels) - n_pos)))
    return {
        "accuracy": float(tp.sum() / len(labels)) if len(labels) else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if support.any() else 0.0,
        "f1": float(f1.mean()),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
        # the shares of the most frequent predicted and true class: a model that predicts one
        # class for (almost) every image is degenerate (snowfed.diagnostics)
        "predicted_majority": float(predicted.max() / len(labels)) if len(labels) else 0.0,
        "label_majority": float(support.max() / len(labels)) if len(labels) else 0.0,
    }
