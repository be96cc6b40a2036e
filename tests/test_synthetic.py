"""The synthetic H&E generator: reproducible, appearance-only site shifts, learnable content."""

import numpy as np
import pytest
from scipy import ndimage

from snowfed.data.synthetic import Appearance, generate

SITE_B = Appearance(
    stain_rotation=0.3, stain_strength=1.3, blur_sigma=1.0, noise_std=5.0, brightness=0.9
)


@pytest.fixture(scope="module")
def tiles():
    return generate(60, 128, seed=11)


def test_shapes_dtypes_and_labels(tiles):
    images, masks = tiles
    assert images.shape == (60, 128, 128, 3) and images.dtype == np.uint8
    assert masks.shape == (60, 128, 128) and masks.dtype == np.int32
    for mask in masks:
        labels = np.unique(mask)
        assert labels[0] == 0 or labels.size == 0
        np.testing.assert_array_equal(labels[labels > 0], np.arange(1, labels.max() + 1))


def test_same_seed_is_bit_identical_and_seeds_differ():
    a_img, a_mask = generate(8, 64, seed=3, appearance=SITE_B)
    b_img, b_mask = generate(8, 64, seed=3, appearance=SITE_B)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    c_img, c_mask = generate(8, 64, seed=4, appearance=SITE_B)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_mask, c_mask)


def test_appearance_changes_pixels_not_geometry():
    plain_img, plain_mask = generate(10, 96, seed=5)
    site_img, site_mask = generate(10, 96, seed=5, appearance=SITE_B)
    np.testing.assert_array_equal(plain_mask, site_mask)
    assert np.abs(plain_img.astype(int) - site_img).mean() > 5


def _mean_colour(images):
    return images.reshape(-1, 3).mean(axis=0)


def test_each_appearance_knob_acts_as_documented():
    base_img, _ = generate(6, 96, seed=8)
    base = _mean_colour(base_img)

    rotated = _mean_colour(generate(6, 96, seed=8, appearance=Appearance(stain_rotation=0.3))[0])
    assert np.abs(rotated - base).max() > 8  # a hue shift: the colour moves...
    assert abs(rotated.mean() - base.mean()) < 0.5 * np.abs(rotated - base).max()  # ...not grey

    darker = _mean_colour(generate(6, 96, seed=8, appearance=Appearance(brightness=0.8))[0])
    np.testing.assert_allclose(darker / base, 0.8, atol=0.01)

    heavy = _mean_colour(generate(6, 96, seed=8, appearance=Appearance(stain_strength=1.5))[0])
    assert np.all(heavy < base - 5)

    blurred, _ = generate(6, 96, seed=8, appearance=Appearance(blur_sigma=1.5))
    sharpness = [np.abs(np.diff(x.astype(float), axis=1)).mean() for x in (base_img, blurred)]
    assert sharpness[1] < 0.6 * sharpness[0]

    noisy, _ = generate(6, 96, seed=8, appearance=Appearance(noise_std=6.0))
    residual = noisy.astype(float) - base_img
    assert abs(residual.std() - 6.0) < 0.5 and abs(residual.mean()) < 0.5


def test_looks_like_he(tiles):
    """Pink stroma (eosin absorbs green most); labelled tissue, haematoxylin-rich, absorbs red
    too: it is darker and bluer, even with the white gland lumens counted in."""
    images, masks = tiles
    stroma = images[masks == 0].astype(float).mean(axis=0)
    tissue = images[masks > 0].astype(float).mean(axis=0)
    assert stroma[0] > stroma[2] > stroma[1]
    assert tissue[0] < stroma[0] - 20
    assert tissue.sum() < stroma.sum() - 30
    assert tissue[2] - tissue[0] > stroma[2] - stroma[0] + 10


def test_foreground_fraction_and_empty_tiles(tiles):
    _, masks = tiles
    assert 0.15 <= (masks > 0).mean() <= 0.35
    empty = (masks.max(axis=(1, 2)) == 0).sum()
    assert 1 <= empty <= 0.2 * len(masks)


def test_objects_are_connected_and_never_touch(tiles):
    _, masks = tiles
    eight = np.ones((3, 3))
    for mask in masks:
        for label, box in enumerate(ndimage.find_objects(mask), 1):
            assert ndimage.label(mask[box] == label, structure=eight)[1] == 1
        # Touching objects would merge into one component of the foreground.
        assert ndimage.label(mask > 0, structure=eight)[1] == mask.max()


def test_glands_and_nuclei_both_occur(tiles):
    _, masks = tiles
    areas = np.concatenate([np.bincount(m.ravel())[1:] for m in masks])
    assert (areas < 60).sum() > 50  # nuclei, radius 2-4 px
    assert (areas > 400).sum() > 50  # glands, radius 128/12 .. 128/5 px


@pytest.mark.parametrize("size", [16, 256])
def test_other_sizes(size):
    images, masks = generate(4, size, seed=1)
    assert images.shape == (4, size, size, 3) and masks.shape == (4, size, size)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="size"):
        generate(2, 8, seed=0)
    with pytest.raises(ValueError, match="num_images"):
        generate(-1, 64, seed=0)
