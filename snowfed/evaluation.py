"""Evaluation shared by the nodes (clean held-out split), the server (global test) and the
reference runs. `evaluate` picks the task from the targets' shape: one class id per image
(classification) or one mask per image (segmentation)."""

from __future__ import annotations

import numpy as np
import torch

from snowfed.diagnostics import UNDECIDED_MARGIN
from snowfed.metrics import Confusion, classification_metrics
from snowfed.store import tensor_view


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] (a new tensor; `images` may be a read-only store view)."""
    return tensor_view(images).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def evaluate_segmentation(
    model: torch.nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> dict[str, float]:
    """Pixel F1 (pooled), mean per-image Dice, MCC and friends of argmax predictions, and
    `undecided`: the share of the true foreground pixels whose p(foreground) is within
    UNDECIDED_MARGIN of 0.5."""
    model.eval()
    confusion = Confusion()
    undecided = 0
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size]).to(device)
        logits = model(x)
        pred = logits.argmax(dim=1).cpu().numpy().astype(bool)
        truth = np.asarray(masks[start : start + batch_size]).astype(bool)
        confusion.update(pred, truth)
        p_foreground = 1.0 - torch.softmax(logits, dim=1)[:, 0].cpu().numpy()
        undecided += int((np.abs(p_foreground - 0.5) < UNDECIDED_MARGIN)[truth].sum())
    return {**confusion.as_dict(), "undecided": undecided / max(1, confusion.tp + confusion.fn)}


@torch.no_grad()
def evaluate_classification(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1, precision, recall and AUC of the model's softmax."""
    model.eval()
    probs = [
        torch.softmax(model(images_to_tensor(images[s : s + batch_size]).to(device)), dim=1).cpu()
        for s in range(0, len(images), batch_size)
    ]
    return classification_metrics(np.asarray(labels), torch.cat(probs).double().numpy())


def evaluate(
    model: torch.nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The task's metrics: class ids (N,) -> classification, masks (N, H, W) -> segmentation."""
    if np.ndim(targets) == 1:
        return evaluate_classification(model, images, targets, device)
    return evaluate_segmentation(model, images, targets, device)
