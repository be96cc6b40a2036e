"""A federation cut from a loaded dataset (npz, image folders, digits): sites, splits, noise.

The synthetic federation (sim.federation) renders each hospital's images; here the images exist
and the sites are cut from them:

1. the global clean test set: the dataset's own `test` split when it has one (MedMNIST), else
   `federation.test_fraction` of it;
2. the rest is partitioned into the hospitals (`federation.partition`: iid, dirichlet label skew,
   quantity skew, natural silos; sim.federation.partition, on Flower's partitioners);
3. each site keeps `val_fraction` of its images as its clean held-out split;
4. each site's training labels are degraded its own way: classification noise (symmetric,
   pairflip, a transition matrix; rate fixed or drawn per site from a range), SNOW noise for
   segmentation masks, or K simulated annotators whose votes are fused;
5. site effects of the talk's pitfalls: a class encoded differently in the pixels at one site
   (`shortcut`), and patient leakage, checked whatever the split level.

Splits are patient-level whenever the dataset knows patients (`split_level: patient`, the
default), so no patient sits in two splits; `split_level: image` reproduces the pitfall, and the
leakage check in the summary then names the patients found on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from snowfed import seeds
from snowfed.config import (
    ConfigError,
    load_group_option,
    require,
    require_int,
    require_keys,
    require_number,
)
from snowfed.data.loaders import LoadedDataset, load_dataset
from snowfed.server.aggregation import validate_aggregation
from snowfed.sim.federation.labels import degrade_site
from snowfed.sim.federation.partition import SCHEMES, class_histogram, leakage, partition, split_indices
from snowfed.sim.federation.shortcut import apply_shortcut, parse_shortcut
from snowfed.sim.federation.sites import ModelChecks, expand_hospitals, site_basics, snow_noise
from snowfed.sim.noise.classes import KINDS, draw_rate, transition_matrix
from snowfed.store import FederationStore, contiguous_layout, write_store
from snowfed.strategies import StrategySpec

FEDERATION_KEYS = ("name", "partition", "val_fraction", "test_fraction", "split_level", "hospitals")
SITE_KEYS = ("name", "noise", "strategy", "clean_fraction", "failure", "annotators", "shortcut")
SPLIT_LEVELS = ("patient", "image")
FUSIONS = {"classification": ("majority", "dawid_skene"), "segmentation": ("majority", "staple")}


@dataclass(frozen=True)
class Site:
    """One hospital of a loaded-dataset federation, validated."""

    name: str
    strategy: StrategySpec
    noise_profile: str
    noise: dict[str, Any]  # classification: {kind, rate | [low, high], matrix}; segmentation: SNOW
    clean_fraction: float = 0.0
    failure: dict[str, Any] | None = None
    annotators: dict[str, Any] | None = None  # {noise: [K specs], fusion}
    shortcut: dict[str, Any] | None = None  # {class, effect, scale | bits}


@dataclass(frozen=True)
class DatasetPlan:
    name: str
    task: str
    dataset: LoadedDataset
    partition: dict[str, Any]
    val_fraction: float
    test_fraction: float
    split_level: str
    seed: int
    hospitals: list[Site]
    skipped: list[dict] = field(default_factory=list)
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # global test rows
    cuts: list[dict[str, np.ndarray]] = field(default_factory=list)  # each site's train / val rows

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes


def _class_noise(spec: Any, key: str, num_classes: int) -> tuple[str, dict[str, Any]]:
    """A classification noise spec: `clean`, a preset name, {preset: NAME, ...} or {kind, rate,
    matrix}; the transition matrix is checked here (a rate range is checked, drawn later)."""
    if spec is None or spec == "clean":
        return "clean", {"kind": "symmetric", "rate": 0.0}
    if isinstance(spec, str):
        spec = {"preset": spec}
    require(isinstance(spec, Mapping), key, spec, "a noise preset name or a mapping {kind, rate}")
    params = dict(spec)
    if "preset" in params:
        preset = params.pop("preset")
        if preset == "clean":
            return "clean", {"kind": "symmetric", "rate": 0.0}
        params = {**load_group_option("noise", preset, f"{key}.preset"), **params}
    profile = str(params.pop("name", spec.get("preset", params.get("kind", "custom"))))
    require_keys(params, ("kind", "rate", "matrix"), key, "a key of classification noise",
                 "SNOW presets (p_remove, sigma, ...) are for segmentation masks")
    kind = params.get("kind")
    require(kind in KINDS, f"{key}.kind", kind, f"one of {', '.join(KINDS)}")
    rate = params.get("rate", 0.0)
    draw_rate(rate, np.random.default_rng(0), f"{key}.rate")  # checks a number or a [low, high]
    probe = rate[0] if isinstance(rate, (list, tuple)) else rate
    transition_matrix(kind, num_classes, probe, params.get("matrix"), key=key)
    return profile, {"kind": kind, "rate": list(rate) if isinstance(rate, (list, tuple)) else rate,
                     **({"matrix": params["matrix"]} if kind == "matrix" else {})}


def _seg_noise(spec: Any, key: str) -> tuple[str, dict[str, Any]]:
    profile, noise = snow_noise(spec if spec is not None else "clean", key)
    return profile, asdict(noise)


def _annotators(spec: Any, key: str, task: str, num_classes: int) -> dict[str, Any] | None:
    """{count: K, noise: one spec for all or a list of K, fusion}: K simulated annotators."""
    if spec is None:
        return None
    require(isinstance(spec, Mapping), key, spec, "a mapping {count, noise, fusion}")
    require_keys(spec, ("count", "noise", "fusion"), key, "a key of annotators")
    noise = spec.get("noise")
    if isinstance(noise, (list, tuple)):
        count = require_int(spec.get("count", len(noise)), f"{key}.count", 1)
        require(count == len(noise), f"{key}.count", count, f"the length of {key}.noise ({len(noise)})")
    else:
        count = require_int(spec.get("count"), f"{key}.count", 1)
        noise = [noise] * count
    parse = (lambda s, k: _class_noise(s, k, num_classes)) if task == "classification" else _seg_noise
    specs = [parse(s, f"{key}.noise[{k}]")[1] for k, s in enumerate(noise)]
    fusion = spec.get("fusion", "majority")
    require(fusion in FUSIONS[task], f"{key}.fusion", fusion,
            f"one of {', '.join(FUSIONS[task])} for {task}")
    return {"count": count, "noise": specs, "fusion": fusion}


def resolve(cfg: Mapping[str, Any], models: ModelChecks, loaded: dict | None = None) -> DatasetPlan:
    """Validate a loaded-dataset federation: load the data (bad files fail here, before any
    training) and check every site."""
    task = cfg["task"]["name"]
    dataset = load_dataset(cfg["dataset"], loaded)
    require(dataset.task == task, "task", task,
            f"{dataset.task} for dataset={cfg['dataset']['name']} (its labels are "
            f"{'class ids' if dataset.task == 'classification' else 'masks'})")
    fed = cfg["federation"]
    require_keys(fed, FEDERATION_KEYS, "federation", "a key of a federation over a loaded dataset",
                 "test_images_per_site, num_images and appearance are for dataset=synthetic")
    sites_cfg = expand_hospitals(fed.get("hospitals"))
    part = {k: v for k, v in (fed.get("partition") or {}).items() if v is not None}
    if not sites_cfg and dataset.site is not None:  # the folders are the hospitals, as they are
        require(part.get("scheme", "natural") == "natural", "federation.partition.scheme",
                part.get("scheme"), "natural (or unset) when federation.hospitals lists none: each "
                "site folder is a hospital")
        sites_cfg, part["scheme"] = [{"name": str(n)} for n in sorted(set(dataset.site))], "natural"
    require(len(sites_cfg) > 0, "federation.hospitals", len(sites_cfg), "a list of at least one "
            "hospital (none: one per site folder, with dataset.layout=sites)")
    require_int(cfg.get("rounds"), "rounds", 1)
    names: set[str] = set()
    sites = [_site(h, i, cfg, names, models, dataset.num_classes) for i, h in enumerate(sites_cfg)]
    # unset (null) keys are left to the partitioner's defaults, so one yaml lists them all
    scheme = part.pop("scheme", "iid")
    require(scheme in SCHEMES, "federation.partition.scheme", scheme, f"one of {', '.join(SCHEMES)}")
    if scheme == "natural":
        require(dataset.site is not None, "federation.partition.scheme", scheme,
                f"not natural: dataset={cfg['dataset']['name']} has no site of its own per image "
                "(image_folder/seg_folder with layout: sites)")
    split_level = fed.get("split_level", "patient")
    require(split_level in SPLIT_LEVELS, "federation.split_level", split_level,
            f"one of {', '.join(SPLIT_LEVELS)}")
    validate_aggregation(cfg["aggregation"], len(sites))
    require(cfg["aggregation"]["name"] != "quality", "aggregation.name", "quality",
            "an aggregation other than quality with a loaded dataset (its clean server set is "
            "generated by dataset=synthetic)")
    plan = DatasetPlan(
        name=str(fed.get("name", "custom")), task=task, dataset=dataset,
        partition={"scheme": scheme, **part},
        val_fraction=require_number(fed.get("val_fraction", 0.2), "federation.val_fraction", 0.0, 0.9),
        test_fraction=require_number(fed.get("test_fraction", 0.2), "federation.test_fraction", 0.0, 0.9),
        split_level=split_level, seed=require_int(cfg.get("seed"), "seed", 0), hospitals=sites,
        skipped=list(dataset.skipped),
    )
    # partition and splits now: a site left empty is a config error, not a crash later
    test, cuts = _cut(plan)
    return replace(plan, test=test, cuts=cuts)


def _site(h: Mapping[str, Any], i: int, cfg: Mapping[str, Any], names: set[str],
          models: ModelChecks, num_classes: int) -> Site:
    """Hospital i of a loaded-dataset federation: what every site has (sites.site_basics), its
    noise by task, its annotators and its shortcut."""
    task, key = cfg["task"]["name"], f"federation.hospitals[{i}]"
    require_keys(h, SITE_KEYS, key, "a key of a hospital over a loaded dataset", "num_images "
                 "and appearance are for dataset=synthetic: here the partition sizes the sites")
    site = site_basics(h, i, cfg, task, names, models, num_classes)
    if task == "classification":
        profile, noise = _class_noise(site.noise_spec, site.noise_key, num_classes)
    else:
        profile, noise = _seg_noise(site.noise_spec, site.noise_key)
    annotators = _annotators(h.get("annotators"), f"{key}.annotators", task, num_classes)
    if annotators is not None:
        require(h.get("noise") in (None, "clean"), f"{key}.noise", h.get("noise"),
                f"unset when {key}.annotators is set (the annotators' votes are the labels)")
        profile = f"annotators:{annotators['fusion']}"
    return Site(
        name=site.name, strategy=site.strategy, noise_profile=profile, noise=noise,
        clean_fraction=site.clean_fraction, failure=site.failure, annotators=annotators,
        shortcut=parse_shortcut(h.get("shortcut"), f"{key}.shortcut", task, num_classes),
    )


def _cut(plan: DatasetPlan) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """The global test indices, and each site's train and val indices."""
    data, seed = plan.dataset, plan.seed
    n = len(data.images)
    groups = data.patient if data.patient is not None else None
    split_groups = groups if plan.split_level == "patient" else None
    all_idx = np.arange(n)
    if data.split is not None and np.any(data.split == "test"):
        test, pool = all_idx[data.split == "test"], all_idx[data.split != "test"]
    elif plan.test_fraction > 0:
        cut = split_indices(all_idx, {"test": plan.test_fraction}, seed, groups=split_groups)
        test, pool = cut["test"], cut["train"]
    else:
        test, pool = all_idx[:0], all_idx
    require(len(test) > 0, "federation.test_fraction", plan.test_fraction,
            "> 0 when the dataset has no test split of its own (the global model is scored there)")
    names = [s.name for s in plan.hospitals]
    params = {k: v for k, v in plan.partition.items() if k != "scheme"}
    parts = partition(
        data.targets[pool] if data.task == "classification" else np.zeros(len(pool), dtype=np.int64),
        len(names), plan.partition["scheme"], params, seed=seed,
        site_of=data.site[pool] if data.site is not None else None, site_names=names,
        groups=groups[pool] if groups is not None else None, key="federation.partition",
    )
    sites = []
    for i, part in enumerate(parts):
        idx = pool[part]
        try:
            split = split_indices(idx, {"val": plan.val_fraction}, seeds.val_split(seed, i),
                                  groups=split_groups)
        except ValueError as err:
            raise ConfigError(f"federation.hospitals[{i}]", names[i],
                              f"a site with enough images for its splits ({err})") from None
        sites.append({"train": split["train"], "val": split.get("val", idx[:0])})
    return test, sites


def build(plan: DatasetPlan, cfg: Mapping[str, Any], path) -> FederationStore:
    """Cut the sites, degrade each site's training labels, apply site effects, check leakage,
    and write the run's one federation store.

    Labels are degraded and every per-site fact measured on the dataset's own indices (`cuts`,
    `test`); the store then lays the rows out site by site (site 0's train rows, its val rows,
    site 1's, ..., the test rows, then rows no list names, then the shortcut sites' plain val
    copies), so that every index list in the manifest is one contiguous range and a node's
    arrays are views of the store (snowfed.store.take_rows)."""
    data, task = plan.dataset, plan.task
    C = data.num_classes
    test, cuts = plan.test, plan.cuts
    clean = data.targets if task == "classification" else (data.targets > 0).astype(np.uint8)
    noisy = clean.copy()  # in the dataset's order, reordered into the store's below
    lists = [rows for cut in cuts for rows in (cut["train"], cut["val"])] + [test]
    unlisted = np.setdiff1d(np.arange(len(data.images)), np.concatenate(lists))
    order, ranges = contiguous_layout([*lists, unlisted])
    images = data.images[order]  # the store's one copy, in its order; a shortcut site changes its own rows
    extra_images, extra_targets, nodes = [], [], []
    next_row = len(order)
    for i, (site, cut) in enumerate(zip(plan.hospitals, cuts)):
        train, val = cut["train"], cut["val"]
        store_train, store_val = ranges[2 * i], ranges[2 * i + 1]
        n_verified = int(round(site.clean_fraction * len(train)))
        degraded = train[n_verified:]
        noisy[degraded], stats = degrade_site(plan.task, site.noise, site.annotators, data.targets[degraded],
                                              data.num_classes, plan.seed, i)
        entry: dict[str, Any] = {
            "name": site.name, "train": store_train, "val": store_val,
            "verified": store_train[:n_verified], "num_train": len(train), "num_val": len(val),
            "noise_profile": site.noise_profile, "noise": site.annotators or site.noise,
            "label_noise": stats, "strategy": asdict(site.strategy),
            **({"failure": site.failure} if site.failure else {}),
            **_site_facts(data, clean, np.concatenate([train, val])),
        }
        if site.shortcut is not None:
            # the site's rows (train, then val) sit at store_train + store_val in the store
            rows = np.concatenate([train, val])
            of_class = clean[rows] == site.shortcut["class"]
            plain_val = val[clean[val] == site.shortcut["class"]]
            at = np.asarray(store_train + store_val, dtype=np.int64)[of_class]
            images[at] = apply_shortcut(data.images[rows[of_class]], site.shortcut)
            # the site's val images as they would look without the shortcut (the trap's check)
            extra_images.append(data.images[val]), extra_targets.append(clean[val])
            entry["shortcut"] = {**site.shortcut, "images": int(of_class.sum()),
                                 "val_with_class": len(plain_val),
                                 "val_plain": list(range(next_row, next_row + len(val)))}
            next_row += len(val)
        nodes.append(entry)
    clean, noisy = clean[order], noisy[order]
    if extra_images:
        images = np.concatenate([images, *extra_images])
        clean = np.concatenate([clean, *extra_targets])
        noisy = np.concatenate([noisy, *extra_targets])
    manifest = {
        "federation": plan.name, "task": task, "seed": plan.seed,
        "image_size": int(images.shape[1]), "num_classes": C, "class_names": list(data.class_names),
        "model": dict(cfg["model"]), "rounds": int(cfg["rounds"]), "privacy": dict(cfg["privacy"]),
        "test": ranges[-2], "server_val": [], "nodes": nodes,
        "data": _data_report(plan, cfg["dataset"], test, cuts),
    }
    return FederationStore(write_store(path, {"images": images, "clean": clean, "noisy": noisy}, manifest))


def _site_facts(data: LoadedDataset, clean: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """Its class histogram (classification) and patient count (when patients are known)."""
    facts: dict[str, Any] = {}
    if data.task == "classification":
        facts["class_histogram"] = class_histogram(clean, rows, data.num_classes)
    if data.patient is not None:
        facts["patients"] = len(np.unique(data.patient[rows]))
    return facts


def _data_report(plan: DatasetPlan, dataset_cfg: Mapping[str, Any], test: np.ndarray,
                 cuts: list[dict[str, np.ndarray]]) -> dict:
    """What the summary says of the data: source, skipped files, the patient-leakage check."""
    data = plan.dataset
    report: dict[str, Any] = {
        "dataset": dataset_cfg["name"], "path": dataset_cfg.get("path"),
        "num_images": len(data.images), "num_test": len(test),
        "partition": plan.partition, "skipped": len(plan.skipped), "skipped_files": plan.skipped,
    }
    if data.patient is not None:
        train = np.concatenate([c["train"] for c in cuts])
        sites_of_patient: dict[str, set[str]] = {}
        for site, c in zip(plan.hospitals, cuts):
            for patient in np.unique(data.patient[np.concatenate([c["train"], c["val"]])]):
                sites_of_patient.setdefault(str(patient), set()).add(site.name)
        between_sites = {p: sorted(s) for p, s in sorted(sites_of_patient.items()) if len(s) > 1}
        train_test = leakage(data.patient, train, test)
        train_val = {plan.hospitals[i].name: leakage(data.patient, c["train"], c["val"])
                     for i, c in enumerate(cuts)}
        report["leakage"] = {
            "split_level": plan.split_level,
            "train_test": train_test,
            "train_val": {k: v for k, v in train_val.items() if v},
            "patients_in_two_sites": between_sites,
            "leaked_patients": len(set(train_test) | {p for v in train_val.values() for p in v}),
        }
    return report
