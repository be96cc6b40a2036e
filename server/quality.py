"""Label-quality-aware FedAvg: weigh each site's update by how well it does on a small clean
validation set the server holds.

None of Flower's strategies looks at label quality: FedAvg weighs a site by its number of
examples, so one big hospital with missing annotations pulls the global model towards
"background" however clean the small sites are. Here the server scores every update on its own
clean images (the class-balanced pixel cross-entropy of the updated model, `LossProbe`), turns
the scores into qualities relative to the best update of the round,

    quality_i = exp(-(loss_i - min_j loss_j) / temperature)     (1 for the round's best site)

and averages with weights num_examples_i * quality_i (sites below `min_quality` get weight 0;
the best site always counts). The estimates ride along in each site's train record
(`quality`, `quality-loss`) and the summary compares them with the sites' true label noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from snowfed.evaluation import images_to_tensor

QUALITY_WEIGHT = "quality-weight"  # the key FedAvg's weighted mean reads (num-examples x quality)


class LossProbe:
    """Class-balanced pixel cross-entropy of a model's weights on a fixed clean image set: the
    mean over classes of each class's mean pixel loss. Plain cross-entropy is dominated by the
    background, so it would rank an update that has learnt "everything is background" (missing
    annotations) above one that finds the objects; balanced, a missed object costs as much as
    a false one (bounding boxes)."""

    def __init__(
        self,
        model: torch.nn.Module,
        images: np.ndarray,
        masks: np.ndarray,
        device: torch.device | str = "cpu",
    ):
        self.model, self.device = model, device
        self.x = images_to_tensor(images).to(device)
        self.y = torch.from_numpy(np.asarray(masks, dtype=np.int64)).to(device)

    @torch.no_grad()
    def __call__(self, arrays: ArrayRecord) -> float:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        self.model.eval()
        pixel_loss = torch.cat([
            F.cross_entropy(self.model(self.x[i : i + 16]), self.y[i : i + 16], reduction="none")
            for i in range(0, len(self.x), 16)
        ])
        per_class = [pixel_loss[self.y == c].mean() for c in self.y.unique()]
        return float(torch.stack(per_class).mean())


class QualityAwareFedAvg(FedAvg):
    """FedAvg whose weights are num-examples x the update's estimated label quality."""

    def __init__(
        self,
        probe: Callable[[ArrayRecord], float],
        temperature: float = 0.05,
        min_quality: float = 0.0,
        weighted_by_key: str = "num-examples",
        **fedavg_kwargs: Any,
    ):
        super().__init__(weighted_by_key=QUALITY_WEIGHT, **fedavg_kwargs)
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.probe = probe
        self.temperature = temperature
        self.min_quality = min_quality
        self.size_key = weighted_by_key

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        losses = [self.probe(m.content["arrays"]) for m in valid]
        for msg, quality, loss in zip(valid, self.qualities(losses), losses):
            metrics = next(iter(msg.content.metric_records.values()))
            metrics["quality-loss"] = loss
            metrics["quality"] = quality
            metrics[QUALITY_WEIGHT] = float(metrics[self.size_key]) * quality
        return super().aggregate_train(server_round, replies)

    def qualities(self, losses: list[float]) -> list[float]:
        """exp(-(loss - best) / temperature), zeroed below `min_quality` (never the best)."""
        if not losses:
            return []
        best = min(losses)
        q = [math.exp(-(loss - best) / self.temperature) for loss in losses]
        return [x if x >= self.min_quality or x == 1.0 else 0.0 for x in q]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 sites or a constant side)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def _label_f1(label_noise: Mapping[str, float]) -> float:
    p, r = float(label_noise["pixel_precision"]), float(label_noise["pixel_recall"])
    return 2 * p * r / (p + r) if p + r else 0.0


def quality_report(
    records: list[dict[str, Any]], nodes: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any] | None:
    """Each site's estimated quality (mean over rounds) beside its true label quality (the pixel
    F1 of its training labels against the clean masks), and their rank correlation. None when
    no round carried quality estimates."""
    estimates: dict[str, list[float]] = {}
    for r in records:
        if r.get("scope") == "node" and r.get("phase") == "train" and "quality" in r:
            estimates.setdefault(r["node"], []).append(float(r["quality"]))
    if not estimates:
        return None
    sites = sorted(estimates)
    estimated = [float(np.mean(estimates[s])) for s in sites]
    true = [_label_f1(nodes[s]["label_noise"]) for s in sites]
    return {
        "sites": {
            s: {"estimated_quality": round(e, 4), "true_label_quality": round(t, 4),
                "noise_profile": nodes[s].get("noise_profile")}
            for s, e, t in zip(sites, estimated, true)
        },
        "spearman": spearman(estimated, true),
    }
