"""Classification label noise: transition matrices, their sampling, the measured noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from snowfed.config import ConfigError
from snowfed.sim.noise.classes import (
    KINDS,
    apply_transition,
    draw_rate,
    measure_noise,
    transition_matrix,
)

KEY = "federation.hospitals[2].noise"
N = 20_000


def _labels(seed: int = 0, n: int = N, c: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c, n)


# ---- transition_matrix -------------------------------------------------------------------------


@pytest.mark.parametrize("c", [2, 3, 10])
@pytest.mark.parametrize("rate", [0.0, 0.25, 1.0])
def test_symmetric_pattern(c, rate):
    t = transition_matrix("symmetric", c, rate)
    assert t.shape == (c, c)
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.diag(t), 1.0 - rate)
    off = t[~np.eye(c, dtype=bool)]
    np.testing.assert_allclose(off, rate / (c - 1))  # rate is the flip probability, not rate*(C-1)/C


@pytest.mark.parametrize("c", [1, 2, 5])
def test_pairflip_pattern(c):
    t = transition_matrix("pairflip", c, 0.3)
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    expected = np.zeros((c, c))
    for i in range(c):
        expected[i, i] += 0.7
        expected[i, (i + 1) % c] += 0.3
    np.testing.assert_allclose(t, expected)


def test_matrix_kind_returns_validated_copy():
    given = [[0.8, 0.2, 0.0], [0.0, 1.0, 0.0], [0.5, 0.25, 0.25]]
    t = transition_matrix("matrix", 3, matrix=given)
    assert t.dtype == np.float64
    np.testing.assert_array_equal(t, np.array(given))
    given[0][0] = 0.0  # later edits to the config do not reach the matrix
    assert t[0, 0] == 0.8
    # rows summing to 1 within 1e-6 pass
    transition_matrix("matrix", 2, matrix=[[0.5 + 5e-7, 0.5], [0.0, 1.0]])


@pytest.mark.parametrize(
    "kwargs, suffix",
    [
        (dict(kind="uniform", num_classes=3), "kind"),
        (dict(kind="symmetric", num_classes=1, rate=0.2), "kind"),
        (dict(kind="symmetric", num_classes=0), "num_classes"),
        (dict(kind="pairflip", num_classes=2.5), "num_classes"),
        (dict(kind="pairflip", num_classes=True), "num_classes"),
        (dict(kind="symmetric", num_classes=3, rate=-0.1), "rate"),
        (dict(kind="symmetric", num_classes=3, rate=1.5), "rate"),
        (dict(kind="pairflip", num_classes=3, rate=math.nan), "rate"),
        (dict(kind="pairflip", num_classes=3, rate="0.2"), "rate"),
        (dict(kind="pairflip", num_classes=3, rate=True), "rate"),
        (dict(kind="symmetric", num_classes=2, rate=0.1, matrix=[[1, 0], [0, 1]]), "matrix"),
        (dict(kind="matrix", num_classes=2), "matrix"),
        (dict(kind="matrix", num_classes=2, matrix="identity"), "matrix"),
        (dict(kind="matrix", num_classes=3, matrix=[[1, 0], [0, 1]]), "matrix"),
        (dict(kind="matrix", num_classes=2, matrix=[[1, 0, 0], [0, 1, 0]]), "matrix"),
        (dict(kind="matrix", num_classes=2, matrix=[[1, 0], [0]]), "matrix"),
        (dict(kind="matrix", num_classes=2, matrix=[[1.2, -0.2], [0, 1]]), "matrix"),
        (dict(kind="matrix", num_classes=2, matrix=[[0.9, 0.2], [0, 1]]), "matrix"),
        (dict(kind="matrix", num_classes=2, matrix=[[math.nan, 1], [0, 1]]), "matrix"),
        (dict(kind="matrix", num_classes=2, matrix=[["a", "b"], [0, 1]]), "matrix"),
    ],
)
def test_config_errors_name_the_key(kwargs, suffix):
    with pytest.raises(ConfigError) as err:
        transition_matrix(**kwargs, key=KEY)
    assert err.value.key == f"{KEY}.{suffix}"
    assert f"{KEY}.{suffix}" in str(err.value)


def test_default_key_is_noise():
    with pytest.raises(ConfigError) as err:
        transition_matrix("symmetric", 3, 2.0)
    assert err.value.key == "noise.rate"


# ---- apply_transition --------------------------------------------------------------------------


@pytest.mark.parametrize("kind, rate", [("symmetric", 0.2), ("symmetric", 0.4), ("symmetric", 0.6),
                                        ("pairflip", 0.3)])
def test_measured_flip_rate_matches_rate(kind, rate):
    clean = _labels(1)
    noisy = apply_transition(clean, transition_matrix(kind, 10, rate), np.random.default_rng(2))
    stats = measure_noise(clean, noisy, 10)
    assert abs(stats["flip_rate"] - rate) < 0.01
    assert stats["num_labels"] == N


def test_pairflip_only_flips_to_next_class():
    clean = _labels(3)
    noisy = apply_transition(clean, transition_matrix("pairflip", 10, 0.45), np.random.default_rng(4))
    flipped = noisy != clean
    assert flipped.any()
    np.testing.assert_array_equal(noisy[flipped], (clean[flipped] + 1) % 10)


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_rate_zero_changes_nothing(kind):
    clean = _labels(5)
    noisy = apply_transition(clean, transition_matrix(kind, 10, 0.0), np.random.default_rng(6))
    np.testing.assert_array_equal(noisy, clean)
    assert noisy.dtype == np.int64


@pytest.mark.parametrize("name", ["symmetric", "pairflip", "random"])
def test_measured_confusion_approximates_T(name):
    c = 5
    if name == "random":
        t = np.random.default_rng(7).dirichlet(np.ones(c), size=c)
    else:
        t = transition_matrix(name, c, 0.4)
    clean = _labels(8, c=c)
    noisy = apply_transition(clean, t, np.random.default_rng(9))
    conf = np.array(measure_noise(clean, noisy, c)["confusion"], dtype=float)
    np.testing.assert_allclose(conf / conf.sum(axis=1, keepdims=True), t, atol=0.02)


def test_zero_probability_classes_are_never_drawn():
    # rows sum to 1 only within rounding; the zero entries (incl. the last column) must stay 0
    t = np.array([[0.0, 1.0 - 1e-9, 0.0], [1 / 3, 1 / 3, 1 / 3 - 1e-9], [0.0, 0.0, 1.0]])
    clean = _labels(10, c=3)
    noisy = apply_transition(clean, t, np.random.default_rng(11))
    conf = np.array(measure_noise(clean, noisy, 3)["confusion"])
    assert conf[0, 0] == conf[0, 2] == conf[2, 0] == conf[2, 1] == 0
    assert (conf[1] > 0).all()


class _TopRng:
    """Draws the largest uniform below 1: the inverse CDF's worst case."""

    def random(self, size):
        return np.full(size, np.nextafter(1.0, 0.0))


def test_inverse_cdf_top_uniform_stays_in_range():
    # row 0 sums to 1 - 5e-7 (accepted): without renormalising its CDF, u ~ 1 would pass the end
    t = np.array([[0.5, 0.5 - 5e-7, 0.0], [0.0, 0.0, 1.0], [0.2, 0.8, 0.0]])
    noisy = apply_transition(np.array([0, 1, 2]), t, _TopRng())
    np.testing.assert_array_equal(noisy, [1, 2, 1])  # the last class of positive probability


def test_apply_transition_is_seeded_and_keeps_shape():
    clean = _labels(12, n=600).reshape(20, 30)
    t = transition_matrix("symmetric", 10, 0.5)
    a = apply_transition(clean, t, np.random.default_rng(13))
    b = apply_transition(clean, t, np.random.default_rng(13))
    c = apply_transition(clean, t, np.random.default_rng(14))
    assert a.shape == (20, 30) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_apply_transition_rejects_bad_input():
    t = transition_matrix("symmetric", 3, 0.2)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="labels"):
        apply_transition(np.array([0, 3]), t, rng)
    with pytest.raises(ValueError, match="labels"):
        apply_transition(np.array([0.0, 1.0]), t, rng)
    with pytest.raises(ValueError, match="row-stochastic"):
        apply_transition(np.array([0, 1]), np.full((3, 3), 0.5), rng)
    with pytest.raises(ValueError, match="square"):
        apply_transition(np.array([0, 1]), np.ones((3, 1)), rng)


# ---- measure_noise -----------------------------------------------------------------------------


def test_measure_noise_by_hand_and_json_able():
    clean = np.array([0, 0, 0, 1, 1, 3])
    noisy = np.array([0, 1, 1, 1, 0, 3])
    stats = measure_noise(clean, noisy, 4)
    assert stats == {
        "flip_rate": 0.5,
        "num_labels": 6,
        "confusion": [[1, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]],
        "per_class_flip_rate": [2 / 3, 0.5, None, 0.0],
    }
    json.dumps(stats)  # plain Python values only
    assert type(stats["confusion"][0][0]) is int and type(stats["flip_rate"]) is float


def test_measure_noise_empty_and_mismatched():
    stats = measure_noise(np.array([], dtype=int), np.array([], dtype=int), 2)
    assert stats["flip_rate"] is None and stats["num_labels"] == 0
    assert stats["per_class_flip_rate"] == [None, None]
    with pytest.raises(ValueError, match="size"):
        measure_noise(np.array([0, 1]), np.array([0]), 2)


# ---- draw_rate ---------------------------------------------------------------------------------


def test_draw_rate_fixed_consumes_no_draw():
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    assert draw_rate(0.3, rng, "noise.rate") == 0.3
    assert draw_rate(1, rng, "noise.rate") == 1.0
    assert rng.bit_generator.state == before


def test_draw_rate_range_per_site():
    rates = [draw_rate([0.1, 0.5], np.random.default_rng(site), "noise.rate") for site in range(20)]
    assert all(0.1 <= r <= 0.5 for r in rates)
    assert len(set(rates)) == 20  # every site its own rate
    assert max(rates) - min(rates) > 0.2  # spread over the range, not stuck at one end
    assert draw_rate((0.2, 0.2), np.random.default_rng(0), "noise.rate") == 0.2
    same = [draw_rate(np.array([0.0, 1.0]), np.random.default_rng(3), "k") for _ in range(2)]
    assert same[0] == same[1]  # seeded


@pytest.mark.parametrize("rate", [-0.1, 1.1, math.nan, True, "0.2", None, [0.5], [0.1, 0.2, 0.3],
                                  [0.5, 0.1], [-0.1, 0.5], [0.1, 2.0], ["a", "b"], "ab"])
def test_draw_rate_errors_name_the_key(rate):
    with pytest.raises(ConfigError) as err:
        draw_rate(rate, np.random.default_rng(0), f"{KEY}.rate")
    assert err.value.key == f"{KEY}.rate"


def test_kinds():
    assert KINDS == ("symmetric", "pairflip", "matrix")
