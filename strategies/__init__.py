"""snowfed.strategies: local training strategies, composed of samplers, losses, label transforms
and optimisers."""

from .base import LocalStrategy, StrategySpec

__all__ = ["LocalStrategy", "StrategySpec"]
