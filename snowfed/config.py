"""Config schema helpers: compose the Hydra tree, list group options, fail early and clearly.

Every check raises :class:`ConfigError` naming the key, the bad value and what is allowed, so a
user sees one paragraph before any data is generated or Ray starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_PACKAGE = "snowfed.configs"
GROUPS = (
    "task",
    "dataset",
    "model",
    "federation",
    "noise",
    "strategy",
    "aggregation",
    "privacy",
    "backend",
    "logger",
    "experiment",
)


class ConfigError(ValueError):
    """A config value that cannot work: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"Invalid config: {key}={value!r} is not allowed; {key} must be {allowed}.")


def group_options(group: str) -> list[str]:
    """Option names of a config group (the YAML files of configs/<group>/)."""
    folder = resources.files(CONFIG_PACKAGE) / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_group_option(group: str, name: str, key: str) -> DictConfig:
    """Load configs/<group>/<name>.yaml; `key` is the config key that named it (for the error)."""
    options = group_options(group)
    if name not in options:
        raise ConfigError(key, name, f"one of {', '.join(options)}")
    text = (resources.files(CONFIG_PACKAGE) / group / f"{name}.yaml").read_text()
    return OmegaConf.create(text)


def check_group_overrides(overrides: Iterable[str]) -> None:
    """Reject `group=option` overrides naming an option that does not exist, before Hydra runs.

    Hydra would refuse them too, but with a multi-line trace; sweeps (`a,b`) are checked per item.
    """
    for override in overrides:
        if "=" not in override or override.startswith(("hydra.", "+", "~")):
            continue
        key, value = override.split("=", 1)
        key = key.lstrip("+")
        if key not in GROUPS:
            continue
        options = group_options(key)
        for item in _sweep_items(value):
            if item not in options and item != "null":
                raise ConfigError(key, item, f"one of {', '.join(options)}")


def _sweep_items(value: str) -> list[str]:
    """The choices of a Hydra override value: `a,b` -> [a, b]; `choice(a,b)` -> [a, b]."""
    value = value.strip()
    if value.startswith("choice(") and value.endswith(")"):
        value = value[len("choice(") : -1]
    return [v.strip() for v in value.split(",") if v.strip()]


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config for these overrides, as `snowfed run` would see it (no Hydra job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    check_group_overrides(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless `ok`."""
    if not ok:
        raise ConfigError(key, value, allowed)


def require_keys(given: Mapping[str, Any], allowed: Sequence[str], key: str, what: str,
                 note: str = "") -> None:
    """Refuse a key of the mapping at `key` that is not `allowed`: ConfigError naming
    `<key>.<name>`, saying it must be `what` and listing the allowed keys (then `note`)."""
    for name in given:
        require(name in allowed, f"{key}.{name}", given[name],
                f"{what} ({', '.join(allowed)}{'; ' + note if note else ''})")


def require_int(value: Any, key: str, minimum: int) -> int:
    """An integer >= minimum (booleans are not integers here)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(ok, key, value, f"an integer >= {minimum}")
    return int(value)


def require_number(
    value: Any, key: str, low: float | None = None, high: float | None = None
) -> float:
    """A real number in [low, high] (either bound optional)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if low is not None and high is not None:
        allowed = f"a number in [{low}, {high}]"
    elif low is not None:
        allowed = f"a number >= {low}"
    else:
        allowed = "a number"
    require(ok, key, value, allowed)
    return float(value)
