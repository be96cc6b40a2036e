"""A loaded-dataset site's training labels degraded: class flips by a transition matrix or
SNOW's mask noise, or K simulated annotators whose votes are fused (majority, Dawid-Skene,
STAPLE), with what each did measured against the clean labels."""

from __future__ import annotations

import numpy as np

from snowfed import seeds
from snowfed.sim.federation.annotators import (
    dawid_skene,
    fused_accuracy,
    majority_vote,
    pixel_majority,
    simulate_votes,
    staple,
)
from snowfed.sim.noise.classes import apply_transition, draw_rate, measure_noise, transition_matrix
from snowfed.sim.noise.masks import SnowNoise, degrade_dataset


def degrade_site(task: str, noise: dict, annotators: dict | None, targets: np.ndarray,
                 num_classes: int, seed: int, i: int) -> tuple[np.ndarray, dict]:
    """Site i's degraded training labels (of `targets`, its clean ones) and what was done:
    `noise` by task (datasets.Site.noise), or the `annotators`' fused votes when set."""
    if task == "classification":
        rng = np.random.default_rng(seeds.class_noise(seed, i))
        return _degrade_classification(noise, annotators, targets, num_classes, rng)
    return _degrade_segmentation(noise, annotators, targets, seeds.label_noise(seed, i))


def _degrade_classification(noise: dict, annotators: dict | None, clean: np.ndarray, num_classes: int,
                            rng) -> tuple[np.ndarray, dict]:
    if annotators is None:
        rate = draw_rate(noise["rate"], rng, "noise.rate")
        T = transition_matrix(noise["kind"], num_classes, rate, noise.get("matrix"))
        noisy = apply_transition(clean, T, rng)
        return noisy, {**measure_noise(clean, noisy, num_classes), "configured_rate": rate}
    matrices, rates = [], []
    for spec in annotators["noise"]:
        rates.append(draw_rate(spec["rate"], rng, "annotators.noise.rate"))
        matrices.append(transition_matrix(spec["kind"], num_classes, rates[-1], spec.get("matrix")))
    votes = simulate_votes(clean, matrices, rng)
    mv = majority_vote(votes, num_classes)
    fused = mv if annotators["fusion"] == "majority" else dawid_skene(votes, num_classes).labels
    return fused, {
        **measure_noise(clean, fused, num_classes),
        "annotators": {
            "count": len(matrices), "fusion": annotators["fusion"], "configured_rates": rates,
            "annotator_accuracy": [fused_accuracy(votes[:, k], clean) for k in range(votes.shape[1])],
            "majority_accuracy": fused_accuracy(mv, clean),
            "fused_accuracy": fused_accuracy(fused, clean),
        },
    }


def _degrade_segmentation(noise: dict, annotators: dict | None, instances: np.ndarray,
                          seed: int) -> tuple[np.ndarray, dict]:
    clean = (instances > 0).astype(np.uint8)
    if annotators is None:
        return degrade_dataset(instances, SnowNoise(**noise), seed=seed)
    masks = np.stack([degrade_dataset(instances, SnowNoise(**spec), seed=seeds.annotator(seed, k))[0]
                      for k, spec in enumerate(annotators["noise"])])
    fused = pixel_majority(masks) if annotators["fusion"] == "majority" else staple(masks).mask
    fused = fused.astype(np.uint8)
    return fused, {
        "pixel_disagreement": float(np.mean(fused != clean)),
        "annotators": {
            "count": len(masks), "fusion": annotators["fusion"],
            "annotator_accuracy": [fused_accuracy(m, clean) for m in masks],
            "majority_accuracy": fused_accuracy(pixel_majority(masks), clean),
            "fused_accuracy": fused_accuracy(fused, clean),
        },
    }
