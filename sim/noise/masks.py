"""SNOW label degradation (Foucart, Debeir, Decaestecker, ISBI 2019).

Turns a clean instance mask into the kind of mask a hurried annotator would draw, object by
object, in the order of the reference code (adfoucart/deephisto, data/SNOWGenerator.py):

1. the object is missing from the annotation with probability ``p_remove``;
2. its outline is deformed: r = int(N(0, sigma)), truncated toward zero; r < 0 erodes by a disk
   of radius |r|, r > 0 dilates; an object eroded away is dropped;
3. its outline is simplified (``simplify_every`` = f > 1): keep every f-th outer-contour point
   and refill the polygon;
4. it is replaced by its axis-aligned bounding box (``bounding_box``).

Choices where the reference is silent or accidental:

- Draws: per image, one uniform per object for removal then one standard normal per object for
  the radius, always both, so that with the same seed the same objects are removed and the same
  normals are drawn whatever the other settings are (presets stay paired).
- Outside the image is background, as in the reference's zero padding: objects touching the
  border erode from it too; dilations and boxes are clipped to the image.
- Contours are taken at level 0.5 on the hole-filled object, and every outer contour is
  simplified, not only the first one, so an object that erosion split in pieces keeps them all.
  A contour with fewer than 3 kept points, or whose polygon covers no pixel centre, is too small
  to simplify and is kept unchanged (the reference would draw its 1-2 vertex pixels).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.draw import polygon
from skimage.measure import find_contours

from snowfed.config import is_real


@dataclass(frozen=True)
class SnowNoise:
    """One label-quality profile: how a site's annotations differ from the truth."""

    p_remove: float = 0.0  # probability an object's annotation is missing
    sigma: float = 0.0  # std (px) of the erosion/dilation radius
    simplify_every: int = 1  # f: keep every f-th contour point (1 = off)
    bounding_box: bool = False  # replace each object by its bounding box

    def __post_init__(self):
        p, sigma, f = self.p_remove, self.sigma, self.simplify_every
        if not (is_real(p) and 0 <= p <= 1):
            raise ValueError(f"p_remove must be a number in [0, 1], got {p!r}")
        if not (is_real(sigma) and 0 <= sigma < math.inf):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        if not (isinstance(f, numbers.Integral) and not isinstance(f, bool) and f >= 1):
            raise ValueError(f"simplify_every must be an integer >= 1, got {f!r}")
        if not isinstance(self.bounding_box, (bool, np.bool_)):
            raise ValueError(f"bounding_box must be a bool, got {self.bounding_box!r}")


def degrade(instances: np.ndarray, noise: SnowNoise, rng: np.random.Generator) -> np.ndarray:
    """instances: (H, W) int instance labels (0 = background). Returns (H, W) uint8 binary noisy
    mask.

    As in the reference, a mask with a single label value is taken as a binary mask and split
    into 8-connected components; otherwise every label is one object.
    """
    return _degrade(instances, noise, rng)[0]


def degrade_dataset(instances: np.ndarray, noise: SnowNoise, seed: int) -> tuple[np.ndarray, dict]:
    """instances (N, H, W). Returns noisy masks uint8 (N, H, W) in {0,1} and the statistics
    measured on them, to report what a site's labels really look like beside its results:

    objects (count), objects_removed (fraction absent from the noisy masks: removed or eroded
    away), pixel_disagreement (fraction of pixels where noisy != clean), noisy_foreground,
    clean_foreground, pixel_precision and pixel_recall of noisy vs clean (1.0 when undefined).
    One generator seeded by ``seed`` serves the images in order.
    """
    instances = np.asarray(instances)
    if instances.ndim != 3:
        raise ValueError(f"instances must be (N, H, W), got shape {instances.shape}")
    rng = np.random.default_rng(seed)
    noisy = np.zeros(instances.shape, dtype=np.uint8)
    objects = dropped = 0
    for i, image in enumerate(instances):
        noisy[i], n_objects, n_dropped = _degrade(image, noise, rng)
        objects += n_objects
        dropped += n_dropped
    clean = instances > 0
    n_pixels = max(clean.size, 1)
    n_clean, n_noisy = int(np.count_nonzero(clean)), int(np.count_nonzero(noisy))
    hit = int(np.count_nonzero(clean & (noisy > 0)))
    return noisy, {
        "objects": objects,
        "objects_removed": dropped / objects if objects else 0.0,
        "pixel_disagreement": (n_clean + n_noisy - 2 * hit) / n_pixels,
        "noisy_foreground": n_noisy / n_pixels,
        "clean_foreground": n_clean / n_pixels,
        "pixel_precision": hit / n_noisy if n_noisy else 1.0,
        "pixel_recall": hit / n_clean if n_clean else 1.0,
    }


def _degrade(
    instances: np.ndarray, noise: SnowNoise, rng: np.random.Generator
) -> tuple[np.ndarray, int, int]:
    """The noisy mask, the number of objects and the number dropped (removed or eroded away)."""
    instances = np.asarray(instances)
    if instances.ndim != 2 or instances.dtype.kind not in "biu":
        raise ValueError(
            f"instances must be a 2-D integer label image, got {instances.dtype} {instances.shape}"
        )
    if instances.size and instances.min() < 0:
        raise ValueError("instances must be >= 0 (0 = background)")
    values = np.unique(instances[instances > 0])
    if len(values) == 1:
        labels, _ = ndimage.label(instances > 0, structure=np.ones((3, 3)))
    else:
        labels = instances
    boxes = [(lab, box) for lab, box in enumerate(ndimage.find_objects(labels), 1) if box]
    remove = rng.random(len(boxes)) < noise.p_remove
    radii = (rng.standard_normal(len(boxes)) * noise.sigma).astype(int)  # truncates toward 0
    # Pad the image so that every crop, grown by its dilation radius, stays in the array.
    pad = int(np.abs(radii).max(initial=0)) + 1
    padded = np.pad(labels, pad)
    out = np.zeros(padded.shape, dtype=bool)
    dropped = 0
    for (lab, (rows, cols)), gone, r in zip(boxes, remove, radii, strict=True):
        if gone:
            dropped += 1
            continue
        grow = max(r, 0) + 1  # room for the dilation plus one background pixel all round
        crop = (
            slice(rows.start + pad - grow, rows.stop + pad + grow),
            slice(cols.start + pad - grow, cols.stop + pad + grow),
        )
        obj = _deform(padded[crop] == lab, r)
        if not obj.any():
            dropped += 1
            continue
        if noise.simplify_every > 1:
            obj = _simplify(obj, noise.simplify_every)
        if noise.bounding_box:
            obj = _box(obj)
        out[crop] |= obj
    h, w = instances.shape
    return out[pad : pad + h, pad : pad + w].astype(np.uint8), len(boxes), dropped


def _deform(obj: np.ndarray, r: int) -> np.ndarray:
    """Erodes (r < 0) or dilates (r > 0) ``obj`` by a disk of radius |r|.

    Exactly skimage's ``disk(|r|)`` footprint (offsets with dy^2 + dx^2 <= r^2), computed with a
    Euclidean distance transform so the cost does not grow with r (heavy-deformation presets use
    radii of tens of px); the distances are square roots of integers, so comparing them with the
    integer r is exact. Pixels outside ``obj`` count as background, and a dilation is cut at the
    array's edge: callers leave room around the object.
    """
    if r == 0 or not obj.any():
        return obj.copy()
    if r > 0:
        return ndimage.distance_transform_edt(~obj) <= r
    return ndimage.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1] > -r


def _simplify(obj: np.ndarray, every: int) -> np.ndarray:
    """Keeps every ``every``-th point of each outer contour and refills the polygons."""
    filled = ndimage.binary_fill_holes(obj)
    out = np.zeros(obj.shape, dtype=bool)
    for contour in find_contours(np.pad(filled, 1).astype(np.uint8), 0.5):
        contour = contour - 1  # back to ``obj`` coordinates
        kept = contour[::every]
        rr, cc = polygon(kept[:, 0], kept[:, 1], obj.shape) if len(kept) >= 3 else ((), ())
        if len(rr) == 0:  # too small to simplify: keep the piece as it is
            rr, cc = polygon(contour[:, 0], contour[:, 1], obj.shape)
        out[rr, cc] = True
    return out


def _box(obj: np.ndarray) -> np.ndarray:
    """The axis-aligned bounding box of ``obj``, filled."""
    rows = np.flatnonzero(obj.any(axis=1))
    cols = np.flatnonzero(obj.any(axis=0))
    out = np.zeros(obj.shape, dtype=bool)
    out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    return out
