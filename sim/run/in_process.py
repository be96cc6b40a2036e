"""Rounds run in this process, without Ray or Flower: the reference runs (`pooled`, `local`;
sim.run.reference) and the benchmark's floor (bench.benchmark). Each round the round's
learners train one after another through the pieces a node uses (its strategy,
`train_locally`, the node's own random stream), then the round ends (`end_round`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from snowfed.client.trainer import TrainStats, node_generator, train_locally
from snowfed.strategies import LocalStrategy


@dataclass
class Learner:
    """One model with its data and strategy: the pooled model, one site's own model, or a
    sampled site training the global model. `steps` None: the strategy's local_steps."""

    name: str
    partition_id: int
    model: torch.nn.Module
    strategy: LocalStrategy
    steps: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)


class InProcessRounds:
    """The round loop; a subclass says which learners train in a round and what ends it."""

    def __init__(self, seed: int, rounds: int, device: torch.device | str):
        self.seed, self.rounds, self.device = int(seed), int(rounds), device

    def learners_of(self, rnd: int) -> list[Learner]:
        raise NotImplementedError

    def training(self, rnd: int, learner: Learner) -> None:
        """Before each learner's local steps (a FedAvg site starts from the global model)."""

    def trained(self, rnd: int, learner: Learner, stats: TrainStats) -> None:
        """After each learner's local steps (records, a FedAvg sum)."""

    def end_round(self, rnd: int) -> None:
        raise NotImplementedError

    def run(self, first: int = 1) -> None:
        """Rounds `first` to the run's last."""
        for rnd in range(first, self.rounds + 1):
            for learner in self.learners_of(rnd):
                self.training(rnd, learner)
                generator = node_generator(self.seed, rnd, learner.partition_id)
                stats = train_locally(learner.model, learner.strategy, generator, self.device,
                                      learner.memory, steps=learner.steps,
                                      run_round=(rnd, self.rounds))
                self.trained(rnd, learner, stats)
            self.end_round(rnd)
