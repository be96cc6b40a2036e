"""Loaders for real datasets: files on disk in the layouts medical-imaging data ships in.

Every loader turns one `dataset` config into the same :class:`LoadedDataset` (uint8 RGB images,
class ids or instance masks, and the split / site / patient of each image when the layout says),
so the partitioning, the label noise and the training code never see a file format.

- ``npz``: a MedMNIST-style ``.npz`` (``train_images``/``train_labels``, optional ``val_*`` and
  ``test_*``); the file's splits are kept in ``split``.
- ``image_folder``: ``root/<class>/<image>`` (torchvision's ImageFolder convention, classes sorted
  by folder name), or ``root/<site>/<class>/<image>`` when the sites are natural silos.
- ``seg_folder``: images with masks, GlaS style (``name.png`` + ``name_anno.png``) or as
  ``images/<name>.*`` + ``masks/<name>.*``; a mask becomes instance ids 1..K per image, from its
  8-connected components or from the ids it already holds. Flat, or one such folder per site.
- ``digits``: scikit-learn's bundled handwritten digits, a real classification set that works
  offline.

Bad input fails before any training with a :class:`DataError` of one line that names the file
(or npz key), what is wrong and what is allowed; ``skip_bad`` turns unreadable files into entries
of ``skipped`` instead.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from snowfed.config import require
from snowfed.data.common import (
    DataError,
    LoadedDataset,
    _flag,
    _grey_to_rgb,
    _image_size,
    _options,
    _path,
    _resize,
)
from snowfed.data.folders import _load_image_folder, _load_seg_folder

_SPLITS = ("train", "val", "test")
_NPZ_LAYOUT = "a MedMNIST-style .npz holds train_images and train_labels, optionally val_* and test_*"


def _load_npz(cfg: Mapping[str, Any]) -> LoadedDataset:
    opts = _options(cfg, {"path": None, "image_size": None, "skip_bad": False, "class_names": None})
    path = _path(opts["path"], "the path of a MedMNIST-style .npz file")
    size, skip_bad = _image_size(opts["image_size"]), _flag(opts["skip_bad"], "skip_bad")
    if not path.is_file():
        raise DataError(path, "no such file; dataset.path must name a MedMNIST-style .npz file")
    if not zipfile.is_zipfile(path):
        problem = "is not a readable .npz (zip) archive (corrupt, truncated or another format)"
        raise DataError(path, f"{problem}; {_NPZ_LAYOUT}")
    arrays, keys = _npz_arrays(path)
    if "train_images" not in arrays:
        raise DataError(path, f"has no key train_images (keys: {', '.join(keys)}); {_NPZ_LAYOUT}")

    images, labels, split, files, skipped = [], [], [], [], []
    first_size = None
    for name in _SPLITS:
        if f"{name}_images" not in arrays and f"{name}_labels" not in arrays:
            continue
        split_images, split_labels = _npz_split(path, arrays, name)
        keep = np.ones(len(split_labels), dtype=bool)
        for i in np.flatnonzero(split_labels < 0):
            problem = f"{name}_labels[{i}] = {split_labels[i]} is negative; labels must be class ids 0..C-1"
            if not skip_bad:
                raise DataError(path, f"{problem} (set dataset.skip_bad=true to skip such images)")
            keep[i] = False
            skipped.append({"file": f"{path}:{name}[{i}]", "reason": problem})
        if size is None:
            first_size = first_size or (name, split_images.shape[1:3])
            if split_images.shape[1:3] != first_size[1]:
                raise DataError(
                    path, f"{name}_images are {split_images.shape[1]}x{split_images.shape[2]} (HxW) but "
                    f"{first_size[0]}_images are {first_size[1][0]}x{first_size[1][1]}; set "
                    "dataset.image_size to resize every image to one size"
                )
        else:
            split_images = np.stack([_resize(im, size, Image.Resampling.BILINEAR) for im in split_images])
        images.append(_grey_to_rgb(split_images[keep]))
        labels.append(split_labels[keep])
        split += [name] * int(keep.sum())
        files += [f"{path}:{name}[{i}]" for i in np.flatnonzero(keep)]

    targets = np.concatenate(labels).astype(np.int64)
    if len(targets) == 0:
        raise DataError(path, "holds no usable image")
    num_classes = int(targets.max()) + 1
    class_names = opts["class_names"]
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]
    else:
        ok = isinstance(class_names, Sequence) and not isinstance(class_names, str)
        ok = ok and all(isinstance(n, str) for n in class_names) and len(set(class_names)) == len(class_names)
        ok = ok and len(class_names) >= num_classes
        allowed = f"null or a list of at least {num_classes} distinct names"
        allowed += f" ({path} has labels 0..{num_classes - 1})"
        require(ok, "dataset.class_names", class_names, allowed)
        class_names = list(class_names)
    return LoadedDataset(
        task="classification", images=np.concatenate(images), targets=targets, class_names=class_names,
        split=np.array(split), site=None, patient=None, files=files, skipped=skipped,
    )


def _npz_arrays(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The <split>_images / <split>_labels arrays by key (a member that cannot be read is a DataError
    naming it), and every key of the archive (other keys are left alone)."""
    wanted = {f"{name}_{kind}" for name in _SPLITS for kind in ("images", "labels")}
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
            for key in wanted.intersection(keys):
                try:
                    arrays[key] = npz[key]
                except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as err:
                    raise DataError(path, f"key {key} cannot be read ({err}); {_NPZ_LAYOUT}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(path, f"is a corrupt .npz archive ({err}); {_NPZ_LAYOUT}") from None
    return arrays, keys


def _npz_split(path: Path, arrays: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """The checked images (N, H, W) or (N, H, W, 3) and class ids (N,) of one split."""
    for key in (f"{name}_images", f"{name}_labels"):
        if key not in arrays:
            raise DataError(path, f"has {name}_* but no key {key}; {_NPZ_LAYOUT}")
    images, labels = arrays[f"{name}_images"], arrays[f"{name}_labels"]
    if images.dtype != np.uint8:
        raise DataError(path, f"{name}_images has dtype {images.dtype}; images must be uint8")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise DataError(
            path, f"{name}_images has shape {images.shape}; images must be (N, H, W) grey or (N, H, W, 3) RGB"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(path, f"{name}_labels has dtype {labels.dtype}; labels must be integer class ids")
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            path, f"{name}_labels has shape {labels.shape}: multi-label labels (one column per finding, "
            "as in ChestMNIST) are not supported; labels must be one class id per image, (N,) or (N, 1)"
        )
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise DataError(path, f"{name}_labels has shape {labels.shape}; labels must be (N,) or (N, 1)")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(
            path, f"{name}_images holds {len(images)} images but {name}_labels {len(labels)} labels; "
            "they must have one label per image"
        )
    return images, labels


# --------------------------------------------------------------------------------- image_folder


def _load_digits(cfg: Mapping[str, Any]) -> LoadedDataset:
    size = _image_size(_options(cfg, {"image_size": 8})["image_size"])
    from sklearn.datasets import load_digits  # heavy import, only this loader needs it

    digits = load_digits()
    grey = np.round(digits.images * 255 / 16).astype(np.uint8)
    targets = digits.target.astype(np.int64)
    if size not in (None, grey.shape[1]):
        grey = np.stack([_resize(im, size, Image.Resampling.BILINEAR) for im in grey])
    return LoadedDataset(
        task="classification", images=_grey_to_rgb(grey), targets=targets,
        class_names=[str(c) for c in range(10)], split=None, site=None, patient=None,
        files=[f"sklearn digits[{i}]" for i in range(len(grey))], skipped=[],
    )


LOADERS: dict[str, Callable[[Mapping[str, Any]], LoadedDataset]] = {
    "npz": _load_npz,
    "image_folder": _load_image_folder,
    "seg_folder": _load_seg_folder,
    "digits": _load_digits,
}


def load_dataset(cfg: Mapping[str, Any], loaded: dict[str, LoadedDataset] | None = None) -> LoadedDataset:
    """Load the dataset a `dataset` config mapping describes (dispatch on its `name`).

    `loaded`: the datasets the caller has loaded already, by config; one loaded here is added,
    read-only, since every plan that shares it reads the same arrays (a sweep's jobs: without
    it a 12-run sweep read its file 12 times and held 12 copies)."""
    name = cfg.get("name")
    require(name in LOADERS, "dataset.name", name, f"one of {', '.join(LOADERS)}")
    key = repr(sorted((k, repr(v)) for k, v in cfg.items()))
    if loaded is not None and key in loaded:
        return loaded[key]
    dataset = LOADERS[name](cfg)
    for array in (dataset.images, dataset.targets):
        array.flags.writeable = False
    if loaded is not None:
        loaded[key] = dataset
    return dataset
