"""Losses of local strategies: (logits NCHW, labels NHW int64) -> scalar tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy, SNOW's segLoss."""
    return F.cross_entropy(logits, labels)


LOSSES: dict[str, Loss] = {
    "cross_entropy": cross_entropy,
}
