"""snowfed.strategies: local training strategies, composed of samplers, losses and optimisers."""

from .base import LocalStrategy, StrategySpec

__all__ = ["LocalStrategy", "StrategySpec"]
