"""The folder loaders: `image_folder` (root/<class>/<image>, or per site) and `seg_folder`
(images with masks, GlaS style or images/ + masks/, flat or per site)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from snowfed.config import require
from snowfed.data.common import (
    DEFAULT_EXTENSIONS,
    DataError,
    LoadedDataset,
    _choice,
    _extensions,
    _flag,
    _folder,
    _image_files,
    _image_size,
    _options,
    _patient,
    _pattern,
    _Reader,
    _resize,
    _sites_hint,
    _size_text,
    _subfolders,
)

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
