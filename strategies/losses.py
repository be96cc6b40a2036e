"""Losses of local strategies: (logits NCHW, labels NHW int64) -> scalar tensor, or for
classification (logits NC, labels N): cross_entropy, gce, sce and bootstrap work on both.
`coteaching` (strategies.coteaching) also takes the batch's images: it trains a peer network.

Each registry entry is a `Part` whose factory takes the validated parameters and returns the
loss callable. Labels are class indices (0 = background); a pixel is annotated when label > 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from snowfed.models import tile_scores

from .coteaching import CoTeaching
from .parts import Param, Part, choice, integer, number

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# SCE's reverse cross-entropy takes log of the one-hot label; Wang et al. clamp log(0) to A = -4.
SCE_LOG_ZERO = -4.0


def cross_entropy() -> Loss:
    """Pixel cross-entropy, SNOW's segLoss."""
    return F.cross_entropy


def _label_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per pixel, (B, H, W)."""
    return F.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)


def gce(q: float) -> Loss:
    """Generalized cross-entropy (Zhang & Sabuncu 2018): mean (1 - p_y^q) / q per pixel.

    q -> 0 gives cross-entropy, q = 1 the MAE (noise-robust but slow to fit); 0.7 is the paper's.
    """

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # 1 - p^q = -expm1(q log p): exact for small q, where 1 - exp(.) would cancel out.
        return (-torch.expm1(q * _label_log_prob(logits, labels)) / q).mean()

    return loss


def sce(alpha: float, beta: float) -> Loss:
    """Symmetric cross-entropy (Wang et al. 2019): alpha * CE + beta * reverse CE.

    Reverse CE = -sum_k p_k log y_k with log 0 clamped to A, i.e. -A * (1 - p_y) per pixel.
    """

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = _label_log_prob(logits, labels)
        return alpha * (-log_p).mean() + beta * (-SCE_LOG_ZERO * (1.0 - log_p.exp())).mean()

    return loss


def bootstrap(beta: float, mode: str) -> Loss:
    """Bootstrapping (Reed et al. 2015): the target mixes the label (weight beta) with the
    network's own prediction: soft = its probabilities, hard = its argmax class.

    As in the paper, the prediction term is not detached, so soft bootstrapping is
    cross-entropy plus (1 - beta) times a minimum-entropy regulariser. Paper values: soft 0.95,
    hard 0.8. beta = 1 is cross-entropy.
    """

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1)
        label_term = -log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
        if mode == "soft":
            own_term = -(log_p.exp() * log_p).sum(dim=1)
        else:
            own_term = -log_p.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
        return (beta * label_term + (1.0 - beta) * own_term).mean()

    return loss


def tile_labels(labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """SNOW's tile label: min(#annotated pixels / threshold, 1) per tile, (B,)."""
    return ((labels > 0).sum(dim=(-2, -1)).float() / threshold).clamp(max=1.0)


def detection_logit(logits: torch.Tensor) -> torch.Tensor:
    """The tile's "contains an object" logit, (B,), from SNOW's detection head.

    As in the reference code (adfoucart/deephisto, network/ShortRes.py and BaseNetwork.py), the
    tile scores are the per-class maxima of the segmentation logits over H, W
    (snowfed.models.tile_scores) and the detection is their softmax. With 2 classes its
    foreground logit is max(fg) - max(bg), so the reference's 2-class softmax cross-entropy is
    exactly BCE on this logit; more foreground classes are pooled by logsumexp.
    """
    scores = tile_scores(logits)
    return torch.logsumexp(scores[:, 1:], dim=1) - scores[:, 0]


def weak(threshold: float) -> Loss:
    """SNOW's detLoss alone (Weak): BCE between the detection logit and the tile label.

    Only each class's max pixel in a tile gets a gradient: the pixel layout is not supervised.
    """

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(detection_logit(logits), tile_labels(labels, threshold))

    return loss


def soft_weak(threshold: float) -> Loss:
    """SNOW's SoftWeak: detLoss + segLoss (pixel cross-entropy), unweighted as in SNOW."""
    det = weak(threshold)

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return det(logits, labels) + F.cross_entropy(logits, labels)

    return loss


# SNOW's 80 px: a tile with >= 80 annotated pixels counts as fully positive. It is a pixel count
# at the dataset's resolution (GlaS at 20x in SNOW): it scales with pixel area, so halving the
# resolution calls for 20.
THRESHOLD = Param(80.0, number(0.0, low_open=True))

LOSSES: dict[str, Part] = {
    "cross_entropy": Part(cross_entropy),
    "gce": Part(gce, {"q": Param(0.7, number(0.0, 1.0, low_open=True))}),
    "sce": Part(sce, {"alpha": Param(0.1, number(0.0)), "beta": Param(1.0, number(0.0))}),
    "bootstrap": Part(
        bootstrap, {"beta": Param(0.95, number(0.0, 1.0)), "mode": Param("soft", choice("soft", "hard"))}
    ),
    "coteaching": Part(CoTeaching, {"forget_rate": Param(0.2, number(0.0, 0.95)),
                                    "warmup_steps": Param(100, integer(1))},
                       tasks=("classification",),  # it selects whole samples
                       not_private="its peer network trains without DP"),
    "weak": Part(weak, {"threshold": THRESHOLD}, tasks=("segmentation",)),
    "soft_weak": Part(soft_weak, {"threshold": THRESHOLD}, tasks=("segmentation",)),
}
