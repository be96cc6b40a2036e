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

import os
import re
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from snowfed.config import ConfigError, require, require_int, require_keys

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SPLITS = ("train", "val", "test")
_NPZ_LAYOUT = "a MedMNIST-style .npz holds train_images and train_labels, optionally val_* and test_*"
_SKIP_HINT = "fix or remove it, or set dataset.skip_bad=true to skip unreadable files"


class DataError(ValueError):
    """A data file that cannot be used: names the file (or npz key), what is wrong and what is allowed."""

    def __init__(self, file: str | os.PathLike, problem: str):
        self.file, self.problem = str(file), problem
        super().__init__(f"{self.file}: {problem}")


@dataclass(frozen=True)
class LoadedDataset:
    """A whole dataset in memory, one row per image (see the module docstring)."""

    task: str  # "classification" | "segmentation"
    images: np.ndarray  # uint8 (N, H, W, 3); grey sources replicated to 3 channels
    targets: np.ndarray  # classification: int64 (N,) class ids; segmentation: int32 (N, H, W) instances
    class_names: list[str]  # classification: name of each class id; segmentation: background, object
    split: np.ndarray | None  # "train"/"val"/"test" of each image when the source fixes the splits
    site: np.ndarray | None  # natural silo of each image when the layout gives one
    patient: np.ndarray | None  # patient of each image when dataset.patient_pattern is set
    files: list[str]  # source of each image, for messages
    skipped: list[dict]  # {"file", "reason"} of each file skipped because of dataset.skip_bad

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------- config


def _options(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The loader's options: cfg over defaults; a key the loader does not know is a ConfigError."""
    name = cfg.get("name")
    known = ["name", *defaults]
    require_keys(cfg, known, "dataset", f"a key of dataset {name}")
    return {key: cfg.get(key, default) for key, default in defaults.items()}


def _path(value: Any, allowed: str) -> Path:
    require(isinstance(value, (str, os.PathLike)) and str(value) != "", "dataset.path", value, allowed)
    return Path(value).expanduser()


def _folder(value: Any, allowed: str) -> Path:
    root = _path(value, allowed)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "no such folder"
        raise DataError(root, f"{problem}; dataset.path must be {allowed}")
    return root


def _image_size(value: Any) -> int | None:
    return None if value is None else require_int(value, "dataset.image_size", 1)


def _flag(value: Any, key: str) -> bool:
    require(isinstance(value, bool), f"dataset.{key}", value, "true or false")
    return value


def _choice(value: Any, key: str, choices: Sequence[str]) -> str:
    require(value in choices, f"dataset.{key}", value, f"one of {', '.join(choices)}")
    return value


def _extensions(value: Any) -> tuple[str, ...]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    ok = ok and all(isinstance(ext, str) and ext.startswith(".") for ext in value)
    require(ok, "dataset.extensions", value, "a non-empty list of file extensions such as [.png, .jpg]")
    return tuple(ext.lower() for ext in value)


def _pattern(value: Any) -> re.Pattern | None:
    if value is None:
        return None
    allowed = "null or a regular expression with a group that captures the patient id from the file stem"
    require(isinstance(value, str), "dataset.patient_pattern", value, allowed)
    try:
        pattern = re.compile(value)
    except re.error as err:
        raise ConfigError("dataset.patient_pattern", value, f"{allowed} ({err})") from None
    require(pattern.groups >= 1, "dataset.patient_pattern", value, allowed)
    return pattern


def _patient(pattern: re.Pattern, file: Path) -> str:
    """The first group of `pattern` searched in the file stem."""
    match = pattern.search(file.stem)
    if match is None or match.group(1) is None:
        raise DataError(
            file, f"name {file.stem!r} does not match dataset.patient_pattern {pattern.pattern!r}"
            " (its first group must capture the patient id of every file)"
        )
    return match.group(1)


# ---------------------------------------------------------------------------------------- files


def _subfolders(folder: Path, what: str, expected: str) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(folder, f"no {what} folder; expected {expected}")
    return found


def _image_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """The image files directly in `folder`, sorted by name (other files are ignored)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def _sites_hint(folder: Path) -> str:
    has_subfolders = any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
    return "; it has sub-folders: did you mean dataset.layout=sites?" if has_subfolders else ""


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _resize(array: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size, size), resample))


def _grey_to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


class _Reader:
    """Opens image and mask files: corrupt files raise or, with skip_bad, land in `skipped`; with
    image_size null every image must share the first image's size."""

    def __init__(self, image_size: int | None, skip_bad: bool):
        self.image_size, self.skip_bad = image_size, skip_bad
        self.skipped: list[dict] = []
        self._first: tuple[Path, tuple[int, int]] | None = None

    def open(self, file: Path) -> Image.Image | None:
        """The decoded image, or None when it is unreadable and skipped."""
        try:
            with Image.open(file) as image:
                image.load()
                return image
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            reason = "not a readable image (" + str(err).replace(f" {str(file)!r}", "") + ")"
            if not self.skip_bad:
                raise DataError(file, f"{reason}; {_SKIP_HINT}") from None
            self.skipped.append({"file": str(file), "reason": reason})
            return None

    def rgb(self, image: Image.Image, file: Path) -> np.ndarray:
        """uint8 (H, W, 3), resized to image_size (bilinear) when set."""
        if image.mode.startswith(("I", "F")):
            raise DataError(
                file, f"has image mode {image.mode} (16-bit or float); images must be 8-bit grey, "
                "palette, RGB or RGBA"
            )
        image = image.convert("RGB")
        if self.image_size is None:
            self._check_size(file, image.size)
        else:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    def _check_size(self, file: Path, size: tuple[int, int]) -> None:
        if self._first is None:
            self._first = (file, size)
        elif size != self._first[1]:
            raise DataError(
                file, f"is {_size_text(size)} pixels (width x height) but {self._first[0]} is "
                f"{_size_text(self._first[1])}; set dataset.image_size to resize every image to one size"
            )


# ------------------------------------------------------------------------------------------ npz


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

_IMAGE_FOLDER_LAYOUTS = {
    "classes": "root/<class>/<image>",
    "sites": "root/<site>/<class>/<image>",
}


def _load_image_folder(cfg: Mapping[str, Any]) -> LoadedDataset:
    defaults = {
        "path": None, "layout": "classes", "image_size": None, "extensions": list(DEFAULT_EXTENSIONS),
        "patient_pattern": None, "skip_bad": False,
    }
    opts = _options(cfg, defaults)
    layout = _choice(opts["layout"], "layout", list(_IMAGE_FOLDER_LAYOUTS))
    expected = f"{_IMAGE_FOLDER_LAYOUTS[layout]} (dataset.layout={layout})"
    root = _folder(opts["path"], f"a folder laid out as {expected}")
    extensions, pattern = _extensions(opts["extensions"]), _pattern(opts["patient_pattern"])
    reader = _Reader(_image_size(opts["image_size"]), _flag(opts["skip_bad"], "skip_bad"))

    sites = [(None, root)] if layout == "classes" else [
        (folder.name, folder) for folder in _subfolders(root, "site", expected)
    ]
    entries = []  # (site, class name, file)
    for site, folder in sites:
        for class_folder in _subfolders(folder, "class", expected):
            files = _image_files(class_folder, extensions)
            if not files:
                hint = _sites_hint(class_folder) if layout == "classes" else ""
                raise DataError(
                    class_folder,
                    f"class folder holds no image ({', '.join(extensions)}); expected {expected}{hint}",
                )
            entries += [(site, class_folder.name, file) for file in files]
    class_names = sorted({name for _, name, _ in entries})
    class_ids = {name: i for i, name in enumerate(class_names)}

    images, targets, site_of, patients, files = [], [], [], [], []
    for site, name, file in entries:
        patient = _patient(pattern, file) if pattern else None
        image = reader.open(file)
        if image is None:
            continue
        images.append(reader.rgb(image, file))
        targets.append(class_ids[name])
        site_of.append(site)
        patients.append(patient)
        files.append(str(file))
    if not images:
        raise DataError(root, f"holds no readable image ({len(reader.skipped)} skipped)")
    return LoadedDataset(
        task="classification", images=np.stack(images), targets=np.array(targets, dtype=np.int64),
        class_names=class_names, split=None, site=np.array(site_of) if layout == "sites" else None,
        patient=np.array(patients) if pattern else None, files=files, skipped=reader.skipped,
    )


# ----------------------------------------------------------------------------------- seg_folder

_SEG_FOLDER_LAYOUTS = {"flat": "root/", "sites": "root/<site>/"}
_OBJECTS = ("components", "instance")


def _load_seg_folder(cfg: Mapping[str, Any]) -> LoadedDataset:
    defaults = {
        "path": None, "mask_suffix": "_anno", "objects": "components", "layout": "flat", "image_size": None,
        "patient_pattern": None, "extensions": list(DEFAULT_EXTENSIONS), "skip_bad": False,
    }
    opts = _options(cfg, defaults)
    layout = _choice(opts["layout"], "layout", list(_SEG_FOLDER_LAYOUTS))
    objects = _choice(opts["objects"], "objects", _OBJECTS)
    suffix = opts["mask_suffix"]
    ok = isinstance(suffix, str) and suffix != ""
    require(ok, "dataset.mask_suffix", suffix, "a non-empty string such as _anno")
    expected = (
        f"{_SEG_FOLDER_LAYOUTS[layout]} holding <name>.png with <name>{suffix}.png, "
        f"or images/<name>.png with masks/<name>.png (dataset.layout={layout})"
    )
    root = _folder(opts["path"], f"a folder laid out as {expected}")
    extensions, pattern = _extensions(opts["extensions"]), _pattern(opts["patient_pattern"])
    image_size = _image_size(opts["image_size"])
    reader = _Reader(image_size, _flag(opts["skip_bad"], "skip_bad"))

    sites = [(None, root)] if layout == "flat" else [
        (folder.name, folder) for folder in _subfolders(root, "site", expected)
    ]
    images, targets, site_of, patients, files = [], [], [], [], []
    for site, folder in sites:
        for image_file, mask_file in _pairs(folder, extensions, suffix, expected, layout):
            patient = _patient(pattern, image_file) if pattern else None
            image, mask = reader.open(image_file), reader.open(mask_file)
            if image is None or mask is None:
                continue
            if mask.size != image.size:
                raise DataError(
                    mask_file, f"mask is {_size_text(mask.size)} pixels (width x height) but its image "
                    f"{image_file} is {_size_text(image.size)}; a mask must have its image's size"
                )
            images.append(reader.rgb(image, image_file))
            targets.append(_instances(mask, mask_file, objects, image_size))
            site_of.append(site)
            patients.append(patient)
            files.append(str(image_file))
    if not images:
        raise DataError(root, f"holds no readable image and mask pair ({len(reader.skipped)} files skipped)")
    return LoadedDataset(
        task="segmentation", images=np.stack(images), targets=np.stack(targets),
        class_names=["background", "object"], split=None,
        site=np.array(site_of) if layout == "sites" else None,
        patient=np.array(patients) if pattern else None, files=files, skipped=reader.skipped,
    )


def _pairs(
    folder: Path, extensions: tuple[str, ...], suffix: str, expected: str, layout: str
) -> list[tuple[Path, Path]]:
    """(image, mask) files of one folder, sorted by image name: images/ + masks/ when both exist,
    else GlaS style (the mask of <name>.* is <name><suffix>.* next to it)."""
    images_dir, masks_dir = folder / "images", folder / "masks"
    if images_dir.is_dir() != masks_dir.is_dir():
        present, absent = ("images", "masks") if images_dir.is_dir() else ("masks", "images")
        raise DataError(folder, f"has a {present}/ folder but no {absent}/ folder; expected {expected}")
    if images_dir.is_dir():
        images, masks = _by_stem(images_dir, extensions), _by_stem(masks_dir, extensions)
        mask_place = "masks/<same name>.*"
    else:
        files = _by_stem(folder, extensions)
        masks = {stem[: -len(suffix)]: f for stem, f in files.items() if stem.endswith(suffix)}
        images = {stem: f for stem, f in files.items() if not stem.endswith(suffix)}
        mask_place = f"<name>{suffix}.* next to it (dataset.mask_suffix)"
    orphans = sorted(masks.keys() - images.keys())
    if orphans:
        stem = orphans[0]
        raise DataError(masks[stem], f"mask without an image named {stem}.*; every mask needs its image")
    unmasked = sorted(images.keys() - masks.keys())
    if unmasked:
        raise DataError(images[unmasked[0]], f"image without a mask; expected its mask as {mask_place}")
    if not images:
        hint = _sites_hint(folder) if layout == "flat" else ""
        raise DataError(folder, f"holds no image ({', '.join(extensions)}); expected {expected}{hint}")
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def _by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for file in _image_files(folder, extensions):
        if file.stem in found:
            raise DataError(file, f"has the same name as {found[file.stem]}; keep one file per name")
        found[file.stem] = file
    return found


def _instances(mask: Image.Image, file: Path, objects: str, image_size: int | None) -> np.ndarray:
    """int32 (H, W) instance ids 1..K (0 background), resized NEAREST to image_size when set."""
    values = np.asarray(mask)
    if values.ndim == 3:  # RGB(A) or grey + alpha: usable only when the colour channels agree
        colour = values[..., :3] if values.shape[-1] >= 3 else values[..., :1]
        if (colour != colour[..., :1]).any():
            raise DataError(
                file, f"mask is a colour ({mask.mode}) image whose channels differ; masks must be "
                "single-channel (grey or palette) images of 0 background and object ids"
            )
        values = colour[..., 0]
    if np.issubdtype(values.dtype, np.floating) and (values != np.round(values)).any():
        raise DataError(file, f"mask mode {mask.mode} holds non-integer values; masks must hold integer ids")
    if values.min() < 0:
        raise DataError(file, f"mask holds negative values (min {values.min()}); masks must hold ids >= 0")
    if objects == "components":
        labels = ndimage.label(values > 0, structure=np.ones((3, 3), dtype=bool))[0]
    else:
        labels = values.astype(np.int64)
    if image_size is not None:
        labels = _resize(labels.astype(np.int32), image_size, Image.Resampling.NEAREST)
    ids, relabelled = np.unique(labels, return_inverse=True)
    return (relabelled.reshape(labels.shape) + (ids[0] != 0)).astype(np.int32)


# --------------------------------------------------------------------------------------- digits


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
