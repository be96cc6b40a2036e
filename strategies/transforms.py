"""Label transforms: what a strategy does to each sampled tile's mask before the loss sees it.

A transform is `(labels NHW int64, generator) -> labels`, applied to the whole batch on the
training device (torch ops only). Random choices are drawn from the trainer's torch.Generator,
one per tile, on the generator's device, so a round stays reproducible from its seed. The
transforms work on binary masks (0 background, 1 annotated), the project's segmentation task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .parts import Param, Part, integer, number

LabelTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def keep() -> LabelTransform:
    """The mask as annotated."""
    return lambda labels, generator: labels


def disk(radius: int) -> torch.Tensor:
    """skimage.morphology.disk(radius) as a float conv kernel (1, 1, 2r+1, 2r+1)."""
    r = torch.arange(-radius, radius + 1)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]


def dilate_erode(radius: int) -> LabelTransform:
    """SNOW's label augmentation: per tile, the mask as is, dilated or eroded by a disk, 1/3 each.

    SNOW precomputed the ±disk(5) masks on whole images; here tiles are transformed after
    cropping, and replicate padding stands in for the unseen surroundings, so an object cut by
    the tile border is not eroded from that border. Dilation (count of foreground pixels under
    the disk > 0) contains the mask and erosion (count = disk area) is contained in it.
    """

    def transform(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, device = len(labels), generator.device
        variant = torch.randint(3, (n,), generator=generator, device=device).to(labels.device)
        kernel = disk(radius).to(labels.device)
        fg = (labels > 0).float().unsqueeze(1)
        count = F.conv2d(F.pad(fg, (radius,) * 4, mode="replicate"), kernel).squeeze(1)
        dilated, eroded = count > 0.5, count > kernel.sum() - 0.5
        variant = variant[:, None, None]
        out = torch.where(variant == 1, dilated, torch.where(variant == 2, eroded, labels > 0))
        return out.long()

    return transform


def noisy_negatives(p: float) -> LabelTransform:
    """SNOW's Noisy SoftWeak uncertainty: a tile with no annotated pixel becomes fully annotated
    (mask all 1, so its tile label is 1 whenever the tile has >= threshold pixels) with
    probability p, as in the reference code: an empty tile may be a missed annotation."""

    def transform(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flip = torch.rand(len(labels), generator=generator, device=generator.device) < p
        empty = ~(labels > 0).flatten(1).any(dim=1)
        flip = (flip.to(labels.device) & empty)[:, None, None]
        return torch.where(flip, torch.ones_like(labels), labels)

    return transform


LABEL_TRANSFORMS: dict[str, Part] = {
    "none": Part(keep),
    "dilate_erode": Part(dilate_erode, {"radius": Param(5, integer(0))}, tasks=("segmentation",)),
    "noisy_negatives": Part(noisy_negatives, {"p": Param(0.5, number(0.0, 1.0))},
                            tasks=("segmentation",)),
}
