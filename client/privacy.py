"""Local differential privacy at a site: DP-SGD with Opacus (`privacy=dp_sgd`).

The privacy unit is one training image of the site. Each step draws a Poisson sample of the
site's images (each kept with probability q = batch_size / num_images, as Opacus's accountant
assumes), crops one tile from each, and lets Opacus clip every example's gradient to
`max_grad_norm` and add Gaussian noise of std noise_multiplier x max_grad_norm
(`GradSampleModule` + `DPOptimizer`). Opacus's RDP accountant turns (noise_multiplier, q, the
site's total number of steps over all rounds it trained in) into the epsilon spent at `delta`.

Snowfed drives Opacus's pieces itself rather than `PrivacyEngine.make_private` because its
trainer draws tiles with a seeded generator, not from a DataLoader; the sampling, clipping,
noise and accounting are Opacus's.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from snowfed.rundir import atomic_write_json


@dataclass(frozen=True)
class DPSettings:
    """One site's resolved DP-SGD parameters (the noise multiplier may come from a target
    epsilon, so it is per site: sites differ in size, hence in sample rate)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def resolve_dp(
    privacy: Mapping[str, Any], num_images: int, batch_size: int, planned_steps: int
) -> DPSettings:
    """A site's settings from `privacy.*`: q = batch_size / num_images; with `target_epsilon`
    the noise multiplier is Opacus's smallest one that spends it over `planned_steps`."""
    # Opacus is imported where it is used: importing it takes ~1.6 s, which every Ray actor would
    # pay at start-up even in runs without DP-SGD.
    from opacus.accountants.utils import get_noise_multiplier

    sample_rate = min(1.0, batch_size / num_images)
    sigma = privacy.get("noise_multiplier")
    if privacy.get("target_epsilon") is not None:
        sigma = get_noise_multiplier(
            target_epsilon=float(privacy["target_epsilon"]), target_delta=float(privacy["delta"]),
            sample_rate=sample_rate, steps=planned_steps, accountant="rdp",
        )
    return DPSettings(float(sigma), float(privacy["max_grad_norm"]), sample_rate,
                      float(privacy["delta"]))


def epsilon(settings: DPSettings, steps: int) -> float:
    """Opacus's RDP accountant: epsilon spent after `steps` DP-SGD steps at `delta`."""
    from opacus.accountants import RDPAccountant

    if steps == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(settings.noise_multiplier, settings.sample_rate, steps)]
    return float(accountant.get_epsilon(settings.delta))


class PrivacyLedger:
    """The site's count of DP-SGD steps over all rounds, on disk next to its data (it must
    survive actors and resumed runs like the rest of the node's memory)."""

    def __init__(self, path: Path):
        self.path = path

    def steps(self) -> int:
        return json.loads(self.path.read_text())["steps"] if self.path.exists() else 0

    def add(self, steps: int, settings: DPSettings) -> int:
        total = self.steps() + steps
        atomic_write_json(self.path, {"steps": total, **settings.as_dict()})
        return total


def dp_sgd_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    num_images: int,
    step_loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    settings: DPSettings,
    lrs: list[float],
    generator: torch.Generator,
) -> list[float]:
    """One DP-SGD step per learning rate in `lrs`; `step_loss(model, image_indices)` is the
    strategy's loss on tiles of those images (mean over the batch). Returns each step's loss
    (nan for an empty sample)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    device = trainable[0].device
    noise = torch.Generator(device=device).manual_seed(
        int(torch.randint(2**62, (1,), generator=generator)))
    private = GradSampleModule(model, loss_reduction="mean")
    dp_optimizer = DPOptimizer(
        optimizer, noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
        expected_batch_size=max(1, round(settings.sample_rate * num_images)), generator=noise,
    )
    losses = []
    try:
        for lr in lrs:
            for group in dp_optimizer.param_groups:
                group["lr"] = lr
            dp_optimizer.zero_grad(set_to_none=True)
            # Poisson sampling: every image independently with probability q
            idx = torch.nonzero(torch.rand(num_images, generator=generator) < settings.sample_rate)
            idx = idx.flatten()
            if len(idx):
                loss = step_loss(private, idx)
                with warnings.catch_warnings():
                    # Opacus's hooks on a first layer whose input needs no gradient: harmless
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                losses.append(loss.item())
            else:  # an empty sample still takes a (pure noise) step, as the accountant counts it
                for p in trainable:
                    p.grad_sample = torch.zeros((0, *p.shape), device=device)
                losses.append(float("nan"))
            dp_optimizer.step()
    finally:
        private._close()  # the model goes back to plain use (evaluation, the next round)
    return losses
