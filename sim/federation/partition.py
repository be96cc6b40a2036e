"""Split one dataset into sites (hospitals), and a site into patient-level train/val/test.

The site splits come from Flower's own partitioners (``flwr_datasets.partitioner``), so a run
here partitions the way a Flower user expects. They are fed a tiny Hugging Face ``Dataset`` of
labels and row numbers only (never images), and each site's row numbers are read back with
``load_partition(i)["idx"]``.

Schemes (``SCHEMES``):

- ``iid``: shuffled, then ``IidPartitioner`` (equal sizes, +-1; Flower's shards are contiguous,
  hence the seeded shuffle first).
- ``dirichlet``: label skew, ``DirichletPartitioner`` (params ``alpha`` (required),
  ``min_partition_size``, ``self_balancing``).
- ``quantity``: quantity skew, site sizes = ``min_partition_size`` + a Dirichlet(``alpha``) share
  of the rest (drawn here, seeded), then ``SizePartitioner`` on shuffled rows, so labels stay IID
  within a site (params ``alpha`` (default 1.0), ``min_partition_size``).
- ``natural``: one site per distinct value of ``site_of`` (a site column, one folder per site),
  ``NaturalIdPartitioner``; output site i is the site named ``site_names[i]``.

With ``groups`` (patient ids), iid/dirichlet/quantity partition the distinct patients instead of
the images and every image follows its patient, so no patient spans two hospitals (a patient in
two hospitals would leak between one site's training data and another's test data).
``min_partition_size`` and the iid/quantity sizes then count patients.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import numbers
import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from snowfed.config import ConfigError

SCHEMES = ("iid", "dirichlet", "quantity", "natural")

# The params each scheme reads; any other name is a typo the user should hear about.
_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_partition_size", "self_balancing"),
    "quantity": ("alpha", "min_partition_size"),
    "natural": (),
}
_DEFAULT_MIN_PARTITION_SIZE = 2


def partition(
    labels: np.ndarray,
    num_sites: int,
    scheme: str,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    site_of: np.ndarray | None = None,
    site_names: Sequence[str] | None = None,
    groups: np.ndarray | None = None,
    key: str = "federation.partition",
) -> list[np.ndarray]:
    """One sorted int64 array of indices into ``labels`` per site.

    The arrays are disjoint and cover every index (``natural``: every index whose site is listed
    in ``site_names``). ``key`` is the config key of the partition block, used in every
    :class:`ConfigError`. With ``groups`` and ``dirichlet``, a patient's label is the label of
    its first image (the Dirichlet draw needs one label per unit partitioned). ``groups`` is
    ignored by ``natural``: the data's own sites are kept as they are. When
    ``min_partition_size`` is not given it defaults to 2, lowered to what fits (items //
    num_sites) so small federations still split.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    params, num_sites = _checked(scheme, params, num_sites, key)

    if scheme == "natural":
        return _natural(labels, num_sites, site_of, site_names, key)

    if groups is None:
        unit_labels, unit, inverse = labels, "images", None
    else:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(f"groups has shape {groups.shape}, labels {labels.shape}: one id per image")
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        unit_labels, unit = labels[first], "patients"
    m = len(unit_labels)
    if num_sites > m:
        raise ConfigError(f"{key}.num_sites", num_sites, f"at most the number of {unit} ({m})")

    if scheme == "iid":
        parts = _iid(unit_labels, num_sites, seed)
    else:
        alpha = _alpha(params, scheme, key)
        mps = _min_partition_size(params, m, num_sites, unit, key)
        if scheme == "dirichlet":
            self_balancing = params.get("self_balancing", False)
            if not isinstance(self_balancing, bool):
                raise ConfigError(f"{key}.self_balancing", self_balancing, "true or false")
            parts = _dirichlet(unit_labels, num_sites, alpha, mps, self_balancing, seed, unit, key)
        else:
            parts = _quantity(unit_labels, num_sites, alpha, mps, seed)

    if inverse is None:
        return [np.sort(p) for p in parts]
    return _images_of_units(parts, inverse, m, num_sites)


def _checked(scheme: str, params: Mapping[str, Any] | None, num_sites: Any,
             key: str) -> tuple[dict[str, Any], int]:
    """The scheme, its params (only those it reads) and the site count, checked."""
    if scheme not in SCHEMES:
        raise ConfigError(f"{key}.scheme", scheme, f"one of {', '.join(SCHEMES)}")
    params = dict(params or {})
    for name, value in params.items():
        if name not in _PARAMS[scheme]:
            allowed = ", ".join(_PARAMS[scheme]) or "none"
            raise ConfigError(
                f"{key}.{name}", value, f"unset: scheme {scheme!r} reads these params: {allowed}"
            )
    if isinstance(num_sites, bool) or not isinstance(num_sites, numbers.Integral) or num_sites < 1:
        raise ConfigError(f"{key}.num_sites", num_sites, "an integer >= 1")
    return params, int(num_sites)


def _images_of_units(parts: list[np.ndarray], inverse: np.ndarray, num_units: int,
                     num_sites: int) -> list[np.ndarray]:
    """Every image follows its patient: site of each unit -> site of each image, then the
    images grouped by site (a stable sort keeps them ascending within a site)."""
    unit_site = np.empty(num_units, dtype=np.int64)
    for site, p in enumerate(parts):
        unit_site[p] = site
    image_site = unit_site[inverse]
    order = np.argsort(image_site, kind="stable").astype(np.int64)
    counts = np.bincount(image_site, minlength=num_sites)
    return np.split(order, np.cumsum(counts)[:-1])


def _alpha(params: Mapping[str, Any], scheme: str, key: str) -> float:
    if "alpha" not in params and scheme == "quantity":
        return 1.0
    alpha = params.get("alpha")
    number = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
    if not (number and math.isfinite(alpha) and alpha > 0):
        why = "" if "alpha" in params else f" (required by scheme {scheme!r})"
        raise ConfigError(f"{key}.alpha", alpha, f"a number > 0{why}: small = skewed, large = near IID")
    return float(alpha)


def _min_partition_size(params: Mapping[str, Any], m: int, num_sites: int, unit: str, key: str) -> int:
    most = m // num_sites
    if "min_partition_size" not in params:
        return min(_DEFAULT_MIN_PARTITION_SIZE, most)
    mps = params["min_partition_size"]
    if isinstance(mps, bool) or not isinstance(mps, numbers.Integral) or not 1 <= mps <= most:
        raise ConfigError(
            f"{key}.min_partition_size", mps,
            f"an integer from 1 to {most} ({m} {unit} over {num_sites} sites; a site needs data)",
        )
    return int(mps)


class _LoadedOnUse(types.ModuleType):
    """A module that runs its code at the first use of one of its attributes (see
    `_flower_partitioners`). importlib's LazyLoader would not do: the import system reads the
    module's `__spec__` when its package's `__init__` binds it, which loads a LazyLoader module
    at once."""

    def __getattr__(self, name: str):
        spec = self.__dict__.pop("_spec_to_run", None)
        if spec is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        spec.loader.exec_module(self)
        return getattr(self, name)


def _flower_partitioners() -> types.ModuleType:
    """`flwr_datasets.partitioner`, without the plotting and metrics its package imports.

    Any flwr_datasets import runs the package's `__init__`, which imports its `visualization`
    (seaborn, so scipy.stats and matplotlib) and `metrics` (pandas) subpackages: 1.7-2 s of
    every run's start, on the driver's path before Ray starts (`import
    flwr_datasets.partitioner`: 3.0-3.5 s here, 1.0-1.4 s without them). So, unless
    flwr_datasets is imported already, these two are registered as modules that load
    themselves when first used (`flwr_datasets.visualization.plot_label_distributions` works)."""
    package = None if "flwr_datasets" in sys.modules else importlib.util.find_spec("flwr_datasets")
    for sub in ("visualization", "metrics") if package and package.submodule_search_locations else ():
        name, folder = f"flwr_datasets.{sub}", Path(list(package.submodule_search_locations)[0]) / sub
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        if (folder / "__init__.py").is_file() and spec is not None and spec.loader is not None:
            module = _LoadedOnUse(name)
            module.__dict__.update(__spec__=spec, __loader__=spec.loader, __file__=spec.origin,
                                   __path__=spec.submodule_search_locations, __package__=name,
                                   _spec_to_run=spec)
            sys.modules.setdefault(name, module)
    import flwr_datasets.partitioner

    return flwr_datasets.partitioner


def _dataset(columns: Mapping[str, np.ndarray]):
    """The tiny HF dataset the Flower partitioners read: labels and row numbers, no images."""
    from datasets import Dataset

    # Arrow format: a column read (`ds["label"]` in Flower, `part[:]["idx"]` here) is one Arrow
    # array. In the default/numpy formats datasets 4 returns a lazy Column that np.array walks
    # row by row: Flower's own `np.array(dataset["label"])` took 15 s for 100k rows.
    return Dataset.from_dict(dict(columns)).with_format("arrow")


def _rows(part) -> np.ndarray:
    """The "idx" column of a loaded partition, as one int64 array (Arrow -> numpy, no row loop)."""
    return np.asarray(part[:]["idx"], dtype=np.int64)


def _load_all(partitioner, num_sites: int) -> list[np.ndarray]:
    return [_rows(partitioner.load_partition(i)) for i in range(num_sites)]


def _iid(labels: np.ndarray, num_sites: int, seed: int) -> list[np.ndarray]:
    # IidPartitioner cuts contiguous shards: shuffle the rows first or "iid" is "sorted by index".
    rows = np.random.default_rng(seed).permutation(len(labels))
    partitioner = _flower_partitioners().IidPartitioner(num_partitions=num_sites)
    partitioner.dataset = _dataset({"label": labels[rows], "idx": rows})
    return _load_all(partitioner, num_sites)


def _dirichlet(labels, num_sites, alpha, mps, self_balancing, seed, unit, key) -> list[np.ndarray]:
    partitioner = _flower_partitioners().DirichletPartitioner(
        num_partitions=num_sites, partition_by="label", alpha=alpha, min_partition_size=mps,
        self_balancing=self_balancing, shuffle=True, seed=seed,
    )
    partitioner.dataset = _dataset({"label": labels, "idx": np.arange(len(labels))})
    try:
        with warnings.catch_warnings():
            # One warning per redraw; the last failure becomes the ConfigError below.
            warnings.simplefilter("ignore", UserWarning)
            return _load_all(partitioner, num_sites)
    except ValueError as err:
        if "attempts" not in str(err):
            raise
        raise ConfigError(
            f"{key}.alpha", alpha,
            f"large enough that each of {num_sites} sites gets min_partition_size={mps} {unit} "
            f"(Flower redraws the Dirichlet 10 times, then gives up): raise {key}.alpha, lower "
            f"{key}.min_partition_size or num_sites, or set {key}.self_balancing",
        ) from err


def _quantity_sizes(m: int, num_sites: int, alpha: float, mps: int, rng: np.random.Generator) -> list[int]:
    """Site sizes: ``mps`` each plus a Dirichlet(alpha) share of the rest, summing to ``m``.

    Shares are floored and the leftover units go to the largest fractional parts (largest
    remainder), so the sizes are integers, sum exactly to m and keep the drawn proportions.
    """
    extra = m - num_sites * mps
    share = rng.dirichlet(np.full(num_sites, alpha)) * extra
    base = np.floor(share).astype(np.int64)
    left = extra - int(base.sum())
    if left > 0:
        base[np.argsort(base - share, kind="stable")[:left]] += 1
    return [int(s) for s in base + mps]


def _quantity(labels: np.ndarray, num_sites: int, alpha: float, mps: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = _quantity_sizes(len(labels), num_sites, alpha, mps, rng)
    # SizePartitioner takes contiguous runs of rows: shuffled rows keep labels IID within a site.
    rows = rng.permutation(len(labels))
    partitioner = _flower_partitioners().SizePartitioner(partition_sizes=sizes)
    partitioner.dataset = _dataset({"label": labels[rows], "idx": rows})
    return _load_all(partitioner, num_sites)


def _natural(labels, num_sites, site_of, site_names, key) -> list[np.ndarray]:
    if site_of is None:
        raise ConfigError(
            f"{key}.scheme", "natural",
            "used only with data that names each image's site (a site column or one folder per "
            "site); this dataset has none, so pick iid, dirichlet or quantity",
        )
    site_of = np.asarray(site_of).astype(str)
    if site_of.shape != labels.shape:
        raise ValueError(f"site_of has shape {site_of.shape}, labels {labels.shape}: one site per image")
    present = sorted(set(site_of.tolist()))
    names = present if site_names is None else [str(s) for s in site_names]
    for name in names:
        if name not in present:
            raise ConfigError(
                f"{key}.site_names", name, f"one of the sites in the data: {', '.join(present)}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}.site_names", names, "a list of distinct site names")
    if num_sites != len(names):
        raise ConfigError(f"{key}.num_sites", num_sites, f"{len(names)}, one per site: {', '.join(names)}")

    partitioner = _flower_partitioners().NaturalIdPartitioner(partition_by="site")
    partitioner.dataset = _dataset({"label": labels, "idx": np.arange(len(labels)), "site": site_of})
    with contextlib.redirect_stderr(io.StringIO()):  # Flower's tqdm bar over every row
        _ = partitioner.num_partitions  # builds partition_id_to_natural_id (sorted site names)
        pid_of = {str(natural): pid for pid, natural in partitioner.partition_id_to_natural_id.items()}
        return [np.sort(_rows(partitioner.load_partition(pid_of[n]))) for n in names]


def class_histogram(labels: np.ndarray, idx: np.ndarray, num_classes: int) -> list[int]:
    """Images per class among ``labels[idx]`` (the per-site label skew a report shows)."""
    picked = np.asarray(labels)[np.asarray(idx, dtype=np.int64)]
    if picked.size and (picked.min() < 0 or picked.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got {picked.min()}..{picked.max()}")
    return np.bincount(picked.astype(np.int64), minlength=num_classes).tolist()


def split_indices(
    idx: np.ndarray, fractions: Mapping[str, float], seed: int, groups: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Split one site's indices into "train" plus one array per named fraction (e.g. val, test).

    Without ``groups``: a random image-level split, ``round(fraction * n)`` each ("val" at least
    1 when its fraction > 0 and n >= 2). With ``groups`` (patient ids over the whole dataset,
    indexed by the values of ``idx``): whole patients go to one split, so a patient's images
    never sit in both train and test; groups are taken in a seeded random order whenever they
    bring a split closer to ``fraction * n`` images ("val" at least one patient, the smallest,
    when its fraction > 0 and the site has >= 2 patients). The rest is "train", which must not be
    empty (ValueError naming the site size). Every array is sorted.
    """
    idx = np.asarray(idx, dtype=np.int64)
    n = idx.size
    fractions = dict(fractions)
    for name, f in fractions.items():
        if name == "train":
            raise ValueError("fractions name the held-out splits; 'train' is the remainder")
        if not (isinstance(f, numbers.Real) and 0 <= f < 1):
            raise ValueError(f"fraction {name}={f!r} must be a number in [0, 1)")
    if sum(fractions.values()) >= 1:
        raise ValueError(f"fractions {fractions} sum to >= 1: nothing would be left to train on")
    rng = np.random.default_rng(seed)

    out: dict[str, np.ndarray] = {}
    if groups is None:
        order = rng.permutation(idx)
        start = 0
        for name, f in fractions.items():
            k = round(f * n)
            if name == "val" and f > 0 and n >= 2:
                k = max(k, 1)
            k = min(k, n - start)
            out[name] = np.sort(order[start:start + k])
            start += k
        train, size = np.sort(order[start:]), f"{n} images"
    else:
        _, inverse, counts = np.unique(np.asarray(groups)[idx], return_inverse=True, return_counts=True)
        split_of = np.full(counts.size, -1, dtype=np.int64)  # -1: train
        order = rng.permutation(counts.size)
        for k, (name, f) in enumerate(fractions.items()):
            target, got = f * n, 0
            for g in order:
                if got >= target:
                    break  # any further group only moves away from the target
                if split_of[g] == -1 and abs(got + counts[g] - target) < abs(got - target):
                    split_of[g], got = k, got + counts[g]
            free = order[split_of[order] == -1]
            if name == "val" and f > 0 and got == 0 and counts.size >= 2 and free.size:
                split_of[free[np.argmin(counts[free])]] = k
        image_split = split_of[inverse]
        for k, name in enumerate(fractions):
            out[name] = np.sort(idx[image_split == k])
        train, size = np.sort(idx[image_split == -1]), f"{n} images of {counts.size} patients"
    if train.size == 0:
        raise ValueError(
            f"a site of {size} leaves no training data after the held-out splits {fractions}: "
            "give the site more data or lower the fractions"
        )
    return {"train": train, **out}


def leakage(groups: np.ndarray, a: np.ndarray, b: np.ndarray) -> list[str]:
    """Group (patient) ids with images in both ``a`` and ``b``: non-empty means the test score
    is measured on patients the model trained on (the patient-leakage pitfall)."""
    groups = np.asarray(groups)
    common = np.intersect1d(groups[np.asarray(a, dtype=np.int64)], groups[np.asarray(b, dtype=np.int64)])
    return sorted(str(g) for g in common.tolist())
