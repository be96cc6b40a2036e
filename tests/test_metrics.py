import numpy as np
import pytest
import torch

from snowfed.metrics import Confusion


def _confusion(pred, target) -> Confusion:
    c = Confusion()
    c.update(np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool))
    return c


def test_hand_computed_case():
    c = _confusion([[1, 1, 0], [0, 1, 0]], [[1, 0, 0], [1, 1, 0]])
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    assert c.precision() == pytest.approx(2 / 3)
    assert c.recall() == pytest.approx(2 / 3)
    assert c.f1() == pytest.approx(4 / 6)
    assert c.dice() == pytest.approx(4 / 6)  # one image: per-image mean == pooled
    assert c.mcc() == pytest.approx((2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3))
    assert c.n_images == 1


def test_f1_pools_pixels_but_dice_averages_images():
    # image 0: one pixel found exactly; image 1: eight false-positive pixels, nothing to find
    pred = np.zeros((2, 3, 3), bool)
    target = np.zeros((2, 3, 3), bool)
    pred[0, 1, 1] = target[0, 1, 1] = True
    pred[1] = True
    pred[1, 0, 0] = False
    c = _confusion(pred, target)
    assert c.f1() == pytest.approx(2 / (2 + 8))
    assert c.dice() == c.mean_image_dice() == pytest.approx((1.0 + 0.0) / 2)


def test_image_with_both_masks_empty_scores_one_in_the_dice_mean():
    pred = np.zeros((2, 4, 4), bool)
    target = np.zeros((2, 4, 4), bool)
    pred[0, :2, :2] = True
    target[0, :2, :] = True  # image 0: tp 4, fn 4 -> Dice 8 / 12; image 1: both empty -> 1
    assert _confusion(pred, target).dice() == pytest.approx((8 / 12 + 1.0) / 2)


def test_empty_set():
    c = Confusion()
    assert c.as_dict() == {
        "f1": 1.0,
        "dice": 1.0,
        "mcc": 0.0,
        "precision": 1.0,
        "recall": 1.0,
        "tp": 0,
        "fp": 0,
        "fn": 0,
        "tn": 0,
    }


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        # nothing predicted, nothing to find: perfect, MCC undefined
        (0, 0, {"f1": 1.0, "dice": 1.0, "precision": 1.0, "recall": 1.0, "mcc": 0.0}),
        # everything missed
        (0, 1, {"f1": 0.0, "dice": 0.0, "precision": 0.0, "recall": 0.0, "mcc": 0.0}),
        # only false alarms
        (1, 0, {"f1": 0.0, "dice": 0.0, "precision": 0.0, "recall": 0.0, "mcc": 0.0}),
        # all positive and all right: perfect overlap, MCC undefined (no negatives)
        (1, 1, {"f1": 1.0, "dice": 1.0, "precision": 1.0, "recall": 1.0, "mcc": 0.0}),
    ],
)
def test_constant_masks(pred, target, expected):
    c = _confusion(np.full((2, 5, 5), pred), np.full((2, 5, 5), target))
    assert {k: v for k, v in c.as_dict().items() if k in expected} == expected
    assert c.tp + c.fp + c.fn + c.tn == 50


def test_mcc_extremes():
    target = np.array([[1, 0], [0, 1]], bool)
    assert _confusion(target, target).mcc() == pytest.approx(1.0)
    assert _confusion(~target, target).mcc() == pytest.approx(-1.0)


def _random_masks(seed: int, n: int = 6, size: int = 9):
    rng = np.random.default_rng(seed)
    pred = rng.random((n, size, size)) < 0.3
    target = rng.random((n, size, size)) < 0.4
    pred[0] = target[0] = False  # an image with nothing on either side
    return pred, target


def test_update_in_parts_equals_update_at_once():
    pred, target = _random_masks(0)
    whole = _confusion(pred, target)
    parts = Confusion()
    parts.update(pred[:2], target[:2])
    parts.update(pred[2:], target[2:])
    summed = _confusion(pred[:4], target[:4]) + _confusion(pred[4:], target[4:])
    for c in (parts, summed):
        assert (c.tp, c.fp, c.fn, c.tn, c.n_images) == (whole.tp, whole.fp, whole.fn, whole.tn, 6)
        assert c.as_dict() == pytest.approx(whole.as_dict())


def test_agrees_with_reference_formulas():
    pred, target = _random_masks(1)
    c = _confusion(pred, target)
    p, t = pred.ravel(), target.ravel()
    assert c.f1() == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
    assert c.precision() == pytest.approx((p & t).sum() / p.sum())
    assert c.recall() == pytest.approx((p & t).sum() / t.sum())
    # MCC is Pearson's correlation of the two binary vectors
    assert c.mcc() == pytest.approx(np.corrcoef(p, t)[0, 1])
    per_image = [
        1.0 if not (pi.any() or ti.any()) else 2 * (pi & ti).sum() / (pi.sum() + ti.sum())
        for pi, ti in zip(pred, target)
    ]
    assert c.dice() == pytest.approx(np.mean(per_image))


def test_torch_input_and_layouts():
    pred, target = _random_masks(2)
    ref = _confusion(pred, target).as_dict()
    c = Confusion()
    c.update(torch.from_numpy(pred)[:, None], torch.from_numpy(target)[:, None])  # (B, 1, H, W)
    assert c.as_dict() == pytest.approx(ref)
    single = _confusion(pred[1], target[1])  # (H, W) is one image
    assert single.n_images == 1 and single.dice() == pytest.approx(single.f1())


def test_bad_input_is_refused():
    c = Confusion()
    with pytest.raises(TypeError, match="boolean"):
        c.update(torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        c.update(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), bool))
    assert c == Confusion()
