"""Synthetic H&E-like colon histology tiles (GlaS-like) with instance masks.

Tissue is rendered in optical-density space (Beer-Lambert law): every pixel carries a haematoxylin
and an eosin concentration, and the RGB intensity is ``255 * brightness * exp(-(cH vH + cE vE))``.
Stain, scanner and focus differences between hospitals are an :class:`Appearance` applied on top
of one shared geometry, so two sites can see the same tissue through different eyes.

Objects (both kinds are separate instances in the mask, and never touch each other):

- glands: irregular blobs with a pale lumen, a purplish cytoplasm ring and a band of dark,
  radially elongated epithelial nuclei at the basal rim; the whole gland (rim and lumen) is the
  object;
- nuclei: small, dark, isolated haematoxylin ellipses in the stroma.

The background is eosin-stained stroma with a smooth density texture, faint fibres and paler
loose areas, and no unlabelled dark structure, so that segmentation stays learnable by a small CNN.
About 7% of tiles hold no object and objects cover about 19% of all pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

# Optical-density vectors of haematoxylin and eosin: the reference H&E stain matrix of Macenko
# et al. (2009), used by most stain-normalisation tools. Ruifrok & Johnston's eosin
# (0.07, 0.99, 0.11) absorbs almost no blue and renders stroma magenta rather than pink.
_H_OD = np.array([0.5626, 0.7201, 0.4062])
_E_OD = np.array([0.2159, 0.8012, 0.5581])
_H_OD, _E_OD = _H_OD / np.linalg.norm(_H_OD), _E_OD / np.linalg.norm(_E_OD)

# Share of tiles forced to pure stroma, on top of those whose random gland and nucleus counts
# both come out zero (under 1%): about 6-7% of tiles have no object.
_P_EMPTY = 0.06
# Weights of 0..4 glands per tile, skewed to more glands: foreground is about 19% of pixels.
_GLAND_COUNT_WEIGHTS = np.array([0.05, 0.10, 0.20, 0.30, 0.35])
_MAX_NUCLEI = 6
_PLACEMENT_TRIES = 60
_MARGIN = 2  # px of stroma kept between any two objects


@dataclass(frozen=True)
class Appearance:
    """How one hospital's scanner/stain renders tissue."""

    stain_rotation: float = 0.0  # radians; hue rotation of both stain OD vectors (_stain_vectors)
    stain_strength: float = 1.0  # multiplies stain concentrations (pale vs dark staining)
    blur_sigma: float = 0.0  # gaussian blur in px (focus/scanner optics)
    noise_std: float = 0.0  # additive gaussian noise on 0..255 intensities (sensor noise)
    brightness: float = 1.0  # multiplies the illuminant


def generate(
    num_images: int, size: int, seed: int, appearance: Appearance = Appearance()
) -> tuple[np.ndarray, np.ndarray]:
    """Returns images uint8 (N, size, size, 3) and instance masks int32 (N, size, size):
    0 background, 1..K objects, labels unique per image.

    Geometry, tissue texture and sensor noise come from independent streams of ``seed``, so the
    appearance changes the pixels but never the masks.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size!r}")
    geometry_rng, texture_rng, sensor_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    masks = np.zeros((num_images, size, size), dtype=np.int32)
    conc_h, conc_e = _stroma(num_images, size, texture_rng)
    for i in range(num_images):
        _place_objects(masks[i], conc_h[i], conc_e[i], geometry_rng, texture_rng)
    return _render(conc_h, conc_e, appearance, sensor_rng), masks


def _smooth_noise(
    rng: np.random.Generator, n: int, size: int, sigma_along: float, sigma_across: float
) -> np.ndarray:
    """Unit-variance periodic gaussian-filtered noise, (n, size, size) float32.

    Filtered in the Fourier domain, so wide kernels cost nothing and an anisotropic kernel
    (fibres) can take a random orientation per tile.
    """
    noise = rng.standard_normal((n, size, size), dtype=np.float32)
    angle = rng.uniform(0, np.pi, (n, 1, 1)).astype(np.float32)
    fy = fft.fftfreq(size).astype(np.float32)[None, :, None]
    fx = fft.rfftfreq(size).astype(np.float32)[None, None, :]
    f_along = fx * np.cos(angle) + fy * np.sin(angle)
    f_across = -fx * np.sin(angle) + fy * np.cos(angle)
    gain = np.exp(-2 * np.pi**2 * ((sigma_along * f_along) ** 2 + (sigma_across * f_across) ** 2))
    field = fft.irfft2(fft.rfft2(noise) * gain, s=(size, size))
    return field / (field.std(axis=(1, 2), keepdims=True) + 1e-6)


def _stroma(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Concentration maps of eosin-rich stroma: smooth density, faint fibres, paler loose areas."""
    s = size / 128
    density = _smooth_noise(rng, n, size, 9 * s, 9 * s)
    fibres = _smooth_noise(rng, n, size, 6 * s, 0.8 * s)
    grain = rng.standard_normal((n, size, size), dtype=np.float32)
    level = rng.uniform(0.45, 0.65, (n, 1, 1)).astype(np.float32)  # section thickness per tile
    # Loose tissue: paler (never white, which would mimic a lumen) where the density peaks.
    loose = 1 + 1.2 * np.clip(density - 1.2, 0, None)
    conc_e = level * (1 + 0.12 * density + 0.10 * fibres + 0.06 * grain) / loose
    conc_h = 0.05 + 0.015 * density + 0.01 * grain
    return np.clip(conc_h, 0, None), np.clip(conc_e, 0.02, None)


def _place_objects(
    mask: np.ndarray,
    conc_h: np.ndarray,
    conc_e: np.ndarray,
    rng: np.random.Generator,
    texture_rng: np.random.Generator,
) -> None:
    """Draws glands then nuclei, each at the first random position that leaves at least _MARGIN
    px of stroma to every placed object (the object is skipped after _PLACEMENT_TRIES misses).

    Writes labels into ``mask`` and stains into the concentration maps, in place.
    """
    size = mask.shape[0]
    empty = rng.random() < _P_EMPTY
    n_glands = 0 if empty else rng.choice(len(_GLAND_COUNT_WEIGHTS), p=_GLAND_COUNT_WEIGHTS)
    n_nuclei = 0 if empty else rng.integers(0, _MAX_NUCLEI + 1)
    # Placed objects, in a frame padded by _MARGIN so that grown windows never leave it.
    occupied = np.zeros((size + 2 * _MARGIN, size + 2 * _MARGIN), dtype=bool)
    label = 0
    # Largest first: big glands find room more often in an emptier tile.
    glands = sorted((_gland_shape(size, rng) for _ in range(n_glands)), key=lambda g: -g["radius"])
    nuclei = [_nucleus_shape(size, rng) for _ in range(n_nuclei)]
    for shape in glands + nuclei:
        inside, u, theta = _rasterise(shape)
        u, theta = u[inside], theta[inside]  # the stainers only shade the object
        reach = inside.shape[0] // 2
        body = np.pad(inside, _MARGIN)  # the object in its grown window
        # The object grown by a (2 _MARGIN + 1)^2 square: must not meet any placed object.
        grown = body
        for axis in (0, 1):
            grown = ndimage.maximum_filter1d(grown, 2 * _MARGIN + 1, axis=axis)
        for cy, cx in rng.integers(reach, size - reach, (_PLACEMENT_TRIES, 2)):
            # The window in tile coordinates is the grown window in ``occupied`` coordinates.
            padded = (
                slice(cy - reach, cy + reach + 1 + 2 * _MARGIN),
                slice(cx - reach, cx + reach + 1 + 2 * _MARGIN),
            )
            # The centre test is a cheap early rejection: every object contains its centre.
            if occupied[cy + _MARGIN, cx + _MARGIN] or (occupied[padded] & grown).any():
                continue
            window = (slice(cy - reach, cy + reach + 1), slice(cx - reach, cx + reach + 1))
            label += 1
            occupied[padded] |= body
            mask[window][inside] = label
            stain = _gland_stain if "lumen" in shape else _nucleus_stain
            conc_h[window][inside], conc_e[window][inside] = stain(u, theta, shape, texture_rng)
            break


def _gland_shape(size: int, rng: np.random.Generator) -> dict:
    """An ellipse with a smoothly perturbed radius; area-uniform mean radius in size/12..size/5."""
    radius = size * np.sqrt(rng.uniform(1 / 12**2, 1 / 5**2))
    harmonics = np.arange(2, 6)
    beads = max(6, int(round(2 * np.pi * radius / (4.0 * size / 128))))  # a nucleus every 4 px
    band = rng.uniform(0.18, 0.28)
    return {
        "radius": radius,
        "aspect": rng.uniform(0.6, 1.0),
        "angle": rng.uniform(0, np.pi),
        "harmonics": harmonics,
        "amplitudes": rng.uniform(0, 0.16, harmonics.size) / harmonics * 2,
        "phases": rng.uniform(0, 2 * np.pi, harmonics.size),
        "lumen": rng.uniform(0.3, 0.55),
        "lumen_phase": rng.uniform(0, 2 * np.pi),
        # epithelial nuclei, one per angular slot: radial centre, half-length, width, darkness
        "bead_phase": rng.uniform(0, 1),
        "bead_centre": (1 - band * rng.uniform(0.35, 0.6, beads)).astype(np.float32),
        "bead_length": (band * rng.uniform(0.3, 0.5, beads)).astype(np.float32),
        "bead_width": rng.uniform(0.3, 0.42, beads).astype(np.float32),
        "bead_darkness": rng.uniform(0.8, 1.3, beads).astype(np.float32),
    }


def _nucleus_shape(size: int, rng: np.random.Generator) -> dict:
    """A small ellipse, radius ~2-4 px at size 128, scaled with the tile size."""
    return {
        "radius": max(1.2, rng.uniform(2.0, 4.0) * size / 128),
        "aspect": rng.uniform(0.55, 1.0),
        "angle": rng.uniform(0, np.pi),
        "harmonics": np.arange(2, 3),
        "amplitudes": rng.uniform(0, 0.08, 1),
        "phases": rng.uniform(0, 2 * np.pi, 1),
    }


def _rasterise(shape: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The object's pixels in a (2 reach + 1)^2 window centred on it, plus the normalised radius
    ``u`` (1 on the outline) and polar angle of every window pixel, which the stainers shade from.
    In float32, whose cosine is several times faster: this is most of the generator's time.

    The window fits in the tile for size >= 16: the major semi-axis is at most 0.26 size and the
    harmonics add at most 41% to it.
    """
    a = float(shape["radius"] / np.sqrt(shape["aspect"]))
    b = float(shape["radius"] * np.sqrt(shape["aspect"]))
    reach = int(np.ceil(a * (1 + shape["amplitudes"].sum()))) + 1
    offsets = np.arange(-reach, reach + 1, dtype=np.float32)
    dy, dx = offsets[:, None], offsets[None, :]
    cos, sin = float(np.cos(shape["angle"])), float(np.sin(shape["angle"]))
    x = (dx * cos + dy * sin) / a
    y = (-dx * sin + dy * cos) / b
    theta = np.arctan2(y, x)
    outline = np.ones_like(theta)
    for k, amplitude, phase in zip(
        shape["harmonics"], shape["amplitudes"], shape["phases"], strict=True
    ):
        outline += float(amplitude) * np.cos(int(k) * theta + float(phase))
    u = np.sqrt(x * x + y * y) / outline
    return u <= 1, u, theta


def _gland_stain(u, theta, shape, rng) -> tuple[np.ndarray, np.ndarray]:
    """Pale lumen, purplish cytoplasm, and radially elongated nuclei at the basal rim, one per
    angular slot with its own position, length, width and darkness."""
    grain = rng.standard_normal(u.shape, dtype=np.float32)
    lumen_edge = shape["lumen"] * (1 + 0.1 * np.cos(3 * theta + shape["lumen_phase"]))
    cytoplasm = u > lumen_edge
    beads = len(shape["bead_centre"])
    slot = (theta + np.pi) / (2 * np.pi) * beads + shape["bead_phase"]
    k = np.floor(slot).astype(int) % beads
    across = np.exp(-((((slot % 1) - 0.5) / shape["bead_width"][k]) ** 2))
    along = np.exp(-(((u - shape["bead_centre"][k]) / shape["bead_length"][k]) ** 2))
    nuclei = shape["bead_darkness"][k] * np.clip(1.5 * across * along, 0, 1)
    h = np.where(cytoplasm, 0.25 + 0.05 * grain, 0.03) + nuclei * (1.0 + 0.12 * grain)
    e = np.where(cytoplasm, 0.32 + 0.06 * grain, 0.08 + 0.02 * grain)
    return np.clip(h, 0, None), np.clip(e, 0.02, None)


def _nucleus_stain(u, theta, shape, rng) -> tuple[np.ndarray, np.ndarray]:
    """Dense chromatin, slightly darker towards the membrane."""
    grain = rng.standard_normal(u.shape, dtype=np.float32)
    h = 1.1 + 0.25 * np.clip(u, 0, 1) + 0.15 * grain
    return np.clip(h, 0, None), np.full(u.shape, 0.25)


def _stain_vectors(rotation: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotates both OD vectors by ``rotation`` around the grey axis (1, 1, 1) / sqrt(3).

    This is a hue rotation: each stain keeps its grey component, i.e. its overall darkness, and
    only its colour shifts. Components that would go negative (light emitted rather than
    absorbed) are clipped to 0 and the vector re-normalised.
    """
    k = np.ones(3) / np.sqrt(3)
    cos, sin = np.cos(rotation), np.sin(rotation)

    def rotate(v: np.ndarray) -> np.ndarray:
        w = v * cos + np.cross(k, v) * sin + k * (k @ v) * (1 - cos)  # Rodrigues' formula
        w = np.clip(w, 0, None)
        return w / np.linalg.norm(w)

    return rotate(_H_OD), rotate(_E_OD)


def _render(conc_h, conc_e, appearance: Appearance, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert rendering, then the scanner: blur, sensor noise, 8-bit quantisation."""
    v_h, v_e = (v.astype(np.float32) for v in _stain_vectors(appearance.stain_rotation))
    image = conc_h[..., None] * v_h
    image += conc_e[..., None] * v_e
    image *= -appearance.stain_strength
    np.exp(image, out=image)
    image *= 255 * appearance.brightness
    if appearance.blur_sigma > 0:
        sigma = appearance.blur_sigma
        image = ndimage.gaussian_filter(image, (0, sigma, sigma, 0))
    if appearance.noise_std > 0:
        image += rng.normal(0, appearance.noise_std, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
