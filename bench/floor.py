"""The benchmark's floor (variant c): FedAvg's rounds in one process, no Flower, no Ray, on
the same store, strategies and trainer as snowfed's own run."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from snowfed.sim.run.in_process import InProcessRounds, Learner


class Floor(InProcessRounds):
    """c: FedAvg's rounds in one process, the floor: each round the sampled sites train one after
    another (strategies and data built once per site), then the weighted average, the sampled
    sites' evaluation of the new global model and the server's test evaluation."""

    def __init__(self, cfg: dict[str, Any], store, run_dir: Path, on_round):
        from snowfed.server.aggregation import sites_per_round
        from snowfed.server.app import build_global_model

        super().__init__(cfg["seed"], cfg["rounds"], "cpu")
        self.store, self.run_dir, self.on_round = store, run_dir, on_round
        num_classes = store.manifest["num_classes"]
        self.model = build_global_model(cfg["model"], num_classes, cfg["seed"])
        self.local = build_global_model(cfg["model"], num_classes, cfg["seed"])
        self.test = store.test_set()
        self.nodes: dict[int, tuple[Any, Any]] = {}
        self.num_sites = n = len(store.nodes)
        self.per_round_train = sites_per_round(cfg["aggregation"], n)
        self.per_round_eval = max(1, int(n * float(cfg["aggregation"]["fraction_evaluate"])))
        self.rng = random.Random(cfg["seed"])
        self.total, self.weights = 0, None

    def learners_of(self, rnd: int) -> list[Learner]:
        from snowfed.strategies import LocalStrategy, StrategySpec

        learners = []
        for pid in sorted(self.rng.sample(range(self.num_sites), self.per_round_train)):
            if pid not in self.nodes:
                data = self.store.node_data(pid)
                spec = StrategySpec(**self.store.node(pid)["strategy"])
                self.nodes[pid] = (data, LocalStrategy.build(spec, data.images, data.labels, data.verified))
            learners.append(Learner(str(pid), pid, self.local, self.nodes[pid][1]))
        return learners

    def training(self, rnd: int, learner: Learner) -> None:
        self.local.load_state_dict(self.model.state_dict())

    def trained(self, rnd: int, learner: Learner, stats) -> None:
        from snowfed.evaluation import evaluate

        data = self.nodes[learner.partition_id][0]
        evaluate(self.local, data.val_images, data.val_targets)
        k = len(data.images)
        state = {key: v.detach().double() * k for key, v in self.local.state_dict().items()}
        self.weights = state if self.weights is None else {k: self.weights[k] + state[k] for k in state}
        self.total += k

    def end_round(self, rnd: int) -> None:
        import torch

        from snowfed.evaluation import evaluate

        self.model.load_state_dict({key: (v / self.total).to(self.model.state_dict()[key].dtype)
                                    for key, v in self.weights.items()})
        self.total, self.weights = 0, None
        for pid in self.rng.sample(range(self.num_sites), self.per_round_eval):
            data = self.store.node_data(pid) if pid not in self.nodes else self.nodes[pid][0]
            evaluate(self.model, data.val_images, data.val_targets)
        evaluate(self.model, *self.test)
        torch.save(self.model.state_dict(), self.run_dir / "checkpoint.pt")  # as every variant checkpoints
        self.on_round(rnd)


def plain_loop(cfg: dict[str, Any], run_dir: Path, on_round) -> None:
    """c, the floor (`Floor`), from the same store as the other variants."""
    from snowfed.evaluation import evaluate
    from snowfed.sim.run.plan import prepare

    _, store = prepare(cfg, run_dir)
    floor = Floor(cfg, store, run_dir, on_round)
    evaluate(floor.model, *floor.test)
    on_round(0)
    floor.run()
