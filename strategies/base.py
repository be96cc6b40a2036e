"""A local strategy is a composition of small parts chosen by name in config.

SNOW's own code made every strategy a flag of one big train(); here each part (sampler, loss,
optimiser) is looked up in its registry and can be tested alone. Parts are resolved, and bad
names rejected, when the strategy is built from its config mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from snowfed.config import ConfigError, require_int, require_number

from .losses import LOSSES, Loss
from .samplers import SAMPLERS

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class StrategySpec:
    """The validated config of a local strategy (plain values, picklable, JSON-able)."""

    name: str
    sampler: str
    loss: str
    optimizer: str
    lr: float
    local_steps: int
    batch_size: int
    tile_size: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], key: str = "strategy") -> StrategySpec:
        """Validate a strategy mapping; `key` is where it sits in the config (for errors)."""
        for field, registry in (("sampler", SAMPLERS), ("loss", LOSSES), ("optimizer", OPTIMIZERS)):
            if cfg.get(field) not in registry:
                raise ConfigError(f"{key}.{field}", cfg.get(field), f"one of {', '.join(registry)}")
        return cls(
            name=str(cfg.get("name", "custom")),
            sampler=cfg["sampler"],
            loss=cfg["loss"],
            optimizer=cfg["optimizer"],
            lr=require_number(cfg.get("lr"), f"{key}.lr", low=0.0),
            local_steps=require_int(cfg.get("local_steps"), f"{key}.local_steps", 1),
            batch_size=require_int(cfg.get("batch_size"), f"{key}.batch_size", 1),
            tile_size=require_int(cfg.get("tile_size"), f"{key}.tile_size", 4),
        )


@dataclass
class LocalStrategy:
    """A strategy bound to one node's training data: what the local trainer runs each round."""

    spec: StrategySpec
    sampler: Any
    loss: Loss

    @classmethod
    def build(cls, spec: StrategySpec, images: np.ndarray, labels: np.ndarray) -> LocalStrategy:
        return cls(spec=spec, sampler=SAMPLERS[spec.sampler](images, labels), loss=LOSSES[spec.loss])

    def optimizer(self, params) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.spec.optimizer](params, lr=self.spec.lr)
