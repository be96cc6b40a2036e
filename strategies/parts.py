"""The one way a strategy part (sampler, loss, label transform, ...) is registered and configured.

A part is a factory plus the schema of its parameters. The config names the part and gives a
mapping of parameters; `Part.resolve` checks that mapping against the schema (unknown names and
bad values raise ConfigError naming the full key) and fills in the defaults, so what a strategy
records in its manifest is every value it actually ran with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from snowfed.config import ConfigError, require, require_int, require_number

Check = Callable[[Any, str], Any]  # (value, key) -> the plain validated value, or ConfigError


class Param(NamedTuple):
    default: Any
    check: Check


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Check:
    """A real number in [low, high], or (low, high] with low_open (either bound optional)."""
    return lambda value, key: require_number(value, key, low, high, low_open)


def integer(minimum: int) -> Check:
    """An integer >= minimum (booleans are not integers here)."""
    return lambda value, key: require_int(value, key, minimum)


def choice(*options: str) -> Check:
    """One of a few names."""

    def check(value: Any, key: str) -> str:
        require(value in options, key, value, f"one of {', '.join(options)}")
        return str(value)

    return check


TASKS = ("segmentation", "classification")


class RoundLoss(ABC):
    """A loss that learns alongside the model (co-teaching's peer network). Subclassing this is
    how a loss declares its lifecycle; LocalStrategy then binds it to each round, passes it the
    batch's images with the logits, and has it keep its state in the node's memory."""

    @abstractmethod
    def start_round(self, model, memory: dict[str, Any], generator, lr: float, optimizer_cls,
                    device) -> None:
        """Before the round's steps: restore (or create) its state from the node's memory."""

    @abstractmethod
    def __call__(self, logits, labels, images):
        """The model's loss on the batch (the loss may take its own steps here)."""

    @abstractmethod
    def end_round(self, memory: dict[str, Any]) -> None:
        """After the round's steps: write what it must keep into the node's memory."""

    def optimizers(self) -> list:
        """Its own optimisers, whose lr follows the run's schedule with the model's."""
        return []


@dataclass(frozen=True)
class Part:
    """A registered part: `build(*args, **params)` makes it; `params` is its parameter schema.

    A part also says where it works: `tasks`, the tasks whose labels it can use, and
    `not_private`, why it cannot run under DP-SGD (None: it can). The config checks of
    snowfed.strategies.base are generated from these."""

    build: Callable[..., Any]
    params: Mapping[str, Param] = field(default_factory=dict)
    tasks: tuple[str, ...] = TASKS
    not_private: str | None = None

    def resolve(self, given: Any, key: str) -> dict[str, Any]:
        """Validated parameters with defaults filled in; `key` is where `given` sits (errors)."""
        given = {} if given is None else given
        require(isinstance(given, Mapping), key, given, "a mapping of parameter names to values")
        for name in given:
            if name not in self.params:
                allowed = f"a parameter of this part ({', '.join(self.params) or 'it takes none'})"
                raise ConfigError(f"{key}.{name}", given[name], allowed)
        return {
            name: param.check(given.get(name, param.default), f"{key}.{name}")
            for name, param in self.params.items()
        }
