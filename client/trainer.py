"""Local training and evaluation of one node, independent of Flower (testable alone)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from snowfed import seeds
from snowfed.evaluation import evaluate
from snowfed.strategies import LocalStrategy

from .privacy import DPSettings, dp_sgd_steps


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
    proximal_mu: float = 0.0,
    steps: int | None = None,
    dp: DPSettings | None = None,
    run_round: tuple[int, int] | None = None,
) -> TrainStats:
    """Run the strategy's local steps on the node's own (noisy) labels. `memory` is what the
    node's strategy keeps between rounds (initial weights, teacher); the caller keeps it.

    `proximal_mu` > 0 adds FedProx's (mu/2)||w - w_received||^2 to every step's loss (Flower's
    FedProx sends mu; the site must apply it). `steps` replaces the strategy's local_steps
    (personalisation fine-tunes with its own budget). `dp`: the steps are DP-SGD (Opacus; see
    snowfed.client.privacy) on Poisson samples of the node's images. `run_round`: (this round,
    the run's rounds), where the strategy's lr schedule stands; without it (personalisation,
    a teacher's own training) the steps keep the strategy's lr."""
    spec = strategy.spec
    received = (
        {n: p.detach().clone() for n, p in model.named_parameters()} if proximal_mu > 0 else {}
    )
    memory = {} if memory is None else memory
    trainable = strategy.start_round(model, memory, generator, device)
    anchors = [(p, received[n]) for n, p in model.named_parameters() if p.requires_grad and received]
    model.train()
    optimizer = strategy.optimizer(trainable)
    steps = spec.local_steps if steps is None else steps
    if run_round is None:
        lrs = [spec.lr] * steps
    else:
        done, total = (run_round[0] - 1) * steps, run_round[1] * steps
        lrs = [strategy.learning_rate(done + i, total) for i in range(steps)]
    if dp is not None:
        losses = dp_sgd_steps(
            model, optimizer, trainable, strategy.sampler.num_images,
            lambda m, idx: strategy.step_loss(m, generator, device, idx), dp, lrs, generator,
        )
        return _stats(losses, strategy)
    losses = []
    for lr in lrs:
        strategy.set_learning_rate(optimizer, lr)
        loss = strategy.step_loss(model, generator, device)
        if anchors:
            loss = loss + proximal_mu / 2 * sum((p - p0).pow(2).sum() for p, p0 in anchors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    strategy.end_round(memory)
    return _stats(losses, strategy)


def _stats(losses: list[float], strategy: LocalStrategy) -> TrainStats:
    """First step's loss and the mean of the last quarter (nan steps, DP-SGD's empty Poisson
    samples, left out)."""
    seen = [x for x in losses if not math.isnan(x)] or [float("nan")]
    tail = seen[-max(1, len(seen) // 4) :]
    return TrainStats(
        first_loss=seen[0],
        last_loss=sum(tail) / len(tail),
        steps=len(losses),
        pseudo_labelled=strategy.teacher.filled_fraction,
    )


def personalize_locally(
    model: torch.nn.Module,
    strategy: LocalStrategy,
    val_images: np.ndarray,
    val_targets: np.ndarray,
    generator: torch.Generator,
    steps: int,
    device: torch.device | str = "cpu",
    memory: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Fine-tune `model` (the final global model) with `steps` local steps of the site's
    strategy; the global and the personalised model's scores on the site's clean held-out split,
    as `global-<metric>` and `personalized-<metric>`."""
    before = evaluate(model, val_images, val_targets, device)
    train_locally(model, strategy, generator, device, memory, steps=steps)
    after = evaluate(model, val_images, val_targets, device)
    return {**{f"global-{k}": v for k, v in before.items()},
            **{f"personalized-{k}": v for k, v in after.items()}}


PERSONALIZE_SALT = 7  # personalisation draws its own stream, not the last round's again


def node_generator(seed: int, server_round: int, partition_id: int, salt: int = 0) -> torch.Generator:
    """The random stream of one node's round: reproducible per (seed, round, node), whichever
    Ray actor (or the in-process reference runs) computes it."""
    return torch.Generator().manual_seed(seeds.node_round(seed, server_round, partition_id, salt))
