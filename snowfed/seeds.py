"""Every random stream of a run derives from the run's `seed` here, one function per stream:
no two streams share a seed by accident, and a test that needs a stream calls the function
instead of repeating the arithmetic. The multipliers are primes. Changing any of them changes
every result (tests/test_golden.py fails, as it should)."""

from __future__ import annotations


def site_images(seed: int, site: int) -> int:
    """The synthetic images of site `site` (its test, val and training images, in that order)."""
    return seed * 7919 + site


def server_images(seed: int, site: int) -> int:
    """The server's clean images in site `site`'s appearance (aggregation=quality)."""
    return seed * 7919 + 500_009 + site


def label_noise(seed: int, site: int) -> int:
    """The degradation of site `site`'s segmentation masks."""
    return seed * 104729 + site


def annotator(site_noise: int, k: int) -> int:
    """Annotator `k`'s masks at a site whose own stream is `site_noise` (`label_noise`)."""
    return site_noise * 11 + k


def class_noise(seed: int, site: int) -> list[int]:
    """The label flips (and drawn rate) of site `site`: entropy for numpy's default_rng."""
    return [seed, 104729, site]


def val_split(seed: int, site: int) -> int:
    """Site `site`'s held-out split of a loaded dataset."""
    return seed * 31 + site


def node_round(seed: int, server_round: int, partition_id: int, salt: int = 0) -> int:
    """One node's training in one round: the same whichever Ray actor (or the in-process loop)
    computes it; `salt` gives a phase of the round (personalisation) a stream of its own."""
    return seed * 1_000_003 + server_round * 1009 + partition_id + salt
