"""The reference points beside a federated result (FLamby reports both): `pooled`, every site's
noisy training data in one place, and `local`, each site alone.

Neither is federated, so they run in this process, without Ray or Flower, through the same
pieces a node uses (its strategy, `train_locally`, the same random streams) and with the same
budget: `pooled` takes local_steps x (sites per round) steps each round, `local` takes each
site's local_steps each round. They write the same run directory as a federation: metrics.jsonl
per round (global = the model(s) on the clean global test set; node evaluate records on each
site's clean held-out split), a checkpoint each round (so `resume` works), the final model(s).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snowfed.client.trainer import PERSONALIZE_SALT, TrainStats, node_generator, personalize_locally
from snowfed.evaluation import evaluate
from snowfed.rundir import (
    METRICS,
    keep_rounds_upto,
    load_checkpoint,
    restore_global_record,
    save_checkpoint,
)
from snowfed.server.app import FederationResult, build_global_model, save_model
from snowfed.server.recording import RoundRecorder
from snowfed.sim.run.in_process import InProcessRounds, Learner
from snowfed.store import FederationStore
from snowfed.strategies import LocalStrategy, StrategySpec

LOCAL_MODELS_DIR = "models_final"  # `local`: one final model per site, <site>.pt


def _pooled_strategy(store: FederationStore) -> StrategySpec:
    specs = [StrategySpec(**n["strategy"]) for n in store.nodes]
    if any(s != specs[0] for s in specs):
        raise ValueError("pooled training needs one strategy for every site")
    return specs[0]


class ReferenceRounds(InProcessRounds):
    """`pooled` (one learner on every site's data) or `local` (a learner per site), recorded
    and checkpointed each round as a federation's run directory is."""

    def __init__(self, cfg: dict[str, Any], store: FederationStore, run_dir: Path,
                 on_round: Callable[[int, dict, dict[str, float]], None] | None):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(cfg["seed"], cfg["rounds"], device)
        self.cfg, self.store, self.run_dir = cfg, store, run_dir
        self.mode = cfg["aggregation"]["name"]
        self.data = [store.node_data(i) for i in range(len(store.nodes))]
        self.initial = build_global_model(cfg["model"], store.manifest["num_classes"],
                                          cfg["seed"]).state_dict()
        self.learners = self._pooled_learner() if self.mode == "pooled" else self._site_learners()
        self.recorder = RoundRecorder(run_dir / METRICS, [d.name for d in self.data], on_round)
        self.test_images, self.test_targets = store.test_set()
        self.completed: dict[int, dict[str, float]] = {}

    def new_model(self) -> torch.nn.Module:
        model = build_global_model(self.cfg["model"], self.store.manifest["num_classes"], self.cfg["seed"])
        model.load_state_dict(self.initial)
        return model.to(self.device)

    def _pooled_learner(self) -> list[Learner]:
        agg, data = self.cfg["aggregation"], self.data
        per_round = max(int(len(data) * agg["fraction_train"]), agg["min_train_nodes"])
        spec = _pooled_strategy(self.store)
        strategy = LocalStrategy.build(spec, np.concatenate([d.images for d in data]),
                                       np.concatenate([d.labels for d in data]),
                                       np.concatenate([d.verified for d in data]))
        return [Learner("pooled", 0, self.new_model(), strategy, spec.local_steps * per_round)]

    def _site_learners(self) -> list[Learner]:
        return [Learner(d.name, i, self.new_model(),
                        LocalStrategy.build(StrategySpec(**n["strategy"]), d.images, d.labels, d.verified),
                        int(n["strategy"]["local_steps"]))
                for i, (d, n) in enumerate(zip(self.data, self.store.nodes))]

    def learners_of(self, rnd: int) -> list[Learner]:
        return self.learners

    def trained(self, rnd: int, learner: Learner, stats: TrainStats) -> None:
        if self.mode == "local":
            self.recorder.append([{"round": rnd, "scope": "node", "node": learner.name, "phase": "train",
                                   "num-examples": len(self.data[learner.partition_id].images),
                                   "train-loss-first": stats.first_loss, "train-loss": stats.last_loss}])

    def end_round(self, rnd: int) -> None:
        """Evaluate, checkpoint, record: the checkpoint before the global record, as the
        federated server does (resume writes a record the checkpoint has and the log lacks:
        restore_global_record)."""
        node_records, test_scores = [], []
        for learner in self.learners:
            test_scores.append(evaluate(learner.model, self.test_images, self.test_targets, self.device))
            for i, d in enumerate(self.data):
                if self.mode == "local" and i != learner.partition_id:
                    continue
                scores = evaluate(learner.model, d.val_images, d.val_targets, self.device)
                extra = {f"test-{k}": v for k, v in test_scores[-1].items()} if self.mode == "local" else {}
                node_records.append({"round": rnd, "scope": "node", "node": d.name,
                                     "phase": "evaluate", "num-examples": len(d.val_images),
                                     **scores, **extra})
        if rnd > 0:
            self.recorder.append(node_records)
        metrics = {k: float(np.mean([s[k] for s in test_scores])) for k in test_scores[0]}
        save_checkpoint(self.run_dir, rnd, {
            "models": [{k: v.cpu() for k, v in lr.model.state_dict().items()} for lr in self.learners],
            "memory": [lr.memory for lr in self.learners],
            "metrics": metrics,
        })
        self.recorder.record_global(rnd, metrics)
        self.completed[rnd] = metrics

    def start(self) -> int:
        """The first round to train: after the checkpoint's, or 1 once round 0 is recorded."""
        saved = load_checkpoint(self.run_dir)
        if saved is None:
            keep_rounds_upto(self.run_dir / METRICS, -1)
            self.end_round(0)
        else:
            restore_global_record(self.run_dir / METRICS, saved)
            for learner, state, memory in zip(self.learners, saved["models"], saved["memory"]):
                learner.model.load_state_dict(state)
                learner.memory = memory
            self.completed[saved["round"]] = saved["metrics"]
        return max(self.completed) + 1

    def finish(self) -> None:
        """The final model(s); `pooled` with personalize_steps: each site fine-tunes it."""
        if self.mode == "local":
            for learner in self.learners:
                save_model(self.run_dir / LOCAL_MODELS_DIR, learner.model.state_dict(), f"{learner.name}.pt")
            return
        save_model(self.run_dir, self.learners[0].model.state_dict())
        steps = int(self.cfg.get("personalize_steps", 0))
        if steps > 0:
            self.recorder.append([self._personalized(i, steps) for i in range(len(self.data))])

    def _personalized(self, i: int, steps: int) -> dict[str, Any]:
        d = self.data[i]
        model = self.new_model()
        model.load_state_dict(self.learners[0].model.state_dict())
        site = LocalStrategy.build(StrategySpec(**self.store.nodes[i]["strategy"]), d.images,
                                   d.labels, d.verified)
        gen = node_generator(self.seed, self.rounds, i, PERSONALIZE_SALT)
        scores = personalize_locally(model, site, d.val_images, d.val_targets, gen, steps, self.device, {})
        return {"round": self.rounds, "scope": "node", "node": d.name, "phase": "personalize",
                "num-examples": len(d.val_images), **scores}


def run_reference(
    cfg: dict[str, Any],
    store: FederationStore,
    run_dir: Path,
    on_round: Callable[[int, dict, dict[str, float]], None] | None = None,
) -> FederationResult:
    rounds = ReferenceRounds(cfg, store, run_dir, on_round)
    rounds.run(rounds.start())
    rounds.finish()
    last = max(rounds.completed)
    return FederationResult(rounds_completed=last, final_metrics=rounds.completed[last])
