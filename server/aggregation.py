"""Aggregation strategies by config name: Flower's own implementations, plus snowfed's
label-quality-aware FedAvg (Flower has none), configured and validated from `aggregation.*`.

Two more names are not federated strategies but the reference points every benchmark reports
beside a federated result: `pooled` (all sites' data in one place) and `local` (each site
alone). `snowfed.sim.run.reference` trains those in one process, with the same budget and the same
run directory.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from snowfed.config import REFERENCE_AGGREGATIONS as REFERENCES
from snowfed.config import ConfigError, require, require_int, require_number

from .quality import QualityAwareFedAvg

FEDERATED: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "quality": QualityAwareFedAvg,
}
AGGREGATIONS = (*FEDERATED, *REFERENCES)

# Keys every aggregation config has; the rest are the chosen strategy's own parameters.
COMMON = {
    "fraction_train": (0.0, 1.0, True),  # above 0: a round that samples no site only fails
    "fraction_evaluate": (0.0, 1.0),
    "min_train_nodes": 1,
    "min_evaluate_nodes": 0,
    "round_timeout_s": (1.0, None),  # a node that has not replied by then is left out of the round
}
# The quality aggregation's clean validation set: this many images per site's appearance, with
# clean masks, generated for the server alone (never trained on, not part of the test set).
SERVER_VAL_KEY = "server_val_images_per_site"
# Constructor arguments snowfed sets itself, that take code, or that do nothing here (FedOpt's
# eta_l is the clients' learning rate, which is `strategy.lr`).
_NOT_CONFIG = {
    "eta_l",
    "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
    "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "selection_rule", "probe",
}


def strategy_params(name: str) -> dict[str, Any]:
    """The strategy-specific parameters of `name` and their defaults (from its constructor)."""
    sig = inspect.signature(FEDERATED[name].__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name not in ("self", *COMMON, *_NOT_CONFIG) and p.kind is not p.VAR_KEYWORD
    }


def validate_aggregation(cfg: Mapping[str, Any], num_nodes: int) -> dict[str, Any]:
    """Every `aggregation.*` value checked against what the strategy and the federation allow;
    returns the strategy's keyword arguments (plus `round_timeout_s`)."""
    name = cfg.get("name")
    require(name in AGGREGATIONS, "aggregation.name", name, f"one of {', '.join(AGGREGATIONS)}")
    out: dict[str, Any] = {}
    for key, bound in COMMON.items():
        full = f"aggregation.{key}"
        if isinstance(bound, int):
            out[key] = require_int(cfg.get(key), full, bound)
        else:
            out[key] = require_number(cfg.get(key), full, *bound)
    if name in REFERENCES:
        return out
    defaults = strategy_params(name)
    if name == "quality":
        out[SERVER_VAL_KEY] = require_int(cfg.get(SERVER_VAL_KEY), f"aggregation.{SERVER_VAL_KEY}", 1)
    for key, value in cfg.items():
        if key not in ("name", SERVER_VAL_KEY) and key not in COMMON and key not in defaults:
            allowed = ", ".join([*COMMON, *defaults, *([SERVER_VAL_KEY] if name == "quality" else [])])
            raise ConfigError(f"aggregation.{key}", value, f"a key of aggregation {name} ({allowed})")
    for key, default in defaults.items():
        value = cfg.get(key, default)
        full = f"aggregation.{key}"
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise TypeError(f"{name}.{key}: non-numeric parameter {default!r} is not configurable")
        out[key] = require_int(value, full, 0) if isinstance(default, int) else require_number(
            value, full, low=0.0
        )
    _check_site_counts(name, out, num_nodes)
    return out


def sites_per_round(params: Mapping[str, Any], num_nodes: int) -> int:
    """How many sites Flower samples for training each round (its sample_nodes rule)."""
    return max(int(num_nodes * params["fraction_train"]), int(params["min_train_nodes"]))


def _check_site_counts(name: str, params: dict[str, Any], num_nodes: int) -> None:
    """Flower waits forever for sites that do not exist and skips robust aggregation rules that
    lack replies; both become clear errors here, before anything runs."""
    require(params["min_train_nodes"] <= num_nodes, "aggregation.min_train_nodes",
            params["min_train_nodes"], f"at most the number of sites ({num_nodes})")
    require(params["min_evaluate_nodes"] <= num_nodes, "aggregation.min_evaluate_nodes",
            params["min_evaluate_nodes"], f"at most the number of sites ({num_nodes})")
    per_round = sites_per_round(params, num_nodes)
    f = params.get("num_malicious_nodes", 0)
    if name == "bulyan":
        require(per_round >= 4 * f + 3, "aggregation.name", name,
                f"an aggregation that works with {per_round} site(s) per round: Bulyan needs at "
                f"least 4*num_malicious_nodes+3 = {4 * f + 3} (use a federation with more sites)")
    if name in ("krum", "multikrum"):
        require(per_round > f, "aggregation.num_malicious_nodes", f,
                f"fewer than the {per_round} site(s) per round")
    if name == "multikrum":
        require(1 <= params["num_nodes_to_select"] <= per_round, "aggregation.num_nodes_to_select",
                params["num_nodes_to_select"], f"an integer from 1 to {per_round} (sites per round)")


def build_aggregation(
    cfg: Mapping[str, Any],
    num_nodes: int,
    probe: Callable[[Any], float] | None = None,
) -> tuple[Strategy, float]:
    """A Flower strategy for `aggregation.*` and the per-round timeout in seconds. `probe`
    scores an update on the server's clean validation set (the `quality` aggregation's input)."""
    params = validate_aggregation(cfg, num_nodes)
    name = cfg["name"]
    if name in REFERENCES:
        raise ValueError(f"aggregation {name!r} is not federated (snowfed.sim.run.reference runs it)")
    timeout = params.pop("round_timeout_s")
    params.pop(SERVER_VAL_KEY, None)
    extra = {}
    if name == "quality":
        if probe is None:
            raise ValueError("the quality aggregation needs the server's validation probe")
        extra["probe"] = probe
    strategy = FEDERATED[name](
        min_available_nodes=num_nodes, weighted_by_key="num-examples", **params, **extra
    )
    return strategy, timeout
