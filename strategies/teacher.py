"""Teacher-student: a teacher fills in the annotations a node's labels miss.

Each training batch (after sampling, label transform and augmentation) goes through the teacher.
Where the teacher is confident, its predicted class fills pixels the node's labels leave as
background; an annotated pixel is never changed (SNOW's lesson: missing annotations hurt most,
so the teacher only adds). With `unit: pixel` each pixel needs confidence >= threshold; with
`unit: tile` a tile's whole prediction is used only when its mean confidence is >= threshold.
`distill_weight > 0` adds Hinton-style distillation: temperature^2 x KL(teacher || student) of
the softened pixel distributions.

Teachers (the part name is where the teacher comes from):
- `global`: the global model the node received this round, before local training;
- `clean`: trained once on the node's verified images (the site's `clean_fraction`), starting
  from the model of the node's first round, with the strategy's optimiser, tile and batch sizes.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from .parts import Param, Part, choice, integer, number
from .samplers import RandomTileSampler

TEACHER_KEY = "teacher"  # where a trained teacher's weights sit in the node's memory


def pseudo_labels(
    teacher_logits: torch.Tensor, labels: torch.Tensor, threshold: float, unit: str
) -> torch.Tensor:
    """labels (B, H, W) with unannotated pixels filled by the teacher's confident classes."""
    confidence, predicted = F.softmax(teacher_logits, dim=1).max(dim=1)
    if unit == "pixel":
        accepted = confidence >= threshold
    else:
        accepted = (confidence.mean(dim=(1, 2)) >= threshold)[:, None, None].expand_as(labels)
    fill = accepted & (labels == 0) & (predicted > 0)
    return torch.where(fill, predicted, labels)


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """temperature^2 x mean over pixels of KL(teacher || student), both softened."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    return temperature**2 * kl.mean()


class NoTeacher:
    """The node's labels as they are."""

    filled_fraction = 0.0

    def prepare(self, model, memory, strategy, generator, device) -> None:
        pass

    def relabel(self, x: torch.Tensor, labels: torch.Tensor):
        return labels, None

    def extra_loss(self, student_logits, teacher_logits) -> torch.Tensor | float:
        return 0.0


class Teacher(NoTeacher):
    def __init__(
        self,
        source: str,
        images: np.ndarray | None,
        labels: np.ndarray | None,
        threshold: float,
        unit: str,
        temperature: float,
        distill_weight: float,
        steps: int = 0,
    ):
        self.source, self.threshold, self.unit = source, threshold, unit
        self.temperature, self.distill_weight, self.steps = temperature, distill_weight, steps
        self.sampler = None
        if source == "clean":
            if images is None or len(images) == 0:
                raise ValueError("teacher 'clean' needs verified images at this node: give the "
                                 "hospital a clean_fraction > 0")
            self.sampler = RandomTileSampler(images, labels)
        self.net: torch.nn.Module | None = None
        self.filled = self.pixels = 0  # pseudo-labelled and seen pixels this round

    def prepare(self, model, memory, strategy, generator, device) -> None:
        """Set this round's teacher: a frozen copy of the received or the trained model."""
        if self.net is None:
            self.net = copy.deepcopy(model)
        if self.source == "global":
            self.net.load_state_dict(model.state_dict())
        else:
            if TEACHER_KEY not in memory:
                memory[TEACHER_KEY] = self._train(model, strategy, generator, device)
            self.net.load_state_dict(memory[TEACHER_KEY])
        self.net.to(device).eval().requires_grad_(False)
        self.filled = self.pixels = 0

    def _train(self, model, strategy, generator, device) -> dict[str, torch.Tensor]:
        net = copy.deepcopy(model).to(device).train().requires_grad_(True)
        optimizer = strategy.optimizer(net.parameters())
        spec = strategy.spec
        for _ in range(self.steps):
            x, y = self.sampler(spec.batch_size, spec.tile_size, generator)
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def relabel(self, x: torch.Tensor, labels: torch.Tensor):
        logits = self.net(x)
        merged = pseudo_labels(logits, labels, self.threshold, self.unit)
        # a tensor sum: no host sync per step on a GPU; read once per round (filled_fraction)
        self.filled += (merged != labels).sum()
        self.pixels += labels.numel()
        return merged, logits

    def extra_loss(self, student_logits, teacher_logits) -> torch.Tensor | float:
        if not self.distill_weight:
            return 0.0
        return self.distill_weight * distillation(student_logits, teacher_logits, self.temperature)

    @property
    def filled_fraction(self) -> float:
        return float(self.filled) / self.pixels if self.pixels else 0.0


def _common() -> dict[str, Param]:
    return {
        "threshold": Param(0.9, number(0.5, 1.0)),
        "unit": Param("pixel", choice("pixel", "tile")),
        "temperature": Param(2.0, number(0.0, low_open=True)),
        "distill_weight": Param(0.0, number(0.0)),
    }


TEACHERS: dict[str, Part] = {
    "none": Part(lambda images, labels: NoTeacher()),
    "global": Part(lambda images, labels, **p: Teacher("global", None, None, **p), _common(),
                   tasks=("segmentation",)),
    "clean": Part(
        lambda images, labels, **p: Teacher("clean", images, labels, **p),
        {**_common(), "steps": Param(200, integer(1))},
        tasks=("segmentation",),
        not_private="the teacher's training is not private",
    ),
}
