"""Several annotators per item: simulated votes, majority vote, Dawid-Skene, STAPLE."""

from __future__ import annotations

import numpy as np
import pytest

from snowfed.sim.federation.annotators import (
    DawidSkeneResult,
    StapleResult,
    dawid_skene,
    fused_accuracy,
    majority_vote,
    pixel_majority,
    simulate_votes,
    staple,
)
from snowfed.sim.noise.classes import transition_matrix

C, N = 4, 2000
GOOD, BAD = (0, 1), (2, 3, 4)
FLIPS = (0.1, 0.1, 0.65, 0.65, 0.65)  # 2 good annotators, 3 bad ones (still above chance: 0.35 > 1/4)


def _crowd(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N)
    votes = simulate_votes(labels, [transition_matrix("symmetric", C, f) for f in FLIPS], rng)
    return labels, votes


# ---- simulate_votes / majority_vote -------------------------------------------------------------


def test_simulate_votes_shape_and_per_annotator_noise():
    labels, votes = _crowd(0)
    assert votes.shape == (N, 5) and votes.dtype == np.int64
    for k, f in enumerate(FLIPS):
        assert abs(np.mean(votes[:, k] != labels) - f) < 0.04
    exact = simulate_votes(labels, [np.eye(C)] * 2, np.random.default_rng(0))
    np.testing.assert_array_equal(exact, np.stack([labels, labels], axis=1))


def test_majority_vote_ties_and_missing():
    votes = np.array([
        [2, 2, 1],  # clear majority
        [3, 1, -1],  # tie 1 vs 3 -> lowest, 1
        [0, 2, 2],
        [-1, -1, 3],  # one vote left
        [-1, -1, -1],  # nobody labelled it
        [2, 1, 0],  # three-way tie -> 0
    ])
    np.testing.assert_array_equal(majority_vote(votes, 4), [2, 1, 2, 3, -1, 0])


@pytest.mark.parametrize("votes, match", [
    (np.array([0, 1]), r"\(N, K\)"),
    (np.array([[0, 4]]), r"\[0, 4\)"),
    (np.array([[0, -2]]), "missing"),
    (np.array([[0.0, 1.0]]), "integer"),
])
def test_votes_are_checked(votes, match):
    with pytest.raises(ValueError, match=match):
        majority_vote(votes, 4)
    with pytest.raises(ValueError, match=match):
        dawid_skene(votes, 4)


# ---- Dawid-Skene --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_dawid_skene_beats_majority_when_reliability_differs(seed):
    labels, votes = _crowd(seed)
    mv = fused_accuracy(majority_vote(votes, C), labels)
    ds = dawid_skene(votes, C)
    ds_acc = fused_accuracy(ds.labels, labels)
    assert ds_acc >= mv + 0.05, (ds_acc, mv)  # measured: MV ~0.80, DS ~0.91
    diag = np.einsum("kii->ki", ds.confusions).mean(axis=1)
    assert min(diag[list(GOOD)]) > max(diag[list(BAD)]) + 0.3
    np.testing.assert_allclose(diag, [1 - f for f in FLIPS], atol=0.05)  # recovers the accuracies
    np.testing.assert_allclose(ds.priors, np.bincount(labels, minlength=C) / N, atol=0.03)


def test_dawid_skene_result_is_well_formed():
    _, votes = _crowd(2)
    ds = dawid_skene(votes, C)
    assert isinstance(ds, DawidSkeneResult)
    assert ds.labels.shape == (N,) and ds.labels.dtype == np.int64
    assert ds.posteriors.shape == (N, C) and ds.confusions.shape == (5, C, C)
    np.testing.assert_allclose(ds.posteriors.sum(axis=1), 1.0)
    np.testing.assert_allclose(ds.confusions.sum(axis=2), 1.0)
    np.testing.assert_allclose(ds.priors.sum(), 1.0)
    np.testing.assert_array_equal(ds.labels, ds.posteriors.argmax(axis=1))
    assert 1 <= ds.iterations < 100  # converged before the cap
    assert dawid_skene(votes, C, max_iter=3).iterations == 3


def test_dawid_skene_with_missing_votes():
    labels, votes = _crowd(3)
    rng = np.random.default_rng(30)
    sparse = np.where(rng.random(votes.shape) < 0.3, -1, votes)
    mv = fused_accuracy(majority_vote(sparse, C), labels)
    ds = dawid_skene(sparse, C)
    ds_acc = fused_accuracy(ds.labels, labels)
    assert ds_acc >= mv + 0.05, (ds_acc, mv)  # measured: MV ~0.72, DS ~0.85
    diag = np.einsum("kii->ki", ds.confusions).mean(axis=1)
    assert min(diag[list(GOOD)]) > max(diag[list(BAD)])


def _dawid_skene_one_step_by_loops(votes, c, alpha=0.01):
    """One M + E step of Dawid-Skene from the majority-vote soft counts, written as loops."""
    n, k = votes.shape
    post = np.zeros((n, c))
    for i in range(n):
        given = votes[i][votes[i] >= 0]
        post[i] = np.bincount(given, minlength=c) / len(given) if len(given) else 1.0 / c
    priors = (post.sum(axis=0) + alpha) / (n + c * alpha)
    conf = np.full((k, c, c), alpha)
    for i in range(n):
        for a in range(k):
            if votes[i, a] >= 0:
                conf[a, :, votes[i, a]] += post[i]
    conf /= conf.sum(axis=2, keepdims=True)
    new = np.tile(priors, (n, 1))
    for i in range(n):
        for a in range(k):
            if votes[i, a] >= 0:
                new[i] *= conf[a, :, votes[i, a]]
    return new / new.sum(axis=1, keepdims=True), conf, priors


def test_dawid_skene_step_matches_the_loops():
    rng = np.random.default_rng(6)
    votes = rng.integers(0, 3, (40, 4))
    votes[rng.random(votes.shape) < 0.25] = -1
    votes[0] = -1  # an item nobody labelled
    post, conf, priors = _dawid_skene_one_step_by_loops(votes, 3)
    ds = dawid_skene(votes, 3, max_iter=1)
    np.testing.assert_allclose(ds.posteriors, post, rtol=1e-10)
    np.testing.assert_allclose(ds.confusions, conf, rtol=1e-10)
    np.testing.assert_allclose(ds.priors, priors, rtol=1e-10)


def test_dawid_skene_ignores_an_annotator_with_no_votes():
    _, votes = _crowd(4)
    padded = np.concatenate([votes, np.full((N, 1), -1)], axis=1)
    a, b = dawid_skene(votes, C), dawid_skene(padded, C)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.posteriors, b.posteriors, atol=1e-12)
    np.testing.assert_allclose(b.confusions[-1], 1.0 / C)  # pseudo-counts only: uniform


def test_dawid_skene_unanimous_votes():
    labels = np.random.default_rng(5).integers(0, 3, 300)
    ds = dawid_skene(np.stack([labels] * 3, axis=1), 3)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.posteriors.max(axis=1).min() > 0.999


# ---- pixel_majority / STAPLE --------------------------------------------------------------------

S = 96
YY, XX = np.mgrid[:S, :S]


def _disk(r, centre=(48, 48)):
    return (YY - centre[0]) ** 2 + (XX - centre[1]) ** 2 <= r * r


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _raters(seed: int):
    """Truth: a disk. Raters 0-1 accurate (1% of pixels flipped); 2-4 each miss a different large
    part of it (the left, the top, the top-left) and 3-4 also draw a false blob. Errors of the bad
    raters overlap only in the top-left quadrant, which three of five raters leave out: there the
    majority is wrong, and STAPLE, having learnt that 0-1 are reliable, is not."""
    rng = np.random.default_rng(seed)
    truth = _disk(30)

    def flip(m):
        return m ^ (rng.random(m.shape) < 0.01)

    raters = np.stack([
        flip(truth),
        flip(truth),
        truth & (XX >= 44),
        (truth & (YY >= 44)) | _disk(7, (10, 82)),
        (truth & (XX + YY >= 92)) | _disk(9, (84, 12)),
    ])
    return truth, raters


def test_pixel_majority_strict_and_ties_to_background():
    three = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]])
    out = pixel_majority(three)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [1, 0, 1, 0])
    four = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(pixel_majority(four), [1, 0, 0])  # 2 of 4 is a tie -> 0
    with pytest.raises(ValueError, match="binary"):
        pixel_majority(np.array([[0, 2], [1, 1]]))


@pytest.mark.parametrize("seed", [0, 1])
def test_staple_beats_majority_when_reliability_differs(seed):
    truth, raters = _raters(seed)
    mv = _dice(pixel_majority(raters), truth)
    st = staple(raters)
    st_dice = _dice(st.mask, truth)
    assert st_dice >= mv + 0.05, (st_dice, mv)  # measured: majority ~0.91, STAPLE ~0.997
    assert st_dice > 0.98
    assert fused_accuracy(st.mask, truth.astype(np.uint8)) > fused_accuracy(
        pixel_majority(raters), truth.astype(np.uint8))

    true_sens = (raters & truth).sum(axis=(1, 2)) / truth.sum()
    true_spec = (~raters & ~truth).sum(axis=(1, 2)) / (~truth).sum()
    np.testing.assert_allclose(st.sensitivity, true_sens, atol=0.02)
    np.testing.assert_allclose(st.specificity, true_spec, atol=0.01)
    assert min(st.sensitivity[:2]) > max(st.sensitivity[2:]) + 0.3  # the accurate ones first
    # specificity: rater 2 drew no false positive, 4 the largest blob
    assert st.specificity.argmax() == 2 and st.specificity.argmin() == 4


def _staple_by_products(d, f, iters):
    """STAPLE as written in Warfield et al. (2004), eqs. for W, p, q: products over raters."""
    p, q = np.full(len(d), 0.99), np.full(len(d), 0.99)
    for _ in range(iters):
        a = f * np.prod(np.where(d, p[:, None], 1 - p[:, None]), axis=0)
        b = (1 - f) * np.prod(np.where(d, 1 - q[:, None], q[:, None]), axis=0)
        w = a / (a + b)
        p = (d * w).sum(axis=1) / w.sum()
        q = ((1 - d) * (1 - w)).sum(axis=1) / (1 - w).sum()
    a = f * np.prod(np.where(d, p[:, None], 1 - p[:, None]), axis=0)
    b = (1 - f) * np.prod(np.where(d, 1 - q[:, None], q[:, None]), axis=0)
    return a / (a + b), p, q


@pytest.mark.parametrize("k", [4, 20, 70])  # the three ways of counting vote patterns
def test_staple_matches_the_paper_formulas(k):
    rng = np.random.default_rng(7)
    truth = rng.random(500) < 0.3
    d = np.stack([truth ^ (rng.random(500) < e) for e in np.linspace(0.05, 0.4, k)])
    d = np.concatenate([d, d[:, :250]], axis=1)  # repeated vote patterns, even with 70 raters
    w, p, q = _staple_by_products(d, d.mean(), 5)
    st = staple(d, max_iter=5, tol=0)
    np.testing.assert_allclose(st.probability, w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(st.sensitivity, p, rtol=1e-9)
    np.testing.assert_allclose(st.specificity, q, rtol=1e-9)
    st = staple(d, max_iter=3, tol=0, prior=0.5)
    np.testing.assert_allclose(st.probability, _staple_by_products(d, 0.5, 3)[0], rtol=1e-9, atol=1e-12)


def test_staple_result_is_well_formed():
    truth, raters = _raters(2)
    st = staple(raters)
    assert isinstance(st, StapleResult)
    assert st.mask.shape == truth.shape and st.mask.dtype == np.uint8
    assert st.probability.shape == truth.shape
    assert 0 <= st.probability.min() and st.probability.max() <= 1
    np.testing.assert_array_equal(st.mask, (st.probability >= 0.5).astype(np.uint8))
    assert st.sensitivity.shape == st.specificity.shape == (5,)
    assert 1 <= st.iterations < 100
    assert staple(raters, max_iter=2).iterations == 2


def test_staple_identical_raters_and_nd_masks():
    truth = np.zeros((4, 8, 8), dtype=np.uint8)  # a 3-D volume
    truth[1:3, 2:6, 2:6] = 1
    st = staple(np.stack([truth] * 3), prior=0.3)
    np.testing.assert_array_equal(st.mask, truth)
    np.testing.assert_allclose(st.sensitivity, 1.0)
    np.testing.assert_allclose(st.specificity, 1.0)


def test_staple_degenerate_and_bad_input():
    empty = staple(np.zeros((3, 5, 5), dtype=bool))  # nobody drew anything: no NaN, empty mask
    assert not empty.mask.any() and np.isfinite(empty.probability).all()
    assert np.isfinite(empty.sensitivity).all() and np.isfinite(empty.specificity).all()
    with pytest.raises(ValueError, match="prior"):
        staple(np.zeros((2, 3, 3)), prior=1.0)
    with pytest.raises(ValueError, match="binary"):
        staple(np.full((2, 3, 3), 0.5))
    with pytest.raises(ValueError, match="raters"):
        staple(np.zeros(5))


def test_fused_accuracy():
    assert fused_accuracy(np.array([1, 2, 3, 0]), np.array([1, 2, 0, 0])) == 0.75
    assert fused_accuracy(np.ones((2, 2), np.uint8), np.eye(2, dtype=bool)) == 0.5
    with pytest.raises(ValueError, match="shape"):
        fused_accuracy(np.zeros(3), np.zeros(4))
