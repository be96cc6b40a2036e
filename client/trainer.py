"""Local training and evaluation of one node, independent of Flower (testable alone)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from snowfed.strategies import LocalStrategy


@dataclass(frozen=True)
class TrainStats:
    first_loss: float  # mean loss of the first step (before any update this round)
    last_loss: float  # mean loss over the last quarter of the steps
    steps: int
    pseudo_labelled: float  # fraction of pixels the teacher filled in (0 without a teacher)


def train_locally(
    model: torch.nn.Module,
    strategy: LocalStrategy,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    memory: dict[str, Any] | None = None,
) -> TrainStats:
    """Run the strategy's local steps on the node's own (noisy) labels. `memory` is what the
    node's strategy keeps between rounds (initial weights, teacher); the caller keeps it."""
    spec = strategy.spec
    trainable = strategy.start_round(model, {} if memory is None else memory, generator, device)
    model.train()
    optimizer = strategy.optimizer(trainable)
    losses = []
    for _ in range(spec.local_steps):
        loss = strategy.step_loss(model, generator, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 4) :]
    return TrainStats(
        first_loss=losses[0],
        last_loss=sum(tail) / len(tail),
        steps=len(losses),
        pseudo_labelled=strategy.teacher.filled_fraction,
    )
