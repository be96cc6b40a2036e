"""Segmentation evaluation shared by the nodes (clean held-out split) and the server (global test)."""

from __future__ import annotations

import numpy as np
import torch

from snowfed.metrics import Confusion


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def evaluate_segmentation(
    model: torch.nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> dict[str, float]:
    """Pixel F1 (pooled), mean per-image Dice, MCC and friends of argmax predictions."""
    model.eval()
    confusion = Confusion()
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size]).to(device)
        pred = model(x).argmax(dim=1).cpu().numpy().astype(bool)
        confusion.update(pred, np.asarray(masks[start : start + batch_size]).astype(bool))
    return confusion.as_dict()
