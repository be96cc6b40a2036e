"""What every site of a federation has, parsed in one place for the synthetic hospitals
(sim.federation) and for the sites cut from a loaded dataset (sim.federation.datasets): its name, its
strategy checked against the task and the model, which noise spec applies (the run's `noise`
over the site's own), its share of verified labels and its simulated failure. A new per-site
option common to both is parsed here once."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from snowfed.config import (
    ConfigError,
    load_group_option,
    require,
    require_int,
    require_keys,
    require_number,
)
from snowfed.models import MODEL_TASKS, MODELS, NORMS, model_from_config
from snowfed.sim.noise.masks import SnowNoise
from snowfed.strategies import StrategySpec
from snowfed.strategies.init import LAST_RUN, checkpoint_file, last_run_checkpoint, load_checkpoint

SNOW_NOISE_FIELDS = ("p_remove", "sigma", "simplify_every", "bounding_box")
FAILURE_MODES = ("raise", "stall", "nan")  # nan: the site replies with a NaN update (diverged)


def expand_hospitals(spec: Any) -> list[Mapping[str, Any]]:
    """`federation.hospitals`: a list of hospitals, or {count: N, name: PREFIX, key: value...}
    for N alike hospitals named PREFIX000, PREFIX001, ... (the many-site benchmarks: 100 or 1000
    virtual sites are not written out one by one)."""
    if not isinstance(spec, Mapping):
        return list(spec or [])
    count = require_int(spec.get("count"), "federation.hospitals.count", 1)
    prefix = str(spec.get("name", "site"))
    width = len(str(count - 1))
    alike = {k: v for k, v in spec.items() if k not in ("count", "name")}
    return [{"name": f"{prefix}{i:0{width}d}", **alike} for i in range(count)]


def snow_noise(spec: Any, key: str) -> tuple[str, SnowNoise]:
    """A segmentation noise spec: a preset name, or {preset: NAME, field: value...}, as its
    profile name and a validated SnowNoise."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    require(isinstance(spec, Mapping), key, spec, "a noise preset name or a mapping")
    if "preset" in spec:
        base = dict(load_group_option("noise", spec["preset"], f"{key}.preset"))
        params = {**base, **{k: v for k, v in spec.items() if k != "preset"}}
    else:
        params = dict(spec)
    name = str(params.pop("name", spec.get("preset", "custom")))
    require_keys(params, SNOW_NOISE_FIELDS, key, "a noise parameter")
    noise = SnowNoise(
        p_remove=require_number(params.get("p_remove", 0.0), f"{key}.p_remove", 0.0, 1.0),
        sigma=require_number(params.get("sigma", 0.0), f"{key}.sigma", low=0.0),
        simplify_every=require_int(params.get("simplify_every", 1), f"{key}.simplify_every", 1),
        bounding_box=bool(params.get("bounding_box", False)),
    )
    return name, noise


def _strategy(spec: Any, default: Mapping[str, Any], key: str) -> StrategySpec:
    """The site's strategy: the global default, a named option, or {name: NAME, key: value}."""
    if spec is None:
        return StrategySpec.from_config(default, "strategy")
    if isinstance(spec, str):
        spec = {"name": spec}
    require(isinstance(spec, Mapping) and "name" in spec, key, spec, "a strategy name or mapping")
    base = dict(load_group_option("strategy", spec["name"], f"{key}.name"))
    return StrategySpec.from_config({**base, **spec}, key)


def _failure(spec: Any, key: str) -> dict[str, Any] | None:
    """A site's simulated failure: {rounds: [..], mode: raise|stall|nan, stall_s: seconds}."""
    if spec is None:
        return None
    require(isinstance(spec, Mapping), key, spec, "a mapping {rounds: [...], mode: raise|stall|nan}")
    require_keys(spec, ("rounds", "mode", "stall_s"), key, "a key of failure")
    listed = spec.get("rounds")
    require(isinstance(listed, (list, tuple)) and len(listed) > 0, f"{key}.rounds", listed,
            "a non-empty list of round numbers")
    for r in listed:
        require_int(r, f"{key}.rounds", 1)
    mode = spec.get("mode", "raise")
    require(mode in FAILURE_MODES, f"{key}.mode", mode, f"one of {', '.join(FAILURE_MODES)}"
            + (" (quote it, mode:'nan': a bare nan is read as a number)"
               if isinstance(mode, float) else ""))
    stall_s = require_number(spec.get("stall_s", 0.0), f"{key}.stall_s", low=0.0)
    require(mode != "stall" or stall_s > 0, f"{key}.stall_s", stall_s, "> 0 with mode stall")
    return {"rounds": [int(r) for r in listed], "mode": mode, "stall_s": stall_s}


def configured_model(cfg: Mapping[str, Any], num_classes: int | None = None):
    """The configured network; `num_classes` from the dataset when the task does not fix it."""
    model_cfg = dict(cfg["model"])
    name = model_cfg.pop("name", None)
    require(name in MODELS, "model.name", name, f"one of {', '.join(MODELS)}")
    task = cfg["task"]["name"]
    require(MODEL_TASKS[name] == task, "model.name", name,
            f"a {task} model ({', '.join(m for m, t in MODEL_TASKS.items() if t == task)}) with task={task}")
    _check_model_params(name, model_cfg)
    return model_from_config(cfg["model"], num_classes or cfg["task"]["num_classes"])


def _check_model_params(name: str, params: Mapping[str, Any]) -> None:
    """The model's constructor signature is its schema: every `model.*` key must be one of its
    parameters (but the task's num_classes), a whole-number one at least 1, `norm` one of NORMS."""
    signature = inspect.signature(MODELS[name])
    allowed = [p for p in signature.parameters if p != "num_classes"]
    for key, value in params.items():
        require(key in allowed, f"model.{key}", value, f"a parameter of model {name} ({', '.join(allowed)})")
        annotation = signature.parameters[key].annotation
        if annotation in (int, "int"):
            require_int(value, f"model.{key}", 1)
        elif key == "norm":
            require(value in NORMS, "model.norm", value, f"one of {', '.join(NORMS)}")


class ModelChecks:
    """Checks of a strategy that need the configured model (stages to freeze, a checkpoint that
    fits), with the model built once per class count for all the sites."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg
        self._models: dict[int | None, Any] = {}

    def model(self, num_classes: int | None = None):
        if num_classes not in self._models:
            self._models[num_classes] = configured_model(self.cfg, num_classes)
        return self._models[num_classes]

    def check(self, spec: StrategySpec, key: str, num_classes: int | None = None) -> StrategySpec:
        """`spec` checked; a checkpoint path comes back resolved to its file, so the run records
        what it read."""
        model, cfg = self.model(num_classes), self.cfg
        stages = [stage for stage, _ in model.named_stages]
        require(spec.freeze_stages <= len(stages), f"{key}.freeze_stages", spec.freeze_stages,
                f"an integer from 0 to {len(stages)} (the model's stages: {', '.join(stages)})")
        if spec.init != "checkpoint":
            return spec
        path_key = f"{key}.init_params.path"
        path = spec.init_params["path"]
        if path == LAST_RUN:
            root = Path(str(cfg.get("run_dir", "runs"))).parent

            def fits(file: Path) -> bool:
                try:
                    load_checkpoint(file, model, path_key)
                except ConfigError:
                    return False
                return True

            found = last_run_checkpoint(root, fits)
            require(found is not None, path_key, path,
                    f"a checkpoint file or run directory ({LAST_RUN!r}: the newest completed run "
                    f"under {root}/ whose final model fits model={cfg['model'].get('name')}; there "
                    "is none yet)")
            path = str(found)
        load_checkpoint(path, model, path_key)
        resolved = str(checkpoint_file(path).resolve())
        return replace(spec, init_params={**spec.init_params, "path": resolved})


@dataclass(frozen=True)
class SiteBasics:
    """The part of a site's config that every federation parses the same way."""

    name: str
    strategy: StrategySpec  # checked against the task and the model
    strategy_key: str  # where the strategy was set: the site's own key or the run's `strategy`
    noise_spec: Any  # the run's `noise` when set, else the site's own (parsed by the caller)
    noise_key: str
    clean_fraction: float
    failure: dict[str, Any] | None


def site_basics(h: Mapping[str, Any], i: int, cfg: Mapping[str, Any], task: str,
                taken: set[str], models: ModelChecks, num_classes: int | None = None) -> SiteBasics:
    """Parse hospital `i` of `federation.hospitals` (its name not in `taken`, which gains it)."""
    key = f"federation.hospitals[{i}]"
    name = h.get("name")
    require(isinstance(name, str) and name and name not in taken, f"{key}.name", name,
            "a unique non-empty name")
    taken.add(name)
    strategy = _strategy(h.get("strategy"), cfg["strategy"], f"{key}.strategy")
    strategy_key = f"{key}.strategy" if h.get("strategy") is not None else "strategy"
    strategy.require_task(task, strategy_key)
    global_noise = cfg.get("noise")
    if global_noise is not None:
        noise_spec, noise_key = {"preset": global_noise["name"], **global_noise}, "noise"
    else:
        noise_spec, noise_key = h.get("noise", "clean"), f"{key}.noise"
    return SiteBasics(
        name=name,
        strategy=models.check(strategy, strategy_key, num_classes),
        strategy_key=strategy_key,
        noise_spec=noise_spec,
        noise_key=noise_key,
        clean_fraction=require_number(h.get("clean_fraction", 0.0), f"{key}.clean_fraction",
                                      0.0, 1.0),
        failure=_failure(h.get("failure"), f"{key}.failure"),
    )
