"""Aggregation strategies by config name: Flower's own implementations, configured from config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from snowfed.config import ConfigError, require_int, require_number

AGGREGATIONS = {"fedavg": FedAvg}


def build_aggregation(cfg: Mapping[str, Any], num_nodes: int) -> Strategy:
    """A Flower strategy for `aggregation.*`; waits until every simulated node is connected."""
    name = cfg.get("name")
    if name not in AGGREGATIONS:
        raise ConfigError("aggregation.name", name, f"one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[name](
        fraction_train=require_number(cfg.get("fraction_train"), "aggregation.fraction_train", 0, 1),
        fraction_evaluate=require_number(
            cfg.get("fraction_evaluate"), "aggregation.fraction_evaluate", 0, 1
        ),
        min_train_nodes=require_int(cfg.get("min_train_nodes"), "aggregation.min_train_nodes", 1),
        min_evaluate_nodes=require_int(
            cfg.get("min_evaluate_nodes"), "aggregation.min_evaluate_nodes", 0
        ),
        min_available_nodes=num_nodes,
        weighted_by_key="num-examples",
    )
