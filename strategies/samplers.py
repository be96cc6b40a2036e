"""Tile samplers: how a node draws training tiles from its images.

A sampler is built once per node on its training arrays and called every step; it returns a
batch as tensors (images float in [0, 1], NCHW; labels int64, NHW).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class RandomTileSampler:
    """Uniformly random images and tile positions (SNOW's baseline sampling)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) == 0:
            raise ValueError("a node needs at least one training image")
        # One contiguous tensor copy per node, made once and reused across rounds.
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels)).long()

    def __call__(
        self, batch_size: int, tile_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = self.images.shape
        tile_size = min(tile_size, h, w)
        idx = torch.randint(n, (batch_size,), generator=generator)
        ys = torch.randint(h - tile_size + 1, (batch_size,), generator=generator)
        xs = torch.randint(w - tile_size + 1, (batch_size,), generator=generator)
        x = torch.stack(
            [self.images[i, :, y : y + tile_size, c : c + tile_size] for i, y, c in zip(idx, ys, xs)]
        )
        t = torch.stack(
            [self.labels[i, y : y + tile_size, c : c + tile_size] for i, y, c in zip(idx, ys, xs)]
        )
        return x.float().div_(255.0), t


SAMPLERS: dict[str, Callable[[np.ndarray, np.ndarray], RandomTileSampler]] = {
    "random": RandomTileSampler,
}
