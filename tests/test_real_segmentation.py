"""task=segmentation on a folder of image/mask pairs (GlaS layout): SNOW noise per site and
annotators fused by STAPLE, through the same store the synthetic federation writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from snowfed.client.trainer import train_locally
from snowfed.config import compose, plain_config
from snowfed.models import build_model
from snowfed.sim.run.plan import prepare
from snowfed.strategies import LocalStrategy, StrategySpec


def _glas_folder(root, n=16, size=32):
    """GlaS-style pairs: name.png and name_anno.png with a few disk-shaped objects."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(3):
            cy, cx, r = rng.integers(6, size - 6), rng.integers(6, size - 6), rng.integers(3, 6)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
        image = np.stack([np.where(mask > 0, 90, 220)] * 3, -1).astype(np.uint8)
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"train_{i}.png")
        Image.fromarray(mask).save(root / f"train_{i}_anno.png")
    return root


def _store(tmp_path, hospitals):
    root = _glas_folder(tmp_path / "glas")
    cfg = plain_config(compose([
        "dataset=seg_folder", f"dataset.path={root}", "federation=folder_sites",
        f"federation.hospitals={hospitals}", "federation.test_fraction=0.25", "model.width=8",
        "strategy.tile_size=32",
    ]))
    return prepare(cfg, tmp_path / "run")[1]


def test_snow_noise_and_staple_annotators_on_a_mask_folder(tmp_path):
    store = _store(tmp_path, "[{name: clean}, {name: noisy, noise: noisy}, {name: crowd, annotators: "
                             "{noise: [clean, noisy_hd, noisy_hd], fusion: staple}}]")
    assert store.manifest["task"] == "segmentation" and store.manifest["num_classes"] == 2
    nodes = {n["name"]: n for n in store.nodes}
    assert nodes["noisy"]["label_noise"]["objects_removed"] > 0
    crowd = nodes["crowd"]["label_noise"]["annotators"]
    assert crowd["fusion"] == "staple" and crowd["count"] == 3
    # STAPLE learns that the first annotator is reliable: its fused masks beat the majority's
    assert crowd["fused_accuracy"] > crowd["majority_accuracy"]
    clean, noisy = store.arrays["clean"], store.arrays["noisy"]
    train = nodes["clean"]["train"]
    assert np.array_equal(clean[train], noisy[train]) and set(np.unique(clean)) == {0, 1}
    # a node of this store trains with the segmentation strategies as they are
    data = store.node_data(1)
    spec = StrategySpec(**nodes["noisy"]["strategy"])
    model = build_model("shortres", num_classes=2, width=8)
    stats = train_locally(model, LocalStrategy.build(spec, data.images, data.labels),
                          torch.Generator().manual_seed(0), steps=3)
    assert stats.steps == 3 and np.isfinite(stats.last_loss)


def test_a_shortcut_needs_classification(tmp_path):
    from snowfed.config import ConfigError

    with pytest.raises(ConfigError, match="shortcut"):
        _store(tmp_path, "[{name: a, shortcut: {class: 1}}, {name: b}]")


def test_folder_silos_takes_its_hospitals_from_the_site_folders(tmp_path):
    for site, n in (("hosp_north", 10), ("hosp_south", 6)):
        _glas_folder(tmp_path / "sites" / site, n=n)
    base = ["dataset=seg_folder", f"dataset.path={tmp_path / 'sites'}", "dataset.layout=sites",
            "federation=folder_silos", "model.width=8", "strategy.tile_size=32"]
    store = prepare(plain_config(compose([*base, "noise=noisy"])), tmp_path / "run")[1]
    nodes = {n["name"]: n for n in store.nodes}
    assert set(nodes) == {"hosp_north", "hosp_south"}  # named as their folders
    sizes = {name: n["num_train"] + n["num_val"] for name, n in nodes.items()}
    assert sizes["hosp_north"] > sizes["hosp_south"]  # each keeps its own images
    assert all(n["noise_profile"] == "noisy" for n in nodes.values())
    from snowfed.config import ConfigError

    with pytest.raises(ConfigError, match="federation.partition.scheme"):
        prepare(plain_config(compose([*base, "federation.partition.scheme=iid"])), tmp_path / "r2")
