"""Site partitions (Flower partitioners) and patient-level splits: each scheme does what it claims
(coverage, skew direction, site order), patients never straddle sites or splits, and every bad
config names its key."""

from __future__ import annotations

import numpy as np
import pytest

from snowfed.config import ConfigError
from snowfed.sim.federation.partition import SCHEMES, class_histogram, leakage, partition, split_indices

N, K, SITES = 2000, 10, 8
KEY = "federation.partition"


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, K, N)


@pytest.fixture(scope="module")
def site_of() -> np.ndarray:
    return np.array(["liege", "brussels", "ghent", "leuven"])[np.random.default_rng(2).integers(0, 4, N)]


@pytest.fixture(scope="module")
def patients() -> np.ndarray:
    """1 to 6 images per patient, in shuffled order (patients are not contiguous)."""
    rng = np.random.default_rng(3)
    ids = np.repeat(np.arange(N), rng.integers(1, 7, N))[:N]
    return rng.permutation(ids)


def _run(labels, site_of, scheme, seed=0, **kw):
    if scheme == "natural":
        names = ["ghent", "liege", "brussels", "leuven"]
        return partition(labels, 4, scheme, seed=seed, site_of=site_of, site_names=names, **kw)
    params = {"dirichlet": {"alpha": 0.5}, "quantity": {"alpha": 0.5}}.get(scheme)
    return partition(labels, SITES, scheme, params, seed=seed, **kw)


def _tv(labels, parts) -> float:
    """Mean total-variation distance between each site's class distribution and the global one."""
    glob = np.bincount(labels, minlength=K) / len(labels)
    dists = [np.abs(np.array(class_histogram(labels, p, K)) / len(p) - glob).sum() / 2 for p in parts]
    return float(np.mean(dists))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_is_a_seeded_partition(labels, site_of, scheme):
    parts = _run(labels, site_of, scheme, seed=0)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) == N  # disjoint and covering
    again = _run(labels, site_of, scheme, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = _run(labels, site_of, scheme, seed=1)
    if scheme == "natural":  # the sites are the data's own: the seed must not move them
        assert all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    else:
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_equal_sizes_and_uniform_classes():
    labels = np.tile(np.arange(5), 1000)  # 5000 images, 1000 per class
    parts = partition(labels, 5, "iid", seed=4)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert np.min([len(p) for p in partition(labels[:4998], 7, "iid")]) >= 4998 // 7
    for p in parts:  # 200 expected per class and site; sd ~ 13
        assert all(140 <= c <= 260 for c in class_histogram(labels, p, 5))
    # not contiguous shards of the input order
    assert not np.array_equal(parts[0], np.arange(1000))


def test_dirichlet_small_alpha_skews_labels(labels):
    skewed = _tv(labels, partition(labels, SITES, "dirichlet", {"alpha": 0.1}, seed=0))
    near_iid = _tv(labels, partition(labels, SITES, "dirichlet", {"alpha": 100.0}, seed=0))
    assert near_iid < 0.1
    assert skewed > 0.4
    assert skewed > 4 * near_iid


def test_dirichlet_self_balancing_runs(labels):
    parts = partition(labels, SITES, "dirichlet", {"alpha": 0.3, "self_balancing": True}, seed=0)
    assert sum(map(len, parts)) == N


def test_quantity_skews_sizes_not_labels(labels):
    small = [len(p) for p in partition(labels, SITES, "quantity", {"alpha": 0.2}, seed=0)]
    large = [len(p) for p in partition(labels, SITES, "quantity", {"alpha": 1000.0}, seed=0)]
    assert max(small) > 5 * min(small)
    assert max(large) < 1.3 * min(large)
    parts = partition(labels, SITES, "quantity", {"alpha": 0.2, "min_partition_size": 20}, seed=5)
    assert min(map(len, parts)) >= 20
    big = [p for p in parts if len(p) >= 200]
    assert big and _tv(labels, big) < 0.12  # label mix of each big site stays the global one


def test_quantity_default_alpha(labels):
    assert sum(map(len, partition(labels, SITES, "quantity", seed=0))) == N


def test_natural_follows_site_of_and_names(labels, site_of):
    names = ["leuven", "brussels"]
    parts = partition(labels, 2, "natural", site_of=site_of, site_names=names)
    for name, p in zip(names, parts, strict=True):
        assert np.array_equal(p, np.flatnonzero(site_of == name))
    every = partition(labels, 4, "natural", site_of=site_of)  # no names: all sites, sorted
    assert np.array_equal(every[0], np.flatnonzero(site_of == "brussels"))


def test_natural_unknown_site_names_the_key(labels, site_of):
    with pytest.raises(ConfigError) as err:
        partition(labels, 2, "natural", site_of=site_of, site_names=["liege", "antwerp"])
    assert err.value.key == f"{KEY}.site_names"
    assert "antwerp" in str(err.value) and "brussels, ghent, leuven, liege" in str(err.value)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_groups_never_span_sites(labels, patients, scheme):
    parts = _run(labels, None, scheme, groups=patients)
    assert sorted(np.concatenate(parts).tolist()) == list(range(N))
    site_of_image = np.empty(N, dtype=int)
    for site, p in enumerate(parts):
        site_of_image[p] = site
    for g in np.unique(patients):
        assert len(set(site_of_image[patients == g].tolist())) == 1
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_groups_without_them_patients_do_span_sites(labels, patients):
    """The control: image-level partitioning puts some patient in two hospitals."""
    parts = partition(labels, SITES, "iid")
    assert leakage(patients, parts[0], np.concatenate(parts[1:]))


def test_split_indices_patient_level(patients):
    idx = np.arange(0, N, 2)  # a site holding every other image
    out = split_indices(idx, {"val": 0.2, "test": 0.1}, seed=0, groups=patients)
    assert list(out) == ["train", "val", "test"]
    assert leakage(patients, out["train"], out["test"]) == []
    assert leakage(patients, out["train"], out["val"]) == []
    assert leakage(patients, out["val"], out["test"]) == []
    assert sorted(np.concatenate(list(out.values())).tolist()) == idx.tolist()
    assert all(np.all(np.diff(a) > 0) for a in out.values())
    assert abs(len(out["val"]) - 0.2 * len(idx)) <= 6 and abs(len(out["test"]) - 0.1 * len(idx)) <= 6
    again = split_indices(idx, {"val": 0.2, "test": 0.1}, seed=0, groups=patients)
    assert all(np.array_equal(out[k], again[k]) for k in out)


def test_split_indices_image_level_leaks_patients(patients):
    idx = np.arange(N)
    out = split_indices(idx, {"val": 0.2, "test": 0.1}, seed=0)
    assert (len(out["val"]), len(out["test"]), len(out["train"])) == (400, 200, 1400)
    assert leakage(patients, out["train"], out["test"])  # the pitfall the simulator must show
    assert sorted(np.concatenate(list(out.values())).tolist()) == idx.tolist()


def test_split_indices_val_at_least_one_and_train_never_empty():
    out = split_indices(np.array([7, 3, 9]), {"val": 0.1}, seed=0)
    assert len(out["val"]) == 1 and len(out["train"]) == 2
    with pytest.raises(ValueError, match="2 images"):
        split_indices(np.array([4, 5]), {"val": 0.5, "test": 0.4}, seed=0)
    groups = np.array([0, 0, 0, 1])
    out = split_indices(np.arange(4), {"val": 0.1}, seed=0, groups=groups)
    assert out["val"].tolist() == [3] and out["train"].tolist() == [0, 1, 2]  # the smaller patient
    with pytest.raises(ValueError, match="3 images of 2 patients"):
        split_indices(np.arange(3), {"val": 0.5, "test": 0.4}, seed=0, groups=np.array([0, 0, 1]))
    one = split_indices(np.arange(3), {"val": 0.5}, seed=0, groups=np.zeros(3, int))
    assert one["train"].tolist() == [0, 1, 2] and one["val"].size == 0  # one patient: train only


def test_leakage_and_histogram():
    groups = np.array(["p2", "p10", "p2", "p3", "p10"])
    assert leakage(groups, np.array([0, 1, 3]), np.array([2, 4])) == ["p10", "p2"]
    assert leakage(groups, np.array([3]), np.array([0, 1])) == []
    assert class_histogram(np.array([0, 2, 2, 1]), np.array([1, 2, 3]), 4) == [0, 1, 2, 0]
    with pytest.raises(ValueError):
        class_histogram(np.array([0, 5]), np.array([0, 1]), 3)


@pytest.mark.parametrize(
    ("kwargs", "bad_key"),
    [
        ({"num_sites": 4, "scheme": "pathological"}, "scheme"),
        ({"num_sites": 4, "scheme": "iid", "params": {"alpha": 1.0}}, "alpha"),
        ({"num_sites": 4, "scheme": "dirichlet", "params": {"alhpa": 1.0}}, "alhpa"),
        ({"num_sites": 4, "scheme": "dirichlet"}, "alpha"),
        ({"num_sites": 4, "scheme": "dirichlet", "params": {"alpha": 0}}, "alpha"),
        ({"num_sites": 4, "scheme": "quantity", "params": {"alpha": -1.0}}, "alpha"),
        ({"num_sites": 4, "scheme": "quantity", "params": {"alpha": float("nan")}}, "alpha"),
        ({"num_sites": 4, "scheme": "quantity", "params": {"min_partition_size": 11}}, "min_partition_size"),
        ({"num_sites": 4, "scheme": "dirichlet", "params": {"alpha": 1.0, "min_partition_size": 0}},
         "min_partition_size"),
        ({"num_sites": 4, "scheme": "dirichlet", "params": {"alpha": 1.0, "self_balancing": "yes"}},
         "self_balancing"),
        ({"num_sites": 0, "scheme": "iid"}, "num_sites"),
        ({"num_sites": 2.5, "scheme": "iid"}, "num_sites"),
        ({"num_sites": 41, "scheme": "iid"}, "num_sites"),
        ({"num_sites": 11, "scheme": "iid", "groups": np.arange(40) // 4}, "num_sites"),
        ({"num_sites": 2, "scheme": "natural"}, "scheme"),
        ({"num_sites": 3, "scheme": "natural", "site_of": np.array(["a", "b"] * 20)}, "num_sites"),
        ({"num_sites": 2, "scheme": "natural", "site_of": np.array(["a", "b"] * 20),
          "site_names": ["a", "a"]}, "site_names"),
        # min_partition_size 4 of 40 images over 10 sites with alpha 0.01: Flower's redraws fail
        ({"num_sites": 10, "scheme": "dirichlet", "params": {"alpha": 0.01, "min_partition_size": 4}},
         "alpha"),
    ],
)
def test_config_errors_name_the_key(kwargs, bad_key):
    labels = np.arange(40) % 4
    with pytest.raises(ConfigError) as err:
        partition(labels, key="fed.part", **kwargs)
    assert err.value.key == f"fed.part.{bad_key}"
    assert f"fed.part.{bad_key}" in str(err.value)


def test_dirichlet_failure_hints_at_min_partition_size():
    with pytest.raises(ConfigError, match="min_partition_size") as err:
        partition(np.arange(40) % 4, 10, "dirichlet", {"alpha": 0.01, "min_partition_size": 4})
    assert err.value.key == f"{KEY}.alpha"


def test_partitioning_leaves_flwr_datasets_plotting_unloaded_until_used():
    """Flower's partitioners without the seaborn/scipy.stats/pandas imports of flwr_datasets'
    package __init__ (seconds of every run's start), in a fresh interpreter; the deferred
    subpackages still load and work when a user touches them."""
    import subprocess
    import sys

    script = """
import sys
import numpy as np
from snowfed.sim.federation.partition import partition
sites = partition(np.arange(60) % 3, 4, "dirichlet", {"alpha": 5.0}, seed=0)
assert sorted(np.concatenate(sites).tolist()) == list(range(60))
assert "seaborn" not in sys.modules and "scipy.stats" not in sys.modules, "plotting loaded"
import flwr_datasets
from flwr_datasets.visualization import plot_label_distributions
assert callable(plot_label_distributions) and "seaborn" in sys.modules
assert callable(flwr_datasets.metrics.compute_counts)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
