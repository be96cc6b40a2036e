"""Config schema helpers: compose the Hydra tree, list group options, fail early and clearly.

Every check raises :class:`ConfigError` naming the key, the bad value and what is allowed, so a
user sees one paragraph before any data is generated or Ray starts.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

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
    """Load configs/<group>/<name>.yaml as Hydra composes it alone; `key` is the config key that
    named it (for the error).

    A per-site option (`federation.hospitals[i].strategy: weak`) is read after Hydra composed
    the run, so this follows the one form of defaults list the shipped options use, Hydra's
    "extending a config of the same group": other options of the group, then `_self_`."""
    options = group_options(group)
    if name not in options:
        raise ConfigError(key, name, f"one of {', '.join(options)}")
    text = (resources.files(CONFIG_PACKAGE) / group / f"{name}.yaml").read_text()
    option = OmegaConf.create(text)
    parents = list(option.pop("defaults", None) or [])
    if parents and parents[-1] == "_self_":
        parents.pop()
    if not all(isinstance(p, str) and p in options and p != name for p in parents):
        raise ValueError(f"configs/{group}/{name}.yaml: its defaults list may name only other "
                         f"{group} options, then _self_; it has {parents}")
    return OmegaConf.merge(*(load_group_option(group, p, key) for p in parents), option)


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
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_group_overrides(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base=None):
        try:
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            raise _composition_error(overrides, err) from None
        defaults = hydra_compose(config_name="config") if any(
            o.startswith("+") and "." not in o.split("=", 1)[0] for o in overrides) else None
    if defaults is not None:  # `+key=value` adds a top-level key no part of snowfed reads
        for override in overrides:
            key, _, value = override.partition("=")
            key = key.lstrip("+")
            if override.startswith("+") and "." not in key and key not in defaults:
                raise ConfigError(key, value, f"a top-level key of snowfed's config ("
                                  f"{', '.join(k for k in defaults if k != 'hydra')})")
    return cfg


def _composition_error(overrides: Sequence[str], err: Exception) -> ConfigError:
    """Hydra's composition error for these overrides as one ConfigError line: the override it
    names, and for a key that does not exist the closest existing ones."""
    import difflib

    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    named = next((o for o in overrides if f"'{o.split('=', 1)[0].lstrip('+~')}'" in message), None)
    if named is None:
        return ConfigError("overrides", " ".join(overrides), f"composable by Hydra ({message})")
    key, _, value = named.partition("=")
    key = key.lstrip("+~")
    if "Could not override" in message or "Key" in message and "not in struct" in message:
        parent, _, leaf = key.rpartition(".")
        known = _keys_at(parent, overrides)
        close = difflib.get_close_matches(leaf, known, n=3, cutoff=0.6)
        names = [f"{parent}.{c}" if parent else c for c in close]
        hint = f"did you mean {' or '.join(names)}? " if close else ""
        where = f"the keys of {parent}" if parent else "the top-level keys"
        return ConfigError(key, value, f"an existing key: {hint}{where} are {', '.join(known)} "
                           f"(+{key}=... adds a key where a part's params allow it)")
    return ConfigError(key, value, f"composable by Hydra ({message})")


def _keys_at(parent: str, overrides: Sequence[str]) -> list[str]:
    """The keys under `parent` in the config composed without the overrides that failed (only
    the group choices among them)."""
    from hydra import compose as hydra_compose

    groups = [o for o in overrides if o.split("=", 1)[0] in GROUPS]
    try:
        node: Any = hydra_compose(config_name="config", overrides=groups)
    except Exception:  # noqa: BLE001 - the hint is best effort; the error names the key anyway
        node = hydra_compose(config_name="config")
    for part in filter(None, parent.split(".")):
        if isinstance(node, ListConfig):  # a list's items by index (federation.hospitals.0)
            node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
        else:
            node = node.get(part) if hasattr(node, "get") else None
    keys = [str(k) for k in node if k != "hydra"] if hasattr(node, "keys") else []
    return keys + [g for g in GROUPS if g not in keys] if not parent else keys


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless `ok`."""
    if not ok:
        raise ConfigError(key, value, allowed)


def require_creatable_dir(path: Any, key: str) -> None:
    """`path` is a directory this process can write into, or can be made one: its nearest
    existing ancestor is a writable directory (a path under a file failed in Hydra's or the
    store's mkdir, with a traceback)."""
    target = Path(str(path)).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    require(existing.is_dir(), key, str(path), f"a directory, or a path one can be made at "
            f"({existing} is a file)")
    require(os.access(existing, os.W_OK | os.X_OK), key, str(path),
            f"a directory this user can write into ({existing} is not writable)")


def require_keys(given: Mapping[str, Any], allowed: Sequence[str], key: str, what: str,
                 note: str = "") -> None:
    """Refuse a key of the mapping at `key` that is not `allowed`: ConfigError naming
    `<key>.<name>`, saying it must be `what` and listing the allowed keys (then `note`)."""
    for name in given:
        require(name in allowed, f"{key}.{name}", given[name],
                f"{what} ({', '.join(allowed)}{'; ' + note if note else ''})")


def is_real(value: Any) -> bool:
    """A real number, not a boolean and not NaN (YAML's `.nan` and a NaN from arithmetic are
    refused wherever a number is expected)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def require_int(value: Any, key: str, minimum: int) -> int:
    """An integer >= minimum (booleans are not integers here)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(ok, key, value, f"an integer >= {minimum}")
    return int(value)


def require_number(
    value: Any, key: str, low: float | None = None, high: float | None = None,
    low_open: bool = False,
) -> float:
    """A real number in [low, high] (either bound optional; `low_open`: above low, not at it);
    never NaN."""
    ok = is_real(value)
    ok = ok and (low is None or value > low or (value == low and not low_open))
    ok = ok and (high is None or value <= high)
    if low is not None and high is not None:
        allowed = f"a number in {'(' if low_open else '['}{low}, {high}]"
    elif low is not None:
        allowed = f"a number {'>' if low_open else '>='} {low}"
    elif high is not None:
        allowed = f"a number <= {high}"
    else:
        allowed = "a number"
    require(ok, key, value, allowed)
    return float(value)


# The aggregations that are not federated: one process trains them (sim.run.reference)
REFERENCE_AGGREGATIONS = ("pooled", "local")


def plain_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as plain Python values, without Hydra's own node."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in cfg.items() if k != "hydra"}
