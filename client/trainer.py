"""Local training and evaluation of one node, independent of Flower (testable alone)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snowfed.strategies import LocalStrategy


@dataclass(frozen=True)
class TrainStats:
    first_loss: float  # mean loss of the first step (before any update this round)
    last_loss: float  # mean loss over the last quarter of the steps
    steps: int


def train_locally(
    model: torch.nn.Module,
    strategy: LocalStrategy,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> TrainStats:
    """Run the strategy's local steps on the node's own (noisy) labels."""
    spec = strategy.spec
    model.train()
    optimizer = strategy.optimizer([p for p in model.parameters() if p.requires_grad])
    losses = []
    for _ in range(spec.local_steps):
        x, y = strategy.batch(generator, device)
        loss = strategy.loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 4) :]
    return TrainStats(first_loss=losses[0], last_loss=sum(tail) / len(tail), steps=len(losses))
