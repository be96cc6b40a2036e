"""Crowd-sourced labels: several annotators per item, and ways to fuse them into one label.

Medical labels often come from several readers of unequal skill. This module simulates them
(one transition matrix per annotator, :mod:`snowfed.sim.noise.classes`) and fuses them:

- classification: :func:`majority_vote`, and :func:`dawid_skene` (Dawid & Skene 1979), which
  learns one confusion matrix per annotator by EM and so trusts the good ones more;
- segmentation: :func:`pixel_majority`, and :func:`staple` (Warfield, Zou & Wells 2004), which
  learns each rater's sensitivity and specificity by EM.

Both EMs are written here in numpy (about 40 lines each) rather than taken from a library:
``crowd-kit`` (Dawid-Skene) pulls in transformers, tokenizers and nltk and works on pandas data
frames; SimpleITK's STAPLE is a 50 MB wheel for one filter that works on ``sitk.Image`` objects
one image at a time. Neither is a dependency of the project. The tests check both EMs against
the papers' formulas written as plain loops.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from snowfed.sim.noise.classes import apply_transition

MISSING = -1  # a vote an annotator did not give
PSEUDO_COUNT = 0.01  # added to every confusion / prior count in Dawid-Skene, so no log(0)
_EPS = 1e-6  # STAPLE clips sensitivity/specificity to [eps, 1 - eps] inside its logs


def simulate_votes(
    labels: np.ndarray, matrices: Sequence[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """(N, K) int64 votes: annotator k's labels drawn from ``matrices[k]``, annotator 0 first."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
    if len(matrices) == 0:
        raise ValueError("need at least one annotator matrix")
    votes = np.empty((labels.shape[0], len(matrices)), dtype=np.int64)
    for k, t in enumerate(matrices):
        votes[:, k] = apply_transition(labels, t, rng)
    return votes


def _check_votes(votes: np.ndarray, num_classes: int) -> np.ndarray:
    votes = np.asarray(votes)
    if votes.ndim != 2:
        raise ValueError(f"votes must be (N, K), got shape {votes.shape}")
    if votes.size and not np.issubdtype(votes.dtype, np.integer):
        raise ValueError(f"votes must be integer classes (or {MISSING}), got dtype {votes.dtype}")
    if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 1):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    votes = votes.astype(np.int64, copy=False)
    if votes.size and (votes.min() < MISSING or votes.max() >= num_classes):
        raise ValueError(f"votes must lie in [0, {num_classes}) or be {MISSING} (missing)")
    return votes


def _one_hot(votes: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, K, C) float one-hot of the votes; a missing vote is a row of zeros."""
    onehot = (votes[..., None] == np.arange(num_classes)).astype(np.float64)
    return onehot  # -1 matches no class, so missing votes are masked for free


def majority_vote(votes: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) most-voted class per item, missing votes (-1) ignored.

    Ties go to the lowest class among the tied ones (argmax's first maximum), so the result is
    deterministic; an item nobody labelled gets -1.
    """
    votes = _check_votes(votes, num_classes)
    counts = _one_hot(votes, num_classes).sum(axis=1)
    fused = counts.argmax(axis=1).astype(np.int64)
    fused[counts.sum(axis=1) == 0] = MISSING
    return fused


@dataclass
class DawidSkeneResult:
    labels: np.ndarray  # (N,) argmax of the posteriors (ties: the lowest class)
    posteriors: np.ndarray  # (N, C) P(true class | votes)
    confusions: np.ndarray  # (K, C, C) annotator k: P(vote j | true class i)
    priors: np.ndarray  # (C,) class frequencies
    iterations: int  # EM iterations run (E + M steps after the majority-vote start)


def dawid_skene(
    votes: np.ndarray, num_classes: int, max_iter: int = 100, tol: float = 1e-6
) -> DawidSkeneResult:
    """Dawid & Skene (1979) EM: true classes and one confusion matrix per annotator.

    Starts from the majority-vote soft counts (the fraction of an item's votes for each class;
    uniform for an item nobody labelled), then alternates the M step (priors and confusions from
    the posteriors, each count plus ``PSEUDO_COUNT``) and the E step (posteriors from priors and
    confusions, in log space). Stops when the mean log-likelihood of an item's votes moves by less
    than ``tol``, or after ``max_iter`` iterations: EM's posteriors creep linearly for hundreds of
    iterations after the labels have settled, so a tolerance on them would always run to the cap.
    Missing votes (-1) contribute nothing; an annotator with no votes keeps a uniform confusion
    matrix and does not change the result; an item with no votes gets the priors as posterior
    (unlike :func:`majority_vote`, which gives it -1).
    """
    votes = _check_votes(votes, num_classes)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    c = int(num_classes)
    n, k = votes.shape
    onehot = _one_hot(votes, c)  # (N, K, C)
    flat = onehot.reshape(n, k * c)  # one column per (annotator, vote)

    counts = onehot.sum(axis=1)  # (N, C)
    total = counts.sum(axis=1, keepdims=True)
    post = np.where(total > 0, counts / np.maximum(total, 1), 1.0 / c)

    iterations, prev_log_lik = 0, -np.inf
    while iterations < max_iter:
        iterations += 1
        # M step: priors[i], confusions[k, i, j] = sum_n post[n, i] * onehot[n, k, j] (one matmul)
        priors = (post.sum(axis=0) + PSEUDO_COUNT) / (n + c * PSEUDO_COUNT)
        conf = (post.T @ flat).reshape(c, k, c).transpose(1, 0, 2) + PSEUDO_COUNT
        conf /= conf.sum(axis=2, keepdims=True)
        # E step: log post[n, i] = log prior[i] + sum_{k, j} onehot[n, k, j] * log conf[k, i, j]
        log_conf = np.log(conf).transpose(0, 2, 1).reshape(k * c, c)
        log_joint = np.log(priors) + flat @ log_conf
        top = log_joint.max(axis=1, keepdims=True)
        post = np.exp(log_joint - top)
        evidence = post.sum(axis=1, keepdims=True)
        post /= evidence
        # mean log P(votes of an item): the EM objective, non-decreasing up to the pseudo-counts
        log_lik = float(np.mean(top + np.log(evidence))) if n else 0.0
        if abs(log_lik - prev_log_lik) < tol:
            break
        prev_log_lik = log_lik
    return DawidSkeneResult(
        labels=post.argmax(axis=1).astype(np.int64),
        posteriors=post,
        confusions=conf,
        priors=priors,
        iterations=iterations,
    )


def _check_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim < 2 or masks.shape[0] == 0:
        raise ValueError(f"masks must be (K, ...) with K >= 1 raters, got shape {masks.shape}")
    if masks.dtype != bool and not np.all((masks == 0) | (masks == 1)):
        raise ValueError("masks must be binary (0/1 or bool)")
    return masks.astype(bool, copy=False)


def pixel_majority(masks: np.ndarray) -> np.ndarray:
    """(...) uint8: 1 where strictly more than half of the K raters say foreground.

    With an even K a tie (K/2 votes each way) is background: a pixel is foreground only when a
    majority says so, which errs toward the smaller mask.
    """
    masks = _check_masks(masks)
    return (2 * masks.sum(axis=0) > masks.shape[0]).astype(np.uint8)


@dataclass
class StapleResult:
    mask: np.ndarray  # (...) uint8, probability >= 0.5
    probability: np.ndarray  # (...) float, P(foreground | all raters)
    sensitivity: np.ndarray  # (K,) p_k = P(rater says 1 | truth 1)
    specificity: np.ndarray  # (K,) q_k = P(rater says 0 | truth 0)
    iterations: int


def staple(
    masks: np.ndarray, max_iter: int = 100, tol: float = 1e-6, prior: float | None = None
) -> StapleResult:
    """STAPLE (Warfield, Zou & Wells 2004) for binary masks (K, ...).

    EM on the hidden true mask with one sensitivity ``p_k`` and specificity ``q_k`` per rater,
    raters independent given the truth. The foreground prior is fixed: ``prior`` if given, else
    the global fraction of foreground votes (as in the paper). Starts from p = q = 0.99, stops
    when no p_k or q_k moves by more than ``tol`` (or after ``max_iter``). p and q are clipped to
    [1e-6, 1 - 1e-6] inside the logs only, so a perfect rater does not make the posterior 0/0;
    a p (q) whose denominator is empty (no foreground / background weight) keeps its last value.

    A pixel's posterior depends only on its K votes, so the EM runs on the distinct vote
    patterns (at most 2^K) weighted by their pixel counts: the same numbers as the per-pixel
    formulas, but a whole data set of masks costs one pass to count the patterns.
    """
    masks = _check_masks(masks)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if prior is not None and not (
        isinstance(prior, numbers.Real) and not isinstance(prior, bool) and 0 < prior < 1
    ):
        raise ValueError(f"prior must be a number in (0, 1), got {prior!r}")
    k = masks.shape[0]
    patterns, counts, inverse = _vote_patterns(masks.reshape(k, -1))  # (K, U) bool, (U,), (V,)
    counts = counts.astype(np.float64)
    v = counts.sum()
    said_one = patterns @ counts  # (K,) foreground votes per rater
    f = said_one.sum() / (k * v) if prior is None else float(prior)
    f = min(max(f, _EPS), 1 - _EPS)  # all-empty or all-full votes: still a valid prior

    def e_step(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        # W = P(truth 1 | votes) = sigmoid(log a - log b), where
        # log a - log b = logit f + sum_k log((1-p_k)/q_k) + sum_k d_k * slope_k
        pc, qc = np.clip(p, _EPS, 1 - _EPS), np.clip(q, _EPS, 1 - _EPS)
        slope = np.log(pc) - np.log1p(-pc) + np.log(qc) - np.log1p(-qc)
        bias = np.log(f) - np.log1p(-f) + np.log1p(-pc).sum() - np.log(qc).sum()
        return expit(bias + slope @ patterns)

    p = np.full(k, 0.99)
    q = np.full(k, 0.99)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        cw = counts * e_step(p, q)  # foreground weight of each pattern
        sw = float(cw.sum())
        sb = v - sw
        dw = patterns @ cw  # sum_i W_i d_ik
        # p_k = sum W d / sum W;  q_k = sum (1-W)(1-d) / sum (1-W) = (sb - (said_one - dw)) / sb
        new_p = dw / sw if sw > 0 else p
        new_q = (sb - said_one + dw) / sb if sb > 0 else q
        delta = max(np.abs(new_p - p).max(), np.abs(new_q - q).max())
        p, q = new_p, new_q
        if delta < tol:
            break
    # the posterior of the p, q returned
    probability = e_step(p, q)[inverse].reshape(masks.shape[1:])
    return StapleResult(
        mask=(probability >= 0.5).astype(np.uint8),
        probability=probability,
        sensitivity=p,
        specificity=q,
        iterations=iterations,
    )


def _vote_patterns(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct columns of the (K, V) bool votes: patterns (K, U) as floats 0/1, their counts
    (U,), and each pixel's pattern index (V,). K <= 16: all 2^K codes, counted by bincount (no
    sort); K <= 62: the codes' np.unique; beyond, np.unique over columns."""
    k = d.shape[0]
    if k > 62:
        cols, inverse, counts = np.unique(d, axis=1, return_inverse=True, return_counts=True)
        return cols.astype(np.float64), counts, inverse.ravel()
    code = np.zeros(d.shape[1], dtype=np.int64)
    for j in range(k):
        code[d[j]] += 1 << j
    if k <= 16:
        codes, counts, inverse = np.arange(1 << k), np.bincount(code, minlength=1 << k), code
    else:
        codes, inverse, counts = np.unique(code, return_inverse=True, return_counts=True)
    bits = (codes[None, :] >> np.arange(k)[:, None]) & 1
    return bits.astype(np.float64), counts, inverse


def fused_accuracy(fused: np.ndarray, clean: np.ndarray) -> float:
    """Fraction of entries where ``fused`` equals ``clean`` (class labels or mask pixels)."""
    fused, clean = np.asarray(fused), np.asarray(clean)
    if fused.shape != clean.shape:
        raise ValueError(f"fused and clean differ in shape: {fused.shape} vs {clean.shape}")
    if fused.size == 0:
        raise ValueError("no labels to compare")
    return float(np.mean(fused == clean))
