"""SNOW label degradation: each mechanism on its own, then the dataset statistics."""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import ellipse
from skimage.morphology import convex_hull_image, disk

from snowfed.data.synthetic import generate
from snowfed.sim.noise.masks import SnowNoise, _deform, _simplify, degrade, degrade_dataset

EIGHT = np.ones((3, 3))


def _grid(n_images, seed, cell=48, side=4, radius=(6, 12)):
    """Random ellipses, one centred in each cell of a side x side grid: objects whose degraded
    versions stay in their own cell (so each can be measured alone), with known labels."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n_images, cell * side, cell * side), dtype=np.int32)
    for image in out:
        for k in range(side * side):
            cy, cx = (k // side + 0.5) * cell, (k % side + 0.5) * cell
            a, b = rng.uniform(*radius, 2)
            rr, cc = ellipse(cy, cx, a, b, rotation=rng.uniform(0, np.pi))
            image[rr, cc] = k + 1
    return out


def _cells(mask, cell=48):
    """(n_cells, cell, cell) view of a grid image."""
    side = mask.shape[0] // cell
    return mask.reshape(side, cell, side, cell).transpose(0, 2, 1, 3).reshape(-1, cell, cell)


def _normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_neutral_noise_returns_the_clean_foreground():
    _, masks = generate(20, 96, seed=2)
    noisy, stats = degrade_dataset(masks, SnowNoise(), seed=0)
    assert noisy.dtype == np.uint8
    np.testing.assert_array_equal(noisy, (masks > 0).astype(np.uint8))
    assert stats["pixel_disagreement"] == 0 and stats["objects_removed"] == 0
    assert stats["pixel_precision"] == stats["pixel_recall"] == 1.0


def test_removal_rate_matches_p_and_removes_whole_objects():
    instances = _grid(80, seed=0)  # 1280 objects
    noisy, stats = degrade_dataset(instances, SnowNoise(p_remove=0.5), seed=1)
    n = stats["objects"]
    assert n == 1280
    assert abs(stats["objects_removed"] - 0.5) < 4 * math.sqrt(0.25 / n)
    kept = 0
    for clean, out in zip(instances, noisy, strict=True):
        assert not (out & (clean == 0)).any()
        for label in range(1, clean.max() + 1):
            present = out[clean == label]
            assert present.all() or not present.any()
            kept += present.all()
    assert kept == round((1 - stats["objects_removed"]) * n)


def test_p_one_removes_everything():
    noisy, stats = degrade_dataset(_grid(2, seed=0), SnowNoise(p_remove=1.0), seed=0)
    assert not noisy.any() and stats["objects_removed"] == 1.0
    assert stats["pixel_recall"] == 0.0 and stats["pixel_precision"] == 1.0


@pytest.mark.parametrize("r", [-5, -3, -1, 1, 2, 4, 7])
def test_deform_is_morphology_with_a_disk(r):
    rng = np.random.default_rng(r + 10)
    obj = np.zeros((50, 50), dtype=bool)
    obj[15:35, 15:35] = ndimage.binary_opening(rng.random((20, 20)) < 0.7)
    if r > 0:
        expected = ndimage.binary_dilation(obj, structure=disk(r))
        assert expected.sum() > obj.sum()
    else:
        expected = ndimage.binary_erosion(obj, structure=disk(-r), border_value=0)
        assert expected.sum() < obj.sum()
    np.testing.assert_array_equal(_deform(obj, r), expected)


def test_deform_edge_cases():
    obj = np.zeros((9, 9), dtype=bool)
    obj[3:6, 3:6] = True
    np.testing.assert_array_equal(_deform(obj, 0), obj)
    assert not _deform(obj, -2).any()  # eroded away
    full = np.ones((5, 5), dtype=bool)
    assert _deform(full, -1).sum() == 9  # outside the array is background


def test_deformation_statistics_through_degrade():
    """r = int(N(0, 3)): grows with P(r > 0) = P(Z >= 1/3), unchanged with P(r = 0)."""
    instances = _grid(80, seed=3)
    noisy, _ = degrade_dataset(instances, SnowNoise(sigma=3.0), seed=4)
    change = np.array(
        [
            np.sign(int(out.sum()) - int(clean.astype(bool).sum()))
            for image, nimage in zip(instances, noisy, strict=True)
            for clean, out in zip(_cells(image), _cells(nimage), strict=True)
        ]
    )
    p_grow = 1 - _normal_cdf(1 / 3)
    p_same = 1 - 2 * p_grow
    tol = 4 * math.sqrt(0.25 / change.size)
    assert abs((change > 0).mean() - p_grow) < tol
    assert abs((change < 0).mean() - p_grow) < tol
    assert abs((change == 0).mean() - p_same) < tol


def test_objects_eroded_away_count_as_removed():
    """Radius-2 disks vanish once eroded by a disk of radius k: P = P(N(0, sigma) <= -k)."""
    probe = np.pad(disk(2).astype(bool), 10)
    k = next(k for k in range(1, 10) if not _deform(probe, -k).any())
    assert k == 3  # disk(2) survives erosion by disk(1) and disk(2) (its centre)
    instances = np.zeros((160, 4 * 48, 4 * 48), dtype=np.int32)
    for i in range(16):
        cy, cx = (i // 4) * 48 + 24, (i % 4) * 48 + 24
        instances[:, cy - 2 : cy + 3, cx - 2 : cx + 3] = disk(2) * (i + 1)
    sigma = 4.0
    _, stats = degrade_dataset(instances, SnowNoise(sigma=sigma), seed=5)
    expected = _normal_cdf(-k / sigma)
    tol = 4 * math.sqrt(expected * (1 - expected) / stats["objects"])
    assert abs(stats["objects_removed"] - expected) < tol


def test_bounding_boxes_contain_objects_and_are_filled_rectangles():
    instances = _grid(4, seed=6)
    noisy, stats = degrade_dataset(instances, SnowNoise(bounding_box=True), seed=0)
    assert stats["pixel_recall"] == 1.0 and stats["pixel_precision"] < 0.9
    for clean, out in zip(instances, noisy, strict=True):
        components, n = ndimage.label(out, structure=EIGHT)
        assert n == clean.max()
        for rows, cols in ndimage.find_objects(components):
            assert out[rows, cols].all()
        for rows, cols in ndimage.find_objects(clean):
            box = np.zeros_like(out)
            box[rows, cols] = 1
            np.testing.assert_array_equal(box & out, box)  # the tight box is in the output
            assert components[rows, cols].max() == components[rows, cols].min() > 0


def test_bounding_boxes_are_taken_after_deformation():
    instances = _grid(6, seed=7)
    plain, _ = degrade_dataset(instances, SnowNoise(sigma=3.0), seed=8)
    boxed, _ = degrade_dataset(instances, SnowNoise(sigma=3.0, bounding_box=True), seed=8)
    for p_image, b_image in zip(plain, boxed, strict=True):
        for p_cell, b_cell in zip(_cells(p_image), _cells(b_image), strict=True):
            rows, cols = np.nonzero(p_cell)
            if rows.size:
                assert b_cell.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
            else:
                assert not b_cell.any()


def test_simplification_keeps_area_and_shape():
    _, masks = generate(30, 128, seed=9)
    ratios = []
    for mask in masks:
        for label, box in enumerate(ndimage.find_objects(mask), 1):
            obj = np.pad(mask[box] == label, 2)
            if obj.sum() < 300:  # glands only
                continue
            simple = _simplify(obj, 4)
            ratios.append(simple.sum() / obj.sum())
            hull = ndimage.binary_dilation(convex_hull_image(obj))
            assert not (simple & ~hull).any()
            assert ndimage.label(simple, structure=EIGHT)[1] == 1
    assert len(ratios) > 40
    assert 0.7 <= min(ratios) and max(ratios) <= 1.1
    assert min(ratios) < 1  # it did change something


def test_simplification_keeps_every_piece_and_tiny_objects():
    obj = np.zeros((40, 60), dtype=bool)
    obj[5:30, 5:25] = True
    obj[10:20, 40:55] = True
    obj[35, 30] = True  # a single pixel: too small to simplify
    simple = _simplify(obj, 5)
    assert ndimage.label(simple, structure=EIGHT)[1] == 3
    assert simple[35, 30]
    heavy = _simplify(obj, 400)  # fewer than 3 points left everywhere: unchanged
    np.testing.assert_array_equal(heavy, obj)


def test_heavy_simplification_coarsens_outlines():
    obj = np.pad(disk(20).astype(bool), 3)
    light, heavy = _simplify(obj, 2), _simplify(obj, 20)
    assert (light != obj).sum() < (heavy != obj).sum()
    assert heavy.sum() < obj.sum()  # a polygon inscribed in the outline


def test_binary_masks_are_split_into_connected_components():
    instances = _grid(1, seed=0)[0]
    binary = instances > 0
    rng = np.random.default_rng(0)
    out = degrade(binary, SnowNoise(p_remove=0.5), rng)
    for cell_in, cell_out in zip(_cells(binary), _cells(out), strict=True):
        assert cell_out.sum() in (0, cell_in.sum())
    assert 0 < out.sum() < binary.sum()


def test_same_seed_removes_the_same_objects_across_presets():
    instances = _grid(10, seed=1)
    presets = [
        SnowNoise(p_remove=0.5),
        SnowNoise(p_remove=0.5, sigma=4, bounding_box=True),
        SnowNoise(p_remove=0.5, simplify_every=8),
    ]
    present = []
    for noise in presets:
        noisy, _ = degrade_dataset(instances, noise, seed=3)
        present.append([cell.any() for image in noisy for cell in _cells(image)])
    assert present[0] == present[2]
    # Deformation may also erode objects away, but never brings a removed one back.
    assert all(p0 or not p1 for p0, p1 in zip(present[0], present[1], strict=True))
    assert sum(present[1]) > 0.85 * sum(present[0])


def test_deterministic_per_seed_and_clipped_to_the_image():
    instances = np.zeros((2, 40, 40), dtype=np.int32)
    instances[:, 0:10, 0:10] = 1  # at the corner: dilations must be clipped
    instances[:, 20:35, 25:40] = 2
    noise = SnowNoise(p_remove=0.2, sigma=8.0, simplify_every=3, bounding_box=True)
    a, _ = degrade_dataset(instances, noise, seed=0)
    b, _ = degrade_dataset(instances, noise, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == instances.shape and set(np.unique(a)) <= {0, 1}
    outputs = {degrade_dataset(instances, noise, seed=s)[0].tobytes() for s in range(10)}
    assert len(outputs) > 1


def test_statistics_match_their_definitions():
    instances = _grid(5, seed=2)
    noisy, stats = degrade_dataset(instances, SnowNoise(p_remove=0.3, sigma=3.0), seed=1)
    clean, out = instances > 0, noisy > 0
    assert stats["objects"] == 5 * 16
    assert stats["pixel_disagreement"] == pytest.approx((clean != out).mean())
    assert stats["noisy_foreground"] == pytest.approx(out.mean())
    assert stats["clean_foreground"] == pytest.approx(clean.mean())
    assert stats["pixel_precision"] == pytest.approx((clean & out).sum() / out.sum())
    assert stats["pixel_recall"] == pytest.approx((clean & out).sum() / clean.sum())
    _, empty = degrade_dataset(np.zeros((2, 8, 8), dtype=np.int32), SnowNoise(0.5), seed=0)
    assert empty["objects"] == 0 and empty["pixel_precision"] == empty["pixel_recall"] == 1.0


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("p_remove", -0.1, "[0, 1]"),
        ("p_remove", 1.5, "[0, 1]"),
        ("p_remove", float("nan"), "[0, 1]"),
        ("sigma", -1.0, ">= 0"),
        ("sigma", float("inf"), ">= 0"),
        ("simplify_every", 0, ">= 1"),
        ("simplify_every", 2.5, "integer"),
        ("bounding_box", "yes", "bool"),
    ],
)
def test_invalid_parameters_name_the_field(field, value, allowed):
    with pytest.raises(ValueError) as err:
        SnowNoise(**{field: value})
    message = str(err.value)
    assert field in message and repr(value) in message and allowed in message


def test_invalid_instances():
    with pytest.raises(ValueError, match="integer"):
        degrade(np.zeros((4, 4), dtype=float), SnowNoise(), np.random.default_rng(0))
    with pytest.raises(ValueError, match=">= 0"):
        degrade(-np.ones((4, 4), dtype=int), SnowNoise(), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        degrade_dataset(np.zeros((4, 4), dtype=int), SnowNoise(), seed=0)
