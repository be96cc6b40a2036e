"""The histo augmentation: image and mask move together, values stay valid, runs are
reproducible, each geometric op moves pixels, the Fourier field is smooth, the stain jitter
acts on colour only, bad parameters name their key, and the augment config trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from snowfed.client.trainer import train_locally
from snowfed.config import ConfigError, load_group_option
from snowfed.models import build_model
from snowfed.strategies import LocalStrategy, StrategySpec
from snowfed.strategies.augment import AUGMENTATIONS, fourier_field, stain_jitter

OFF = {f"{op}_p": 0.0 for op in ("flip", "rot90", "elastic", "fourier", "gamma", "hsv", "stain",
                                 "blur", "noise")}


def make(**params):
    part = AUGMENTATIONS["histo"]
    return part.build(**part.resolve({**OFF, **params}, "strategy.augmentation_params"))


def blobs(n: int = 6, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Binary masks (N, H, W) of a few random discs each, asymmetric so every move shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=np.int64)
    for mask in masks:
        for _ in range(3):
            cy, cx, r = rng.uniform(6, size - 6), rng.uniform(6, size - 6), rng.uniform(3, 8)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = 1
    return torch.from_numpy(masks)


def tissue(n: int = 6, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A pinkish image with darker objects where the mask is 1."""
    y = blobs(n, size)
    base = torch.tensor([0.85, 0.6, 0.75])[None, :, None, None]
    x = base * (1 - 0.5 * y[:, None].float()) + 0.02 * torch.rand(n, 3, size, size,
                                                                  generator=torch.Generator().manual_seed(1))
    return x.clamp(0, 1), y


GEOMETRIC = {
    "flip": {"flip_p": 1.0},
    "rot90": {"rot90_p": 1.0},
    "elastic": {"elastic_p": 1.0, "elastic_alpha": 4.0, "elastic_sigma": 3.0},
    "fourier": {"fourier_p": 1.0, "fourier_alpha": 4.0, "fourier_freqs": 3},
}


@pytest.mark.parametrize("op", GEOMETRIC)
def test_geometric_ops_move_image_and_mask_together(op):
    y = blobs()
    x = y[:, None].float().expand(-1, 3, -1, -1).contiguous()  # every channel is the mask
    ax, ay = make(**GEOMETRIC[op])(x, y, torch.Generator().manual_seed(3))
    assert not torch.equal(ay, y)  # the op moved something
    agree = ((ax[:, 0] > 0.5) == (ay == 1)).float().mean()
    if op in ("flip", "rot90"):
        assert torch.equal(ax[:, 0], ay.float())  # exact
    else:
        assert agree > 0.98
    assert ay.dtype == torch.long and set(ay.unique().tolist()) <= {0, 1}


def test_everything_on_keeps_shapes_types_and_ranges():
    x, y = tissue()
    params = {k: 1.0 for k in OFF} | {"gamma": 0.5, "hue": 0.1, "stain_scale": 0.3, "noise_std": 0.2}
    ax, ay = make(**params)(x, y, torch.Generator().manual_seed(0))
    assert ax.shape == x.shape and ay.shape == y.shape and ax.dtype == x.dtype
    assert ay.dtype == torch.long and set(ay.unique().tolist()) <= {0, 1}
    assert torch.isfinite(ax).all() and ax.min() >= 0 and ax.max() <= 1


def test_same_seed_same_batch_other_seed_another():
    x, y = tissue()
    augment = make(**{k: 0.7 for k in OFF})
    a, b, c = (augment(x, y, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_fourier_field_has_no_energy_above_its_frequencies():
    field = fourier_field(4, 48, 48, 3, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(field.pow(2).mean(dim=(1, 2, 3)), torch.ones(4))  # unit RMS
    power = torch.fft.fft2(field).abs().pow(2)
    k = torch.fft.fftfreq(48) * 48
    high = (k.abs()[:, None] > 3) | (k.abs()[None, :] > 3)
    assert power[..., high].sum() / power.sum() < 1e-10
    step = (field[..., 1:, :] - field[..., :-1, :]).abs().max()
    assert step < 1.0  # neighbouring pixels move alike: smooth, not noise


def test_stain_jitter_is_the_identity_at_zero_and_changes_colour_otherwise():
    x, y = tissue()
    n = len(x)
    same = stain_jitter(x, torch.ones(n, 2), torch.zeros(n, 2))
    assert (same - x).abs().max() < 1e-4
    ax, ay = make(stain_p=1.0, stain_scale=0.3, stain_shift=0.1)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(ay, y)
    assert (ax - x).abs().mean() > 0.01
    assert not torch.allclose(ax.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-3)  # colour moved


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"gamma": -0.1}, "strategy.augmentation_params.gamma"),
        ({"flip_p": 1.5}, "strategy.augmentation_params.flip_p"),
        ({"elastic_sigma": 0}, "strategy.augmentation_params.elastic_sigma"),
        ({"fourier_freqs": 0.5}, "strategy.augmentation_params.fourier_freqs"),
        ({"warp": 1}, "strategy.augmentation_params.warp"),
    ],
)
def test_bad_parameters_name_their_key(params, key):
    base = {**OmegaConf.to_container(load_group_option("strategy", "augment", "strategy"))}
    base["augmentation_params"] = {**base["augmentation_params"], **params}
    with pytest.raises(ConfigError) as err:
        StrategySpec.from_config(base)
    assert err.value.key == key


def test_unknown_augmentation_is_refused_and_old_specs_default_to_none():
    cfg = {**OmegaConf.to_container(load_group_option("strategy", "baseline", "strategy"))}
    assert StrategySpec.from_config(cfg).augmentation == "none"
    with pytest.raises(ConfigError) as err:
        StrategySpec.from_config({**cfg, "augmentation": "mixup"})
    assert err.value.key == "strategy.augmentation"


def test_augment_config_builds_and_trains():
    cfg = {**OmegaConf.to_container(load_group_option("strategy", "augment", "strategy")),
           "local_steps": 3, "batch_size": 4, "tile_size": 32}
    spec = StrategySpec.from_config(cfg)
    assert spec.augmentation == "histo" and spec.augmentation_params["gamma"] == 0.2
    x, y = tissue(4, 40)
    images = (x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    strategy = LocalStrategy.build(spec, images, y.numpy())
    gen = torch.Generator().manual_seed(0)
    bx, by = strategy.batch(gen)
    assert bx.shape == (4, 3, 32, 32) and by.shape == (4, 32, 32) and by.dtype == torch.long
    stats = train_locally(build_model("shortres", num_classes=2, width=8), strategy, gen)
    assert stats.steps == 3 and math.isfinite(stats.last_loss)
