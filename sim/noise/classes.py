"""Classification label noise: class-conditional transition matrices, applied and measured.

The noise model is the usual class-conditional one (Natarajan et al. 2013; Patrini et al. 2017):
a clean label ``i`` becomes ``j`` with probability ``T[i, j]``, independently of the image, so a
site's label quality is one row-stochastic (C, C) matrix. Three kinds cover the benchmarks
(Co-teaching, FedNoisy): ``symmetric`` (uniform flips to the other classes), ``pairflip`` (flips
to the next class, the hard case where a wrong class can look as likely as the right one) and
``matrix`` (any matrix, e.g. one measured between two annotators).

Pure numpy so that the data side needs no torch; every config mistake raises
:class:`snowfed.config.ConfigError` naming the key (``key=`` lets the caller say which site).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from snowfed.config import ConfigError, is_real

KINDS = ("symmetric", "pairflip", "matrix")
_ROW_SUM_TOL = 1e-6
_CHUNK = 1 << 16  # labels per chunk in apply_transition: bounds the (chunk, C) comparison


def _check_rate(rate: Any, key: str) -> float:
    if not (is_real(rate) and 0 <= rate <= 1):
        raise ConfigError(key, rate, "a number in [0, 1]")
    return float(rate)


def transition_matrix(
    kind: str, num_classes: int, rate: float = 0.0, matrix=None, *, key: str = "noise"
) -> np.ndarray:
    """Row-stochastic (C, C) matrix, ``T[i, j] = P(noisy = j | clean = i)``.

    - ``symmetric``: ``1 - rate`` on the diagonal, ``rate / (C - 1)`` elsewhere, so ``rate`` is the
      actual probability that a label changes (some papers spread ``rate`` over all C classes,
      which flips only ``rate * (C - 1) / C``); needs C >= 2.
    - ``pairflip``: ``1 - rate`` on the diagonal, ``rate`` to class ``(i + 1) % C``.
    - ``matrix``: ``matrix`` as given, checked: C x C, finite, entries >= 0, rows summing to 1
      (within 1e-6). ``rate`` is ignored; ``matrix`` must be None for the other kinds, so a matrix
      that would be silently ignored is an error instead.

    ``key`` is the config key of this noise block (e.g. ``federation.hospitals[2].noise``); the
    errors name ``{key}.kind``, ``{key}.rate``, ``{key}.matrix`` or ``{key}.num_classes``.
    """
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind", kind, f"one of {', '.join(KINDS)}")
    if not (isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool)
            and num_classes >= 1):
        raise ConfigError(f"{key}.num_classes", num_classes, "an integer >= 1")
    c = int(num_classes)
    if kind == "matrix":
        return _check_matrix(matrix, c, f"{key}.matrix")
    if matrix is not None:
        raise ConfigError(f"{key}.matrix", matrix, f"null when {key}.kind is {kind!r}")
    r = _check_rate(rate, f"{key}.rate")
    if kind == "symmetric":
        if c < 2:
            raise ConfigError(f"{key}.kind", kind, "'pairflip' or 'matrix' with a single class "
                              "(symmetric noise needs num_classes >= 2)")
        t = np.full((c, c), r / (c - 1))
        np.fill_diagonal(t, 1.0 - r)
        return t
    # pairflip; with C = 1 the "next class" is the class itself and T = [[1]].
    eye = np.eye(c)
    return (1.0 - r) * eye + r * np.roll(eye, 1, axis=1)


def _check_matrix(matrix: Any, c: int, key: str) -> np.ndarray:
    allowed = f"a {c} x {c} matrix of probabilities >= 0 whose rows sum to 1"
    if matrix is None or isinstance(matrix, (str, bytes)):
        raise ConfigError(key, matrix, allowed)
    try:
        t = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(key, matrix, allowed) from None
    ok = t.shape == (c, c) and bool(np.all(np.isfinite(t))) and bool(np.all(t >= 0))
    ok = ok and bool(np.all(np.abs(t.sum(axis=1) - 1.0) <= _ROW_SUM_TOL))
    if not ok:
        raise ConfigError(key, matrix, allowed)
    return t


def draw_rate(rate: Any, rng: np.random.Generator, key: str = "noise.rate") -> float:
    """A site's noise rate: ``rate`` itself if it is a number in [0, 1], or a uniform draw from
    ``[low, high]`` if it is a 2-element list (FedNoisy's "localized" noise, every site a
    different rate). A fixed rate consumes no draw from ``rng``; a range always consumes one,
    even when ``low == high``, so a site's later draws do not depend on the range's width.
    """
    if is_real(rate):
        return _check_rate(rate, key)
    allowed = "a number in [0, 1] or a list [low, high] with 0 <= low <= high <= 1"
    is_list = isinstance(rate, (Sequence, np.ndarray)) and not isinstance(rate, (str, bytes))
    if not (is_list and len(rate) == 2 and all(is_real(x) for x in rate)):
        raise ConfigError(key, rate, allowed)
    low, high = float(rate[0]), float(rate[1])
    if not 0 <= low <= high <= 1:
        raise ConfigError(key, rate, allowed)
    return float(rng.uniform(low, high))


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in "
                         f"[{labels.min()}, {labels.max()}]")
    return labels


def apply_transition(labels: np.ndarray, T: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy copy of ``labels`` (any shape): each label ``i`` replaced by a draw from ``T[i]``.

    Inverse CDF with one uniform per label, in label order, so the same seed and labels give the
    same noisy labels whatever T is (noise levels stay paired). Each row's CDF is divided by its
    last entry so that it ends at exactly 1: a class of probability 0 is never drawn, even when
    the row sums to 1 only within rounding. Returns int64.
    """
    t = np.asarray(T, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
        raise ValueError(f"T must be a square (C, C) matrix, got shape {t.shape}")
    if not (np.all(np.isfinite(t)) and np.all(t >= 0)
            and np.all(np.abs(t.sum(axis=1) - 1.0) <= _ROW_SUM_TOL)):
        raise ValueError("T must be row-stochastic: finite entries >= 0, rows summing to 1")
    labels = _check_labels(labels, t.shape[0], "labels")
    cdf = np.cumsum(t, axis=1)
    cdf /= cdf[:, -1:]
    flat = labels.ravel()
    u = rng.random(flat.shape[0])
    out = np.empty_like(flat)
    for s in range(0, flat.shape[0], _CHUNK):
        sl = slice(s, s + _CHUNK)
        # class = number of CDF entries <= u; u < 1 = cdf[:, -1], so at most C - 1
        out[sl] = (u[sl, None] >= cdf[flat[sl]]).sum(axis=1)
    return out.reshape(labels.shape)


def measure_noise(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> dict:
    """How noisy ``noisy`` is against ``clean``, as plain JSON-able values.

    ``flip_rate``: fraction of labels that differ (None when there are no labels, rather than a
    0.0 that would read as "clean"); ``num_labels``; ``confusion``: counts, rows clean, columns
    noisy; ``per_class_flip_rate``: per clean class, None when the class does not occur.
    """
    c = int(num_classes)
    clean = _check_labels(clean, c, "clean").ravel()
    noisy = _check_labels(noisy, c, "noisy")
    if noisy.size != clean.size:
        raise ValueError(f"clean and noisy differ in size: {clean.size} vs {noisy.size}")
    noisy = noisy.ravel()
    confusion = np.bincount(clean * c + noisy, minlength=c * c).reshape(c, c)
    n = int(clean.size)
    per_class_total = confusion.sum(axis=1)
    per_class = [
        None if total == 0 else float((total - confusion[i, i]) / total)
        for i, total in enumerate(per_class_total)
    ]
    return {
        "flip_rate": None if n == 0 else float(np.mean(clean != noisy)),
        "num_labels": n,
        "confusion": confusion.tolist(),
        "per_class_flip_rate": per_class,
    }
