"""What every dataset loader shares: the loaded dataset, the one-line data error, the checks
of a `dataset` config's options, and the reader of image files (the names with a leading
underscore are for the loaders of snowfed.data only)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from snowfed.config import ConfigError, require, require_int, require_keys

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
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
