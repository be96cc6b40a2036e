"""The virtual federation: hospitals resolved from config, one store, nodes hold indices."""

from __future__ import annotations

import numpy as np
import torch

from snowfed.client.trainer import train_locally
from snowfed.config import compose, plain_config
from snowfed.models import build_model
from snowfed.sim.federation import resolve_federation
from snowfed.strategies import LocalStrategy, StrategySpec


def test_four_hospitals_carry_the_four_presets():
    plan = resolve_federation(plain_config(compose([])))
    assert [h.noise_profile for h in plan.hospitals] == ["clean", "noisy", "bb", "noisy_hd"]
    assert len({h.appearance for h in plan.hospitals}) == 4
    assert len({h.num_images for h in plan.hospitals}) == 4


def test_global_noise_group_applies_to_every_hospital():
    plan = resolve_federation(plain_config(compose(["noise=noisy", "noise.p_remove=0.3"])))
    assert {h.noise_profile for h in plan.hospitals} == {"noisy"}
    assert {h.noise.p_remove for h in plan.hospitals} == {0.3}


def test_per_hospital_strategy_override():
    cfg = plain_config(compose(["federation=smoke", "+federation.hospitals.1.strategy={name: "
                                "baseline, lr: 0.01}"]))
    plan = resolve_federation(cfg)
    assert plan.hospitals[0].strategy.lr == cfg["strategy"]["lr"]
    assert plan.hospitals[1].strategy.lr == 0.01


def test_store_splits_and_noise(smoke_store):
    images, clean, noisy = (smoke_store.arrays[k] for k in ("images", "clean", "noisy"))
    assert isinstance(images, np.memmap)  # one copy on disk, mapped by every node
    nodes = smoke_store.nodes
    all_idx = smoke_store.manifest["test"] + [i for n in nodes for i in n["train"] + n["val"]]
    assert sorted(all_idx) == list(range(len(images)))  # disjoint and complete splits
    clean_node, noisy_node = nodes
    assert clean_node["label_noise"]["pixel_disagreement"] == 0.0
    assert noisy_node["label_noise"]["objects_removed"] > 0.2
    # training labels of the noisy node really are degraded; its evaluation split is clean
    tr = noisy_node["train"]
    assert (noisy[tr] != clean[tr]).any()
    data = smoke_store.node_data(1)
    assert np.array_equal(data.val_targets, clean[noisy_node["val"]])
    assert len(data.images) == noisy_node["num_train"]


def test_local_training_lowers_the_loss(smoke_store):
    torch.manual_seed(0)
    data = smoke_store.node_data(0)
    spec = StrategySpec(name="baseline", sampler="random", loss="cross_entropy", optimizer="adam",
                        lr=1e-3, local_steps=40, batch_size=8, tile_size=32)
    model = build_model("shortres", num_classes=2, width=16)
    stats = train_locally(model, LocalStrategy.build(spec, data.images, data.labels),
                          torch.Generator().manual_seed(0))
    assert stats.steps == 40
    assert stats.last_loss < 0.8 * stats.first_loss
