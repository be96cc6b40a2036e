"""The aggregator's main loop: FedAvg-family training with centralized evaluation every round.

`run_federation` is the body of a ServerApp's main: the simulation (snowfed.sim) and the
`flwr run .` app both call it with a Grid, the resolved config and the federation store.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from snowfed.evaluation import evaluate_segmentation
from snowfed.models import build_model
from snowfed.rundir import FINAL_MODEL, METRICS, atomic_write_bytes
from snowfed.store import FederationStore

from .aggregation import build_aggregation
from .recording import RecordingStrategy, RoundRecorder


@dataclass(frozen=True)
class FederationResult:
    rounds_completed: int
    final_metrics: dict[str, float]


def build_global_model(model_cfg: Mapping[str, Any], num_classes: int, seed: int) -> torch.nn.Module:
    """The initial global model, seeded so every run with the same seed starts identical."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    return build_model(model_cfg["name"], num_classes=num_classes, **kwargs)


def run_federation(
    grid: Grid,
    cfg: Mapping[str, Any],
    store: FederationStore,
    run_dir: Path,
    on_round: Callable[[int, dict, dict[str, float]], None] | None = None,
) -> FederationResult:
    """Run `cfg["rounds"]` rounds; write metrics.jsonl as rounds complete and the final model."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_global_model(cfg["model"], cfg["task"]["num_classes"], cfg["seed"]).to(device)
    test_images, test_masks = store.test_set()
    node_names = [n["name"] for n in store.nodes]
    recorder = RoundRecorder(run_dir / METRICS, node_names, on_round)
    completed: dict[int, dict[str, float]] = {}

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate_segmentation(model, test_images, test_masks, device)
        recorder.record_global(server_round, metrics)
        completed[server_round] = metrics
        return MetricRecord(metrics)

    strategy = RecordingStrategy(build_aggregation(cfg["aggregation"], len(node_names)), recorder)
    node_config = ConfigRecord({"store": str(store.path.resolve()), "seed": int(cfg["seed"])})
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["rounds"]),
        train_config=node_config,
        evaluate_config=ConfigRecord(dict(node_config)),
        evaluate_fn=evaluate_global,
    )
    buffer = io.BytesIO()
    torch.save(result.arrays.to_torch_state_dict(), buffer)
    atomic_write_bytes(run_dir / FINAL_MODEL, buffer.getvalue())
    last = max(completed)
    return FederationResult(rounds_completed=last, final_metrics=completed[last])
