"""Data augmentations: what a strategy does to each sampled batch (image and mask) before the loss.

An augmentation is `(images NCHW float in [0, 1], labels NHW int64, generator) -> (images, labels)`
applied to the whole batch on the training device. Every random number is drawn from the
trainer's torch.Generator on its own device (the CPU) and then moved to the batch's device, so a
round is reproducible from its seed wherever it trains. Each op picks its own tiles (probability
`<op>_p`) and its own parameters per tile. Geometric ops move the image and the mask with the
same parameters (the mask by nearest neighbour, so label values stay as they were); photometric
ops touch the image only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from snowfed.data.synthetic import _E_OD, _H_OD

from .parts import Param, Part, integer, number

Augmentation = Callable[
    [torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]
]

# Colour-deconvolution stain matrix (OD per unit of haematoxylin, eosin): the synthetic data's own.
_STAINS = torch.from_numpy(np.stack([_H_OD, _E_OD], axis=1)).float()  # (3, 2)
_MIN_INTENSITY = 1e-3  # keeps OD = -log(I) finite on black pixels


def keep() -> Augmentation:
    """The batch as sampled."""
    return lambda x, y, generator: (x, y)


def _rand(generator: torch.Generator, device, *shape: int) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device, then moved to the batch's."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn(generator: torch.Generator, device, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _uniform(generator, device, n: int, half_width: float) -> torch.Tensor:
    """n draws from U[-half_width, half_width)."""
    return (2 * _rand(generator, device, n) - 1) * half_width


def _pick(p: float, n: int, generator, device, x: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """Per tile, `changed` with probability p, else `x` (leading dimension = tile)."""
    chosen = _rand(generator, device, n) < p
    return torch.where(chosen.view(-1, *([1] * (x.dim() - 1))), changed, x)


def _rms_normalise(field: torch.Tensor) -> torch.Tensor:
    """Per tile, scale a displacement field (N, 2, H, W) to unit RMS, so alpha reads in pixels."""
    rms = field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return field / rms.clamp_min(1e-12)


def elastic_field(n: int, h: int, w: int, sigma: float, generator, device) -> torch.Tensor:
    """Smooth random displacement (N, 2, H, W), unit RMS: white noise blurred by a Gaussian."""
    import kornia  # where used: ~0.5 s to import, which every Ray actor would pay at start-up

    noise = _randn(generator, device, n, 2, h, w)
    size = 2 * math.ceil(3 * sigma) + 1
    blurred = kornia.filters.gaussian_blur2d(noise, (size, size), (sigma, sigma), border_type="reflect")
    return _rms_normalise(blurred)


def fourier_field(n: int, h: int, w: int, freqs: int, generator, device) -> torch.Tensor:
    """Smooth random displacement (N, 2, H, W), unit RMS, drawn in the Fourier domain.

    Random complex coefficients on the frequencies |k_y|, |k_x| <= freqs (cycles per tile, cut to
    what the tile can hold), zero elsewhere; the real part of the inverse FFT is the field, so it
    has no energy above `freqs` however large the tile: a few global, periodic waves of the tissue.
    """
    ky, kx = min(freqs, (h - 1) // 2), min(freqs, (w - 1) // 2)
    coef = torch.complex(*_randn(generator, device, 2, n, 2, 2 * ky + 1, 2 * kx + 1))
    coef[..., ky, kx] = 0  # no constant shift: that is a translation, not a distortion
    spectrum = torch.zeros(n, 2, h, w, dtype=coef.dtype, device=device)
    rows = torch.arange(-ky, ky + 1, device=device) % h
    cols = torch.arange(-kx, kx + 1, device=device) % w
    spectrum[:, :, rows[:, None], cols[None, :]] = coef
    return _rms_normalise(torch.fft.ifft2(spectrum).real)


def warp(x: torch.Tensor, y: torch.Tensor, field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move image and mask by the same displacement (pixels): bilinear image, nearest mask.

    Reflection padding on both, so what comes in at the border is the same for image and mask.
    """
    n, _, h, w = x.shape
    identity = torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(n, 2, 3)
    grid = F.affine_grid(identity, [n, 1, h, w], align_corners=False)
    scale = torch.tensor([2.0 / w, 2.0 / h], device=x.device, dtype=x.dtype)
    grid = grid + field.permute(0, 2, 3, 1) * scale  # pixels -> normalised (x, y) offsets
    kw = {"align_corners": False, "padding_mode": "reflection"}
    image = F.grid_sample(x, grid, mode="bilinear", **kw)
    mask = F.grid_sample(y[:, None].to(x.dtype), grid, mode="nearest", **kw)
    return image, mask[:, 0].round().long()


def stain_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Colour deconvolution: OD = -log(I) projected on the H and E vectors (least squares); each
    tile's stain concentrations c become c * scale + shift (scale, shift: (N, 2)); the residual off
    the stain plane is kept, so scale 1 and shift 0 give the image back."""
    stains = _STAINS.to(x.device, x.dtype)
    od = -x.clamp_min(_MIN_INTENSITY).log().movedim(1, -1)  # (N, H, W, 3)
    conc = od @ torch.linalg.pinv(stains).T  # (N, H, W, 2)
    residual = od - conc @ stains.T
    conc = conc * scale[:, None, None] + shift[:, None, None]
    return torch.exp(-(conc @ stains.T + residual)).movedim(-1, 1)


def histo(
    flip_p: float,
    rot90_p: float,
    elastic_p: float,
    elastic_alpha: float,
    elastic_sigma: float,
    fourier_p: float,
    fourier_alpha: float,
    fourier_freqs: int,
    gamma_p: float,
    gamma: float,
    hsv_p: float,
    hue: float,
    saturation: float,
    value: float,
    stain_p: float,
    stain_scale: float,
    stain_shift: float,
    blur_p: float,
    blur_sigma: float,
    noise_p: float,
    noise_std: float,
) -> Augmentation:
    """The talk's histology augmentations, geometric then photometric, each per tile.

    kornia and torchvision cover flips, rotations, gamma, HSV, blur and noise, but their random
    versions draw from the global RNG (not our generator); their elastic transforms scale the
    blurred noise so that alpha's meaning depends on sigma (here: RMS displacement in pixels); and
    neither has a Fourier-domain distortion or an optical-density stain jitter on our H/E vectors.
    So the randomness is drawn here and only the deterministic kernels (blur, HSV) are borrowed.
    """

    p = SimpleNamespace(**locals())  # the parameters above, for the two halves below
    import kornia  # where used: ~0.5 s to import, which every Ray actor would pay at start-up

    def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        x, y = _geometric(x, y, generator, p)
        return _photometric(x, generator, p, kornia).clamp(0, 1), y

    return augment


def _geometric(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
               p: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor]:
    """histo's flips, quarter turns, elastic and Fourier warps: image and mask together."""
    n, _, h, w = x.shape
    dev = x.device
    for dim in (-1, -2):
        chosen = _rand(generator, dev, n) < p.flip_p
        x = torch.where(chosen[:, None, None, None], x.flip(dim), x)
        y = torch.where(chosen[:, None, None], y.flip(dim), y)
    turns = torch.where(_rand(generator, dev, n) < p.rot90_p, 1 + (_rand(generator, dev, n) * 3).long(), 0)
    x0, y0 = x, y
    for k in (1, 2, 3):
        x = torch.where((turns == k)[:, None, None, None], torch.rot90(x0, k, (-2, -1)), x)
        y = torch.where((turns == k)[:, None, None], torch.rot90(y0, k, (-2, -1)), y)
    for chance, alpha, field in (
        (p.elastic_p, p.elastic_alpha, lambda: elastic_field(n, h, w, p.elastic_sigma, generator, dev)),
        (p.fourier_p, p.fourier_alpha, lambda: fourier_field(n, h, w, p.fourier_freqs, generator, dev)),
    ):
        if chance > 0 and alpha > 0:
            chosen = (_rand(generator, dev, n) < chance).to(x.dtype)
            x, y = warp(x, y, field() * alpha * chosen[:, None, None, None])
    return x, y


def _photometric(x: torch.Tensor, generator: torch.Generator, p: SimpleNamespace, kornia) -> torch.Tensor:
    """histo's gamma, HSV, stain, blur and noise: the image only."""
    n, dev = x.shape[0], x.device

    def pick(chance, before, after):
        return _pick(chance, n, generator, dev, before, after)

    g = torch.exp(_uniform(generator, dev, n, p.gamma))
    x = pick(p.gamma_p, x, x.clamp_min(0) ** g[:, None, None, None])
    hsv = kornia.color.rgb_to_hsv(x)
    hsv = torch.stack([
        (hsv[:, 0] + 2 * math.pi * _uniform(generator, dev, n, p.hue)[:, None, None]) % (2 * math.pi),
        (hsv[:, 1] * (1 + _uniform(generator, dev, n, p.saturation))[:, None, None]).clamp(0, 1),
        (hsv[:, 2] * (1 + _uniform(generator, dev, n, p.value))[:, None, None]).clamp(0, 1),
    ], dim=1)
    x = pick(p.hsv_p, x, kornia.color.hsv_to_rgb(hsv))
    scale = 1 + _uniform(generator, dev, 2 * n, p.stain_scale).view(n, 2)
    shift = _uniform(generator, dev, 2 * n, p.stain_shift).view(n, 2)
    x = pick(p.stain_p, x, stain_jitter(x, scale, shift).clamp(0, 1))
    if p.blur_p > 0 and p.blur_sigma > 0:
        sigma = (0.1 + _rand(generator, dev, n) * p.blur_sigma)[:, None].expand(n, 2)
        size = 2 * math.ceil(3 * (0.1 + p.blur_sigma)) + 1
        blurred = kornia.filters.gaussian_blur2d(x, (size, size), sigma, border_type="reflect")
        x = pick(p.blur_p, x, blurred)
    return pick(p.noise_p, x, x + p.noise_std * _randn(generator, dev, *x.shape))


AUGMENTATIONS: dict[str, Part] = {
    "none": Part(keep),
    "histo": Part(histo, {
        "flip_p": Param(0.5, number(0.0, 1.0)),
        "rot90_p": Param(0.5, number(0.0, 1.0)),
        "elastic_p": Param(0.3, number(0.0, 1.0)),
        "elastic_alpha": Param(2.0, number(0.0)),
        "elastic_sigma": Param(4.0, number(0.0, low_open=True)),
        "fourier_p": Param(0.3, number(0.0, 1.0)),
        "fourier_alpha": Param(2.0, number(0.0)),
        "fourier_freqs": Param(2, integer(1)),
        "gamma_p": Param(0.3, number(0.0, 1.0)),
        "gamma": Param(0.2, number(0.0, 2.0)),
        "hsv_p": Param(0.3, number(0.0, 1.0)),
        "hue": Param(0.02, number(0.0, 0.5)),
        "saturation": Param(0.1, number(0.0, 1.0)),
        "value": Param(0.1, number(0.0, 1.0)),
        "stain_p": Param(0.5, number(0.0, 1.0)),
        "stain_scale": Param(0.05, number(0.0, 1.0)),
        "stain_shift": Param(0.05, number(0.0, 1.0)),
        "blur_p": Param(0.2, number(0.0, 1.0)),
        "blur_sigma": Param(1.0, number(0.0)),
        "noise_p": Param(0.2, number(0.0, 1.0)),
        "noise_std": Param(0.02, number(0.0)),
    }, tasks=("segmentation",)),
}
