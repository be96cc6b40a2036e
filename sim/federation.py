"""The virtual federation: turn the `federation` config into hospitals with data, appearance,
noisy labels and a local strategy, validated up front and written once as a federation store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from snowfed.config import (
    ConfigError,
    load_group_option,
    require,
    require_int,
    require_keys,
    require_number,
)
from snowfed.data.synthetic import Appearance, generate
from snowfed.models import MODEL_TASKS, MODELS, NORMS, build_model
from snowfed.server.aggregation import SERVER_VAL_KEY, validate_aggregation
from snowfed.store import ARRAYS, FederationStore, write_store
from snowfed.strategies import StrategySpec
from snowfed.strategies.init import LAST_RUN, checkpoint_file, last_run_checkpoint, load_checkpoint

from .noise import SnowNoise, degrade_dataset

NOISE_FIELDS = ("p_remove", "sigma", "simplify_every", "bounding_box")
APPEARANCE_FIELDS = tuple(Appearance.__dataclass_fields__)


@dataclass(frozen=True)
class Hospital:
    name: str
    num_images: int
    appearance: Appearance
    noise_profile: str
    noise: SnowNoise
    strategy: StrategySpec
    clean_fraction: float = 0.0  # share of the training images whose labels stay clean (verified)
    failure: dict[str, Any] | None = None  # simulated crash/stall: {rounds, mode, stall_s}


@dataclass(frozen=True)
class FederationPlan:
    name: str
    image_size: int
    val_fraction: float
    test_images_per_site: int
    seed: int
    hospitals: list[Hospital]
    server_val_per_site: int = 0  # clean images the server holds per site appearance (quality)


def _noise(spec: Any, key: str) -> tuple[str, SnowNoise]:
    """A preset name, or {preset: NAME, field: value...}, as a validated SnowNoise."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    require(isinstance(spec, Mapping), key, spec, "a noise preset name or a mapping")
    if "preset" in spec:
        base = dict(load_group_option("noise", spec["preset"], f"{key}.preset"))
        params = {**base, **{k: v for k, v in spec.items() if k != "preset"}}
    else:
        params = dict(spec)
    name = str(params.pop("name", spec.get("preset", "custom")))
    require_keys(params, NOISE_FIELDS, key, "a noise parameter")
    noise = SnowNoise(
        p_remove=require_number(params.get("p_remove", 0.0), f"{key}.p_remove", 0.0, 1.0),
        sigma=require_number(params.get("sigma", 0.0), f"{key}.sigma", low=0.0),
        simplify_every=require_int(params.get("simplify_every", 1), f"{key}.simplify_every", 1),
        bounding_box=bool(params.get("bounding_box", False)),
    )
    return name, noise


def _strategy(spec: Any, default: Mapping[str, Any], key: str) -> StrategySpec:
    """The node's strategy: the global default, a named option, or {name: NAME, key: value}."""
    if spec is None:
        return StrategySpec.from_config(default, "strategy")
    if isinstance(spec, str):
        spec = {"name": spec}
    require(isinstance(spec, Mapping) and "name" in spec, key, spec, "a strategy name or mapping")
    base = dict(load_group_option("strategy", spec["name"], f"{key}.name"))
    return StrategySpec.from_config({**base, **spec}, key)


def _appearance(spec: Any, key: str) -> Appearance:
    spec = dict(spec or {})
    require_keys(spec, APPEARANCE_FIELDS, key, "a field of Appearance")
    for field in ("stain_strength", "blur_sigma", "noise_std", "brightness"):
        if field in spec:
            require_number(spec[field], f"{key}.{field}", low=0.0)
    return Appearance(**spec)


FAILURE_MODES = ("raise", "stall", "nan")  # nan: the site replies with a NaN update (diverged)


def _failure(spec: Any, key: str) -> dict[str, Any] | None:
    """A hospital's simulated failure: {rounds: [..], mode: raise|stall|nan, stall_s: seconds}."""
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


def _num_verified(h: Hospital, val_fraction: float) -> int:
    n_val = max(1, int(round(val_fraction * h.num_images))) if val_fraction else 0
    return int(round(h.clean_fraction * (h.num_images - n_val)))


def configured_model(cfg: Mapping[str, Any], num_classes: int | None = None):
    """The configured network; `num_classes` from the dataset when the task does not fix it."""
    model_cfg = dict(cfg["model"])
    name = model_cfg.pop("name", None)
    require(name in MODELS, "model.name", name, f"one of {', '.join(MODELS)}")
    task = cfg["task"]["name"]
    require(MODEL_TASKS[name] == task, "model.name", name,
            f"a {task} model ({', '.join(m for m, t in MODEL_TASKS.items() if t == task)}) with task={task}")
    _check_model_params(name, model_cfg)
    return build_model(name, num_classes=int(num_classes or cfg["task"]["num_classes"]), **model_cfg)


def _check_model_params(name: str, params: Mapping[str, Any]) -> None:
    """The model's constructor signature is its schema: every `model.*` key must be one of its
    parameters (but the task's num_classes), a whole-number one at least 1, `norm` one of NORMS."""
    import inspect

    signature = inspect.signature(MODELS[name])
    allowed = [p for p in signature.parameters if p != "num_classes"]
    for key, value in params.items():
        require(key in allowed, f"model.{key}", value, f"a parameter of model {name} ({', '.join(allowed)})")
        annotation = signature.parameters[key].annotation
        if annotation in (int, "int"):
            require_int(value, f"model.{key}", 1)
        elif key == "norm":
            require(value in NORMS, "model.norm", value, f"one of {', '.join(NORMS)}")


def _check_against_model(spec: StrategySpec, model, cfg: Mapping[str, Any], key: str) -> StrategySpec:
    """Checks of a strategy that need the configured model: stages to freeze, a checkpoint that
    fits. A checkpoint path comes back resolved to its file, so the run records what it read."""
    name = cfg["model"].get("name")
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
                f"a checkpoint file or run directory ({LAST_RUN!r}: the newest completed run under "
                f"{root}/ whose final model fits model={name}; there is none yet)")
        path = str(found)
    load_checkpoint(path, model, path_key)
    resolved = str(checkpoint_file(path).resolve())
    return replace(spec, init_params={**spec.init_params, "path": resolved})


SYNTHETIC = "synthetic"


def resolve_federation(cfg: Mapping[str, Any]):
    """Validate the whole federation config; raise ConfigError on the first bad key. A loaded
    dataset (anything but dataset=synthetic) is cut into sites by sim.dataset_sites."""
    if cfg["dataset"]["name"] != SYNTHETIC:
        from .dataset_sites import resolve  # it builds on this module's hospital checks

        models = {}

        def check_model(spec: StrategySpec, key: str, num_classes: int) -> StrategySpec:
            if num_classes not in models:
                models[num_classes] = configured_model(cfg, num_classes)
            return _check_against_model(spec, models[num_classes], cfg, key)

        return resolve(cfg, check_model)
    require(cfg["task"]["name"] == "segmentation", "task", cfg["task"]["name"],
            "segmentation with dataset=synthetic (its labels are masks); pick a classification "
            "dataset (digits, npz, image_folder) for task=classification")
    fed = cfg["federation"]
    hospitals_cfg = expand_hospitals(fed.get("hospitals"))
    require(len(hospitals_cfg) > 0, "federation.hospitals", len(hospitals_cfg),
            "a list of at least one hospital")
    require_int(cfg.get("rounds"), "rounds", 1)
    global_noise = cfg.get("noise")
    model = configured_model(cfg)
    image_size = require_int(cfg["dataset"].get("image_size"), "dataset.image_size", 16)
    hospitals, names = [], set()
    for i, h in enumerate(hospitals_cfg):
        key = f"federation.hospitals[{i}]"
        name = h.get("name")
        require(isinstance(name, str) and name and name not in names, f"{key}.name", name,
                "a unique non-empty name")
        names.add(name)
        strategy = _strategy(h.get("strategy"), cfg["strategy"], f"{key}.strategy")
        strategy_key = f"{key}.strategy" if h.get("strategy") is not None else "strategy"
        strategy.require_task("segmentation", strategy_key)
        require(strategy.tile_size <= image_size, f"{strategy_key}.tile_size", strategy.tile_size,
                f"at most dataset.image_size={image_size} (a tile is cut from one image)")
        if global_noise is not None:
            profile, noise = _noise({"preset": global_noise["name"], **global_noise}, "noise")
        else:
            profile, noise = _noise(h.get("noise", "clean"), f"{key}.noise")
        hospitals.append(
            Hospital(
                name=name,
                num_images=require_int(h.get("num_images"), f"{key}.num_images", 2),
                appearance=_appearance(h.get("appearance"), f"{key}.appearance"),
                noise_profile=profile,
                noise=noise,
                strategy=_check_against_model(strategy, model, cfg, strategy_key),
                clean_fraction=require_number(h.get("clean_fraction", 0.0), f"{key}.clean_fraction",
                                              0.0, 1.0),
                failure=_failure(h.get("failure"), f"{key}.failure"),
            )
        )
    val_fraction = require_number(fed.get("val_fraction"), "federation.val_fraction", 0.0, 0.9)
    for i, h in enumerate(hospitals):
        if h.strategy.teacher == "clean":
            require(_num_verified(h, val_fraction) > 0, f"federation.hospitals[{i}].clean_fraction",
                    h.clean_fraction, "a fraction > 0 leaving at least one verified training image "
                    "(this hospital's strategy has teacher 'clean', trained on its verified images)")
    return FederationPlan(
        name=str(fed.get("name", "custom")),
        image_size=image_size,
        val_fraction=val_fraction,
        test_images_per_site=require_int(
            fed.get("test_images_per_site"), "federation.test_images_per_site", 1
        ),
        seed=require_int(cfg.get("seed"), "seed", 0),
        hospitals=hospitals,
        server_val_per_site=int(validate_aggregation(cfg["aggregation"], len(hospitals))
                                .get(SERVER_VAL_KEY, 0)),
    )


def build_store(plan, cfg: Mapping[str, Any], path: Path) -> FederationStore:
    """Write the run's federation store: sim.dataset_sites for a loaded dataset, else the
    synthetic hospitals below."""
    if not isinstance(plan, FederationPlan):
        from .dataset_sites import build

        return build(plan, cfg, path)
    return _build_synthetic_store(plan, cfg, path)


def _build_synthetic_store(plan: FederationPlan, cfg: Mapping[str, Any], path: Path) -> FederationStore:
    """Generate each hospital's images (its appearance), split them (global clean test, the
    node's clean held-out split, its training set), degrade the training labels with the
    hospital's noise, measure what the noise did, and write one store for the whole run.

    The store holds the hospitals' rows one after the other (each its training rows, then its
    val rows), then every site's test rows, then the server's rows, so that each index list in
    the manifest is one contiguous range and a node's arrays are views of the store."""
    node_rows, test_rows, server_rows = [], [], []  # (images, clean, noisy) per split and site
    nodes, test, server_val = [], [], []
    # where each split starts in the store: the sites' own rows, then the test rows, the server's
    offset = 0
    test_offset = sum(h.num_images for h in plan.hospitals)
    server_offset = test_offset + plan.test_images_per_site * len(plan.hospitals)
    for i, h in enumerate(plan.hospitals):
        n_test = plan.test_images_per_site
        total = h.num_images + n_test
        imgs, inst = generate(total, plan.image_size, seed=plan.seed * 7919 + i, appearance=h.appearance)
        n_val = max(1, int(round(plan.val_fraction * h.num_images))) if plan.val_fraction else 0
        n_train = h.num_images - n_val
        if n_train < 1:
            raise ConfigError(f"federation.hospitals[{i}].num_images", h.num_images,
                              f"large enough to leave a training image after a {plan.val_fraction} "
                              "validation split")
        n_verified = _num_verified(h, plan.val_fraction)
        # generated in the order test, val, train; the first n_verified training images keep
        # their clean labels, the rest are degraded
        labels, stats = degrade_dataset(inst[n_test + n_val + n_verified :], h.noise,
                                        seed=plan.seed * 104729 + i)
        clean_i = (inst > 0).astype(np.uint8)
        noisy_i = clean_i.copy()
        noisy_i[n_test + n_val + n_verified :] = labels
        site = (imgs, clean_i, noisy_i)
        node_rows.append(tuple(a[n_test + n_val :] for a in site))  # its training rows
        node_rows.append(tuple(a[n_test : n_test + n_val] for a in site))  # its val rows
        test_rows.append(tuple(a[:n_test] for a in site))
        train_start, val_start = offset, offset + n_train
        test.extend(range(test_offset, test_offset + n_test))
        nodes.append(
            {
                "name": h.name,
                "val": list(range(val_start, val_start + n_val)),
                "train": list(range(train_start, train_start + n_train)),
                "verified": list(range(train_start, train_start + n_verified)),
                "num_train": n_train,
                "num_val": n_val,
                "noise_profile": h.noise_profile,
                "noise": asdict(h.noise),
                "label_noise": stats,
                "appearance": asdict(h.appearance),
                "strategy": asdict(h.strategy),
                **({"failure": h.failure} if h.failure else {}),
            }
        )
        offset += h.num_images
        test_offset += n_test
        if plan.server_val_per_site:
            # the server's clean images in this site's appearance, from a seed of their own
            k = plan.server_val_per_site
            imgs, inst = generate(k, plan.image_size, seed=plan.seed * 7919 + 500_009 + i,
                                  appearance=h.appearance)
            mask = (inst > 0).astype(np.uint8)
            server_rows.append((imgs, mask, mask))
            server_val.extend(range(server_offset, server_offset + k))
            server_offset += k
    manifest = {
        "federation": plan.name,
        "seed": plan.seed,
        "image_size": plan.image_size,
        "task": "segmentation",
        "num_classes": int(cfg["task"]["num_classes"]),
        "model": dict(cfg["model"]),
        "rounds": int(cfg["rounds"]),
        "privacy": dict(cfg["privacy"]),  # a site resolves its own DP-SGD settings from it
        "test": test,
        "server_val": server_val,
        "nodes": nodes,
    }
    chunks = node_rows + test_rows + server_rows
    arrays = {name: np.concatenate([c[k] for c in chunks]) for k, name in enumerate(ARRAYS)}
    return FederationStore(write_store(path, arrays, manifest))


def node_facts(store: FederationStore) -> dict[str, dict[str, Any]]:
    """What summary.json says of each node before any training (appearance for synthetic
    sites; class histogram, patients and shortcut for sites cut from a loaded dataset)."""
    optional = ("appearance", "class_histogram", "patients", "shortcut")
    return {
        n["name"]: {
            "noise_profile": n["noise_profile"],
            "strategy": n["strategy"]["name"],
            "num_train": n["num_train"],
            "num_val": n["num_val"],
            "num_verified": len(n.get("verified", [])),
            "label_noise": n["label_noise"],
            "noise": n["noise"],
            **{k: n[k] for k in optional if k in n},
        }
        for n in store.nodes
    }
