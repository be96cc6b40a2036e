"""The synthetic federation: turn the `federation` config into hospitals with data, appearance,
noisy labels and a local strategy, validated up front and written once as a federation store.
What every site has is parsed by sim.federation.sites; a loaded dataset is cut into sites by
sim.federation.datasets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snowfed import seeds
from snowfed.config import ConfigError, require, require_int, require_keys, require_number
from snowfed.data.synthetic import Appearance, generate
from snowfed.server.aggregation import SERVER_VAL_KEY, validate_aggregation
from snowfed.sim.federation import datasets
from snowfed.sim.federation.sites import ModelChecks, expand_hospitals, site_basics, snow_noise
from snowfed.sim.noise.masks import SnowNoise, degrade_dataset
from snowfed.store import ARRAYS, FederationStore, write_store
from snowfed.strategies import StrategySpec

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


def _appearance(spec: Any, key: str) -> Appearance:
    spec = dict(spec or {})
    require_keys(spec, APPEARANCE_FIELDS, key, "a field of Appearance")
    for field in ("stain_strength", "blur_sigma", "noise_std", "brightness"):
        if field in spec:
            require_number(spec[field], f"{key}.{field}", low=0.0)
    return Appearance(**spec)


def _num_verified(h: Hospital, val_fraction: float) -> int:
    n_val = max(1, int(round(val_fraction * h.num_images))) if val_fraction else 0
    return int(round(h.clean_fraction * (h.num_images - n_val)))


SYNTHETIC = "synthetic"


def resolve_federation(cfg: Mapping[str, Any], loaded: dict | None = None):
    """Validate the whole federation config; raise ConfigError on the first bad key. A loaded
    dataset (anything but dataset=synthetic) is cut into sites by sim.federation.datasets;
    `loaded`: datasets loaded already (snowfed.data.loaders.load_dataset)."""
    models = ModelChecks(cfg)
    if cfg["dataset"]["name"] != SYNTHETIC:
        return datasets.resolve(cfg, models, loaded)
    require(cfg["task"]["name"] == "segmentation", "task", cfg["task"]["name"],
            "segmentation with dataset=synthetic (its labels are masks); pick a classification "
            "dataset (digits, npz, image_folder) for task=classification")
    fed = cfg["federation"]
    hospitals_cfg = expand_hospitals(fed.get("hospitals"))
    require(len(hospitals_cfg) > 0, "federation.hospitals", len(hospitals_cfg),
            "a list of at least one hospital")
    require_int(cfg.get("rounds"), "rounds", 1)
    image_size = require_int(cfg["dataset"].get("image_size"), "dataset.image_size", 16)
    hospitals, names = [], set()
    for i, h in enumerate(hospitals_cfg):
        key = f"federation.hospitals[{i}]"
        site = site_basics(h, i, cfg, "segmentation", names, models)
        require(site.strategy.tile_size <= image_size, f"{site.strategy_key}.tile_size",
                site.strategy.tile_size,
                f"at most dataset.image_size={image_size} (a tile is cut from one image)")
        profile, noise = snow_noise(site.noise_spec, site.noise_key)
        hospitals.append(
            Hospital(
                name=site.name,
                num_images=require_int(h.get("num_images"), f"{key}.num_images", 2),
                appearance=_appearance(h.get("appearance"), f"{key}.appearance"),
                noise_profile=profile,
                noise=noise,
                strategy=site.strategy,
                clean_fraction=site.clean_fraction,
                failure=site.failure,
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
    """Write the run's federation store: sim.federation.datasets for a loaded dataset, else the
    synthetic hospitals below."""
    if not isinstance(plan, FederationPlan):
        return datasets.build(plan, cfg, path)
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
        imgs, inst = generate(total, plan.image_size, seed=seeds.site_images(plan.seed, i),
                               appearance=h.appearance)
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
                                        seed=seeds.label_noise(plan.seed, i))
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
            imgs, inst = generate(k, plan.image_size, seed=seeds.server_images(plan.seed, i),
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
