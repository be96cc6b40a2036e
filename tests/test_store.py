"""The federation store's layout: every index list is one contiguous range, so a node's arrays
(and what its strategy builds on them) are views of the store's memory maps, not copies; stores
with scattered index lists (written before that layout) still load."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from snowfed import seeds
from snowfed.config import compose, plain_config
from snowfed.data.synthetic import generate
from snowfed.sim.noise.classes import measure_noise
from snowfed.sim.noise.masks import degrade_dataset
from snowfed.sim.run.plan import prepare
from snowfed.store import ARRAYS, FederationStore, take_rows, write_store
from snowfed.strategies import LocalStrategy, StrategySpec
from snowfed.strategies.samplers import PositiveTileSampler

SYNTHETIC = ["federation=smoke", "aggregation=quality", "+federation.hospitals.0.clean_fraction=0.5"]
LOADED = ["task=classification", "federation.hospitals=[{name: a, clean_fraction: 0.25, noise: "
          "{kind: symmetric, rate: 0.4}}, {name: b, shortcut: {class: 3}}, {name: c}]"]


def _build(tmp_path, overrides):
    cfg = plain_config(compose(overrides))
    return prepare(cfg, tmp_path / "run")


def _is_range(rows: list[int], start: int) -> bool:
    return rows == list(range(start, start + len(rows)))


def _assert_contiguous_layout(store: FederationStore) -> None:
    """Site by site (train, then val), then the test rows, then the server's rows."""
    row = 0
    for node in store.nodes:
        for split in ("train", "val"):
            assert _is_range(node[split], row), (node["name"], split)
            row += len(node[split])
        assert node["verified"] == node["train"][: len(node["verified"])]
    for key in ("test", "server_val"):
        assert _is_range(store.manifest[key], row), key
        row += len(store.manifest[key])
    for node in store.nodes:  # a shortcut site's plain val copies come last
        plain = node.get("shortcut", {}).get("val_plain", [])
        assert _is_range(plain, row)
        row += len(plain)
    assert row == len(store.arrays["images"])


def _assert_views(store: FederationStore) -> None:
    a = store.arrays
    for pid in range(len(store.nodes)):
        data = store.node_data(pid)
        for array, source in ((data.images, "images"), (data.labels, "noisy"),
                              (data.val_images, "images"), (data.val_targets, "clean")):
            assert np.shares_memory(array, a[source]) and not array.flags.writeable
    sets = [store.test_set()] + ([store.server_val_set()] if store.manifest["server_val"] else [])
    for images, targets in sets:
        assert np.shares_memory(images, a["images"]) and np.shares_memory(targets, a["clean"])


def test_synthetic_store_holds_each_site_contiguously_with_the_generated_images(tmp_path):
    plan, store = _build(tmp_path, SYNTHETIC)
    assert store.manifest["server_val"] and store.nodes[0]["verified"]
    _assert_contiguous_layout(store)
    _assert_views(store)
    # every node sees the images and labels its hospital generated, as before the layout
    test_images, test_targets = store.test_set()
    server_images, _ = store.server_val_set()
    n_test, k = plan.test_images_per_site, plan.server_val_per_site
    for i, (h, node) in enumerate(zip(plan.hospitals, store.nodes)):
        imgs, inst = generate(h.num_images + n_test, plan.image_size, seed=seeds.site_images(plan.seed, i),
                              appearance=h.appearance)
        n_val, n_verified = node["num_val"], len(node["verified"])
        train = slice(n_test + n_val, None)
        noisy, stats = degrade_dataset(inst[train][n_verified:], h.noise,
                                       seed=seeds.label_noise(plan.seed, i))
        assert stats == node["label_noise"]
        data = store.node_data(i)
        assert np.array_equal(data.images, imgs[train])
        assert np.array_equal(data.labels[:n_verified], (inst[train][:n_verified] > 0))
        assert np.array_equal(data.labels[n_verified:], noisy)
        assert np.array_equal(data.val_images, imgs[n_test : n_test + n_val])
        assert np.array_equal(data.val_targets, inst[n_test : n_test + n_val] > 0)
        assert data.verified.tolist() == [j < n_verified for j in range(node["num_train"])]
        assert np.array_equal(test_images[i * n_test : (i + 1) * n_test], imgs[:n_test])
        assert np.array_equal(test_targets[i * n_test : (i + 1) * n_test], inst[:n_test] > 0)
        server, _ = generate(k, plan.image_size, seed=seeds.server_images(plan.seed, i),
                             appearance=h.appearance)
        assert np.array_equal(server_images[i * k : (i + 1) * k], server)


def test_loaded_dataset_store_holds_each_site_contiguously_with_its_own_rows(tmp_path):
    plan, store = _build(tmp_path, LOADED)
    _assert_contiguous_layout(store)
    _assert_views(store)
    data, C = plan.dataset, plan.num_classes
    clean = store.arrays["clean"]
    for i, (cut, node) in enumerate(zip(plan.cuts, store.nodes)):
        train, val = cut["train"], cut["val"]
        got = store.node_data(i)
        shortcut = node.get("shortcut")
        plain = np.ones(len(train), bool) if shortcut is None else data.targets[train] != shortcut["class"]
        assert np.array_equal(got.images[plain], data.images[train][plain])
        assert np.array_equal(clean[node["train"]], data.targets[train])
        assert np.array_equal(got.val_targets, data.targets[val])
        # the labels sit on their own images: the noise measured in the dataset's order again
        nv = len(node["verified"])
        assert np.array_equal(got.labels[:nv], data.targets[train[:nv]])
        measured = measure_noise(data.targets[train[nv:]], got.labels[nv:], C)
        assert measured["confusion"] == node["label_noise"]["confusion"]
        assert node["class_histogram"] == np.bincount(data.targets[np.concatenate([train, val])],
                                                      minlength=C).tolist()
        if shortcut is not None:
            assert shortcut["images"] == int((~plain).sum() + (data.targets[val] == shortcut["class"]).sum())
            assert np.array_equal(store.arrays["images"][shortcut["val_plain"]], data.images[val])
            assert not np.array_equal(got.images[~plain], data.images[train][~plain])
    test_images, test_targets = store.test_set()
    assert np.array_equal(test_images, data.images[plan.test])
    assert np.array_equal(test_targets, data.targets[plan.test])


def test_a_store_with_scattered_index_lists_still_loads(tmp_path):
    """The layout of stores written before contiguous node rows: the same rows, shuffled."""
    _, store = _build(tmp_path, SYNTHETIC)
    n = len(store.arrays["images"])
    perm = np.random.default_rng(0).permutation(n)  # new row r holds old row perm[r]
    where = np.argsort(perm)  # old row -> new row

    def moved(rows):
        return [int(r) for r in where[np.asarray(rows, dtype=np.int64)]]

    manifest = {**store.manifest, "test": moved(store.manifest["test"]),
                "server_val": moved(store.manifest["server_val"]),
                "nodes": [{**node, **{k: moved(node[k]) for k in ("train", "val", "verified")}}
                          for node in store.nodes]}
    old = FederationStore(write_store(tmp_path / "scattered",
                                      {k: np.asarray(store.arrays[k])[perm] for k in ARRAYS}, manifest))
    assert not all(_is_range(node["train"], node["train"][0]) for node in old.nodes)
    for pid in range(len(store.nodes)):
        a, b = store.node_data(pid), old.node_data(pid)
        for field in ("images", "labels", "val_images", "val_targets", "verified"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
        if not _is_range(old.nodes[pid]["train"], old.nodes[pid]["train"][0]):
            assert not np.shares_memory(b.images, old.arrays["images"])  # gathered: a copy
    for name in ("test_set", "server_val_set"):
        for x, y in zip(getattr(store, name)(), getattr(old, name)()):
            assert np.array_equal(x, y)


def test_take_rows_slices_a_range_and_gathers_anything_else():
    array = np.arange(40).reshape(10, 4)
    view = take_rows(array, [3, 4, 5])
    assert np.shares_memory(view, array) and view.tolist() == array[3:6].tolist()
    assert take_rows(array, []).shape == (0, 4) and take_rows(np.zeros((0, 4)), []).shape == (0, 4)
    for rows in ([5, 4, 3], [1, 3], [2, 2], [0, -1], np.array([7])):
        got = take_rows(array, rows)
        assert np.array_equal(got, array[np.asarray(rows)])
        assert np.shares_memory(got, array) == (len(rows) == 1)
    with pytest.raises(IndexError):
        take_rows(array, [9, 10])
    with pytest.raises(IndexError):
        take_rows(array, [12, 13])


@pytest.mark.parametrize("sampler", ["random", "positive"])
def test_a_nodes_strategy_draws_from_the_store_without_copying_it(tmp_path, sampler):
    _, store = _build(tmp_path, SYNTHETIC)
    data = store.node_data(0)  # the clean site: verified images, annotated masks
    spec = StrategySpec.from_config({"name": "t", "sampler": sampler, "loss": "cross_entropy",
                                     "optimizer": "adam", "lr": 0.001, "local_steps": 1, "batch_size": 4,
                                     "tile_size": 32, "teacher": "clean"})
    strategy = LocalStrategy.build(spec, data.images, data.labels, data.verified)
    images, masks = store.arrays["images"], store.arrays["noisy"]
    for s in (strategy.sampler, strategy.teacher.sampler):
        assert np.shares_memory(s.images.numpy(), images) and np.shares_memory(s.labels.numpy(), masks)
    x, y = strategy.sampler(4, 32, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[0] == y.shape[0] == 4


def test_positive_sampler_skips_unannotated_images_without_copying():
    images = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    images.flags.writeable = False
    masks = np.zeros((6, 16, 16), np.uint8)
    masks[[1, 4], 5:9, 5:9] = 1
    masks.flags.writeable = False
    s = PositiveTileSampler(images, masks)
    assert s.num_images == 2 and np.shares_memory(s.images.numpy(), images)
    x, y = s(8, 8, torch.Generator().manual_seed(0))
    assert (y.flatten(1).max(dim=1).values == 1).all()  # every tile from an annotated image
    x, y = s(2, 16, torch.Generator().manual_seed(0), idx=torch.tensor([0, 1]))
    assert torch.equal(x, torch.from_numpy(images[[1, 4]].copy()).permute(0, 3, 1, 2).float() / 255)


def test_read_only_store_arrays_become_tensors_without_torch_warning(tmp_path):
    """torch warns (once per process) on non-writable arrays; the samplers and evaluation only
    read these tensors, so it is silenced there. Checked in a fresh process, as torch emits the
    warning only once per process."""
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8, 3), np.uint8))
    np.save(tmp_path / "y.npy", np.zeros((4, 8, 8), np.uint8))
    code = (
        "import sys, numpy as np, torch\n"
        "from snowfed.evaluation import images_to_tensor\n"
        "from snowfed.strategies.samplers import RandomTileSampler\n"
        "x = np.load(sys.argv[1], mmap_mode='r'); y = np.load(sys.argv[2], mmap_mode='r')\n"
        "s = RandomTileSampler(x[1:3], y[1:3]); s(2, 8, torch.Generator())\n"
        "images_to_tensor(x[:2])\n"
        "print('silenced', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code,
                             str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "silenced", result.stderr
