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


@dataclass(frozen=True)
class _SyntheticSite:
    """One hospital's generated rows (images, clean masks, noisy masks) in the order test, val,
    train, and what its label noise did."""

    arrays: tuple[np.ndarray, np.ndarray, np.ndarray]
    n_test: int
    n_val: int
    n_train: int
    n_verified: int
    label_noise: dict[str, Any]


def _generate_site(plan: FederationPlan, i: int, h: Hospital) -> _SyntheticSite:
    """Hospital i's images in its appearance, its splits, and its training labels degraded with
    its noise (the first n_verified training images keep their clean labels)."""
    n_test = plan.test_images_per_site
    imgs, inst = generate(h.num_images + n_test, plan.image_size, seed=seeds.site_images(plan.seed, i),
                          appearance=h.appearance)
    n_val = max(1, int(round(plan.val_fraction * h.num_images))) if plan.val_fraction else 0
    n_train = h.num_images - n_val
    if n_train < 1:
        raise ConfigError(f"federation.hospitals[{i}].num_images", h.num_images,
                          f"large enough to leave a training image after a {plan.val_fraction} "
                          "validation split")
    n_verified = _num_verified(h, plan.val_fraction)
    labels, stats = degrade_dataset(inst[n_test + n_val + n_verified :], h.noise,
                                    seed=seeds.label_noise(plan.seed, i))
    clean = (inst > 0).astype(np.uint8)
    noisy = clean.copy()
    noisy[n_test + n_val + n_verified :] = labels
    return _SyntheticSite((imgs, clean, noisy), n_test, n_val, n_train, n_verified, stats)


def _node_entry(h: Hospital, site: _SyntheticSite, train_start: int) -> dict[str, Any]:
    """The manifest's entry of a hospital whose rows start at `train_start` (train, then val)."""
    val_start = train_start + site.n_train
    return {
        "name": h.name,
        "val": list(range(val_start, val_start + site.n_val)),
        "train": list(range(train_start, train_start + site.n_train)),
        "verified": list(range(train_start, train_start + site.n_verified)),
        "num_train": site.n_train,
        "num_val": site.n_val,
        "noise_profile": h.noise_profile,
        "noise": asdict(h.noise),
        "label_noise": site.label_noise,
        "appearance": asdict(h.appearance),
        "strategy": asdict(h.strategy),
        **({"failure": h.failure} if h.failure else {}),
    }


def _server_images(plan: FederationPlan, i: int, h: Hospital) -> tuple[np.ndarray, ...]:
    """The server's clean images in hospital i's appearance, from a seed of their own."""
    imgs, inst = generate(plan.server_val_per_site, plan.image_size,
                          seed=seeds.server_images(plan.seed, i), appearance=h.appearance)
    mask = (inst > 0).astype(np.uint8)
    return imgs, mask, mask


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
        site = _generate_site(plan, i, h)
        own = site.n_test + site.n_val  # where its training rows start in the generated order
        node_rows.append(tuple(a[own:] for a in site.arrays))
        node_rows.append(tuple(a[site.n_test : own] for a in site.arrays))
        test_rows.append(tuple(a[: site.n_test] for a in site.arrays))
        test.extend(range(test_offset, test_offset + site.n_test))
        nodes.append(_node_entry(h, site, offset))
        offset += h.num_images
        test_offset += site.n_test
        if plan.server_val_per_site:
            server_rows.append(_server_images(plan, i, h))
            server_val.extend(range(server_offset, server_offset + plan.server_val_per_site))
            server_offset += plan.server_val_per_site
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
