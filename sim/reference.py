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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snowfed.client.trainer import (
    PERSONALIZE_SALT,
    node_generator,
    personalize_locally,
    train_locally,
)
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
from snowfed.store import FederationStore
from snowfed.strategies import LocalStrategy, StrategySpec

LOCAL_MODELS_DIR = "models_final"  # `local`: one final model per site, <site>.pt


@dataclass
class _Learner:
    """One model with its data and strategy: the pooled model, or one site's own model."""

    name: str
    partition_id: int
    model: torch.nn.Module
    strategy: LocalStrategy
    steps: int
    memory: dict[str, Any] = field(default_factory=dict)


def _pooled_strategy(store: FederationStore) -> StrategySpec:
    specs = [StrategySpec(**n["strategy"]) for n in store.nodes]
    if any(s != specs[0] for s in specs):
        raise ValueError("pooled training needs one strategy for every site")
    return specs[0]


def run_reference(
    cfg: dict[str, Any],
    store: FederationStore,
    run_dir: Path,
    on_round: Callable[[int, dict, dict[str, float]], None] | None = None,
) -> FederationResult:
    mode = cfg["aggregation"]["name"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = [store.node_data(i) for i in range(len(store.nodes))]
    names = [d.name for d in data]
    initial = build_global_model(cfg["model"], store.manifest["num_classes"], cfg["seed"]).state_dict()

    def new_model() -> torch.nn.Module:
        model = build_global_model(cfg["model"], store.manifest["num_classes"], cfg["seed"])
        model.load_state_dict(initial)
        return model.to(device)

    if mode == "pooled":
        agg = cfg["aggregation"]
        per_round = max(int(len(data) * agg["fraction_train"]), agg["min_train_nodes"])
        spec = _pooled_strategy(store)
        strategy = LocalStrategy.build(
            spec,
            np.concatenate([d.images for d in data]),
            np.concatenate([d.labels for d in data]),
            np.concatenate([d.verified for d in data]),
        )
        learners = [_Learner("pooled", 0, new_model(), strategy, spec.local_steps * per_round)]
    else:
        learners = [
            _Learner(d.name, i, new_model(),
                     LocalStrategy.build(StrategySpec(**n["strategy"]), d.images, d.labels, d.verified),
                     int(n["strategy"]["local_steps"]))
            for i, (d, n) in enumerate(zip(data, store.nodes))
        ]
    recorder = RoundRecorder(run_dir / METRICS, names, on_round)
    test_images, test_targets = store.test_set()
    completed: dict[int, dict[str, float]] = {}

    def evaluate_round(rnd: int) -> None:
        node_records, test_scores = [], []
        for learner in learners:
            test_scores.append(evaluate(learner.model, test_images, test_targets, device))
            for i, d in enumerate(data):
                if mode == "local" and i != learner.partition_id:
                    continue
                scores = evaluate(learner.model, d.val_images, d.val_targets, device)
                extra = {f"test-{k}": v for k, v in test_scores[-1].items()} if mode == "local" else {}
                node_records.append({"round": rnd, "scope": "node", "node": d.name,
                                     "phase": "evaluate", "num-examples": len(d.val_images),
                                     **scores, **extra})
        if rnd > 0:
            recorder.append(node_records)
        metrics = {k: float(np.mean([s[k] for s in test_scores])) for k in test_scores[0]}
        # the checkpoint before the global record, as the federated server does (resume writes a
        # record the checkpoint has and the log lacks: restore_global_record)
        save_checkpoint(run_dir, rnd, {
            "models": [{k: v.cpu() for k, v in lr.model.state_dict().items()} for lr in learners],
            "memory": [lr.memory for lr in learners],
            "metrics": metrics,
        })
        recorder.record_global(rnd, metrics)
        completed[rnd] = metrics

    saved = load_checkpoint(run_dir)
    if saved is None:
        keep_rounds_upto(run_dir / METRICS, -1)
        evaluate_round(0)
    else:
        restore_global_record(run_dir / METRICS, saved)
        for learner, state, memory in zip(learners, saved["models"], saved["memory"]):
            learner.model.load_state_dict(state)
            learner.memory = memory
        completed[saved["round"]] = saved["metrics"]

    for rnd in range(max(completed) + 1, int(cfg["rounds"]) + 1):
        for learner in learners:
            gen = node_generator(int(cfg["seed"]), rnd, learner.partition_id)
            stats = train_locally(learner.model, learner.strategy, gen, device, learner.memory,
                                  steps=learner.steps, run_round=(rnd, int(cfg["rounds"])))
            if mode == "local":
                recorder.append([{"round": rnd, "scope": "node", "node": learner.name,
                                  "phase": "train", "num-examples": len(data[learner.partition_id].images),
                                  "train-loss-first": stats.first_loss, "train-loss": stats.last_loss}])
        evaluate_round(rnd)

    if mode == "pooled":
        save_model(run_dir, learners[0].model.state_dict())
        steps = int(cfg.get("personalize_steps", 0))
        if steps > 0:
            records = []
            for i, d in enumerate(data):
                model = new_model()
                model.load_state_dict(learners[0].model.state_dict())
                site = LocalStrategy.build(StrategySpec(**store.nodes[i]["strategy"]), d.images,
                                           d.labels, d.verified)
                gen = node_generator(int(cfg["seed"]), int(cfg["rounds"]), i, PERSONALIZE_SALT)
                scores = personalize_locally(model, site, d.val_images, d.val_targets, gen, steps,
                                             device, {})
                records.append({"round": int(cfg["rounds"]), "scope": "node", "node": d.name,
                                "phase": "personalize", "num-examples": len(d.val_images), **scores})
            recorder.append(records)
    else:
        for learner in learners:
            save_model(run_dir / LOCAL_MODELS_DIR, learner.model.state_dict(), f"{learner.name}.pt")
    last = max(completed)
    return FederationResult(rounds_completed=last, final_metrics=completed[last])
