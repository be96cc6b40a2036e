"""Tile samplers: how a node draws training tiles from its images.

A sampler is built once per node on its training arrays (plus its validated parameters) and
called every step; it returns a batch as tensors (images float in [0, 1], NCHW; labels int64,
NHW). All randomness goes through the torch.Generator it is called with, so a round is
reproducible from the trainer's seed. Called with `idx` (indices into its `num_images` images,
e.g. a DP-SGD Poisson sample), it crops one tile from each of those images instead of drawing
batch_size images.

Classification nodes (one class id per image, labels of shape (N,)) draw whole images: a tile
of an image has no label of its own. `tile_size` is then unused.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from snowfed.store import tensor_view

from .parts import Part


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The node's arrays as tensors made once and reused across rounds: views of them when they
    are C-contiguous (a store's slices are: no copy per node), in their own dtypes. Labels stay
    as stored (uint8 masks) and each batch is cast to int64, rather than the node holding an
    int64 copy eight times the size of its masks."""
    return tensor_view(images).permute(0, 3, 1, 2), tensor_view(labels)


def _crop(
    images: torch.Tensor, labels: torch.Tensor, idx, ys, xs, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([images[i, :, y : y + size, c : c + size] for i, y, c in zip(idx, ys, xs)])
    t = torch.stack([labels[i, y : y + size, c : c + size] for i, y, c in zip(idx, ys, xs)])
    return x.float().div_(255.0), t.long()


class RandomTileSampler:
    """Uniformly random images and tile positions (SNOW's baseline sampling); uniformly random
    whole images for classification."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) == 0:
            raise ValueError("a node needs at least one training image")
        self.images, self.labels = _to_tensors(images, labels)
        self.whole_images = self.labels.dim() == 1

    @property
    def num_images(self) -> int:
        return len(self.images)

    def __call__(
        self, batch_size: int, tile_size: int, generator: torch.Generator,
        idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = self.images.shape
        tile_size = min(tile_size, h, w)
        if idx is None:
            idx = torch.randint(n, (batch_size,), generator=generator)
        if self.whole_images:
            return self.images[idx].float().div_(255.0), self.labels[idx].long()
        batch_size = len(idx)
        ys = torch.randint(h - tile_size + 1, (batch_size,), generator=generator)
        xs = torch.randint(w - tile_size + 1, (batch_size,), generator=generator)
        return _crop(self.images, self.labels, idx, ys, xs, tile_size)


class PositiveTileSampler:
    """Only tiles that contain annotated pixels (SNOW's "only positive" strategy).

    Images without any annotated pixel are dropped. Like the reference code, each tile picks an
    annotated image, then one of its objects (8-connected components of label > 0), both
    uniformly, so small objects are seen as often as large ones. A pixel of that object is drawn
    uniformly and the tile is placed uniformly among the positions that contain it, then clipped
    to the image; clipping keeps the pixel inside, so no tile is ever empty. Uniform placement
    (rather than centring) avoids teaching the network that objects sit at the tile centre.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) == 0:
            raise ValueError("a node needs at least one training image")
        if np.ndim(labels) != 3:
            raise ValueError("sampler 'positive' draws tiles around annotated pixels of masks; "
                             "this node's labels are one class per image (use sampler 'random')")
        annotated = np.flatnonzero(np.asarray(labels).reshape(len(labels), -1).max(axis=1) > 0)
        if len(annotated) == 0:
            raise ValueError(
                f"sampler 'positive' needs annotated pixels, but none of this node's {len(images)} "
                "training images has any; give this node another sampler (e.g. 'random')"
            )
        # all the node's images (views, no copy); tiles come from the annotated rows only
        self.images, self.labels = _to_tensors(images, labels)
        self.rows = torch.from_numpy(annotated)
        pixels, object_sizes, image_objects = [], [], []
        for i in annotated:
            objects, n = ndimage.label(np.asarray(labels[i]) > 0, structure=np.ones((3, 3)))
            flat = objects.ravel()
            fg = np.flatnonzero(flat)
            pixels.append(fg[np.argsort(flat[fg], kind="stable")])  # grouped by object
            object_sizes.append(np.bincount(flat[fg], minlength=n + 1)[1:])
            image_objects.append(n)
        self.pixels = torch.from_numpy(np.concatenate(pixels))  # flat y * W + x, by object
        sizes = np.concatenate(object_sizes)
        self.object_size = torch.from_numpy(sizes)
        self.object_start = torch.from_numpy(np.cumsum(sizes) - sizes)
        counts = np.asarray(image_objects)
        self.image_objects = torch.from_numpy(counts)
        self.image_first_object = torch.from_numpy(np.cumsum(counts) - counts)

    @property
    def num_images(self) -> int:
        return len(self.rows)  # the annotated images only

    def __call__(
        self, batch_size: int, tile_size: int, generator: torch.Generator,
        idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, (_, _, h, w) = len(self.rows), self.images.shape
        tile_size = min(tile_size, h, w)
        if idx is None:
            idx = torch.randint(n, (batch_size,), generator=generator)  # among the annotated images
        batch_size = len(idx)
        u = torch.rand(4, batch_size, generator=generator, dtype=torch.float64)

        def pick(count: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
            return torch.minimum((uniform * count).long(), count - 1)

        obj = self.image_first_object[idx] + pick(self.image_objects[idx], u[0])
        pixel = self.pixels[self.object_start[obj] + pick(self.object_size[obj], u[1])]
        py, px = pixel // w, pixel % w
        ys = (py - (u[2] * tile_size).long()).clamp(0, h - tile_size)
        xs = (px - (u[3] * tile_size).long()).clamp(0, w - tile_size)
        return _crop(self.images, self.labels, self.rows[idx], ys, xs, tile_size)


SAMPLERS: dict[str, Part] = {
    "random": Part(RandomTileSampler),
    "positive": Part(PositiveTileSampler, tasks=("segmentation",)),  # tiles with annotation
}
