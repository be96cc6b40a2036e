"""Networks shared by every site, and the registry the configs name them by.

Segmentation: ShortRes. Classification: SmallCNN and ResNet (a CIFAR-style ResNet sized for
2-core CPUs and 8x8 to 64x64 images; torchvision's ImageNet ResNets start with a stride-4 stem
and 11M parameters, too much for both). Every model lists its `named_stages` input-to-output, so
`freeze_stages: k` means the same thing for all of them.

ShortRes follows the SNOW paper (Foucart et al., ISBI 2019; reference code adfoucart/deephisto,
network/ShortRes.py): a 1x1 widening conv, residual units of 3 x (3x3 conv + LeakyReLU) with an
identity skip, two 2x2 max-poolings, two stride-2 transposed convs, a 1x1 conv to the classes.
Differences from the reference, all deliberate:
- additive U-Net skips from encoder to decoder at equal resolution (``skips=True``, the default):
  they restore the outlines lost by pooling; ``skips=False`` gives the paper's plain network;
- the bottleneck residual unit runs after the second pooling (the reference stacks two units
  before it), so each resolution has one unit on the way down and one on the way up;
- the head is linear (the reference puts a LeakyReLU on the logits);
- GroupNorm after every conv by default (``norm="group"``; ``norm="none"`` is the paper's
  network). Without it the tiles' bright, uncentred pixels reach the head as a common offset
  that drowns the foreground/background contrast, and Adam spends 50-80 steps predicting only
  background before the contrast wins (docs/results/learning.md). Never BatchNorm: batch
  statistics break DP-SGD (Opacus) and mix sites' statistics under FedAvg.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

LEAKY_SLOPE = 0.2  # tf.nn.leaky_relu's default, which the reference network uses
NORMS = ("none", "group")


def _norm(norm: str, channels: int) -> nn.Module:
    # gcd keeps GroupNorm valid for any width; 8 groups at the usual widths (16, 32, 64)
    return nn.GroupNorm(math.gcd(8, channels), channels) if norm == "group" else nn.Identity()


def _conv_act(cin: int, cout: int, kernel: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=norm == "none"),
        _norm(norm, cout),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


class ResUnit(nn.Module):
    """x + 3 x (3x3 conv [+ GroupNorm] + LeakyReLU), at constant width and resolution."""

    def __init__(self, width: int, norm: str = "none"):
        super().__init__()
        self.body = nn.Sequential(*(_conv_act(width, width, 3, norm) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Down(nn.Sequential):
    """2x2 max-pooling, then a residual unit at the halved resolution."""

    def __init__(self, width: int, norm: str = "none"):
        super().__init__(OrderedDict(pool=nn.MaxPool2d(2), res=ResUnit(width, norm)))


class Up(nn.Module):
    """Stride-2 transposed conv + LeakyReLU, add the encoder features (if any), residual unit."""

    def __init__(self, width: int, norm: str = "none"):
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(width, width, 2, stride=2, bias=norm == "none"),
            _norm(norm, width),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        self.res = ResUnit(width, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        return self.res(x if skip is None else x + skip)


class ShortRes(nn.Module):
    """Small residual encoder-decoder of the SNOW paper (Foucart et al.).

    ``encoder`` (stem, enc1, enc2, bottleneck) maps (B, C, H, W) to (B, width, H/4, W/4) on its
    own, for autoencoder pre-training; ``stages`` (``named_stages`` with their names: stem, enc1,
    enc2, bottleneck, up1, up2, head) lists every stage input-to-output, so that transfer learning
    can freeze ``model.stages[:k]``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        width: int = 64,
        norm: str = "group",
        skips: bool = True,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.skips = skips
        self.encoder = nn.Sequential(
            OrderedDict(
                stem=_conv_act(in_channels, width, 1, norm),
                enc1=ResUnit(width, norm),  # H
                enc2=Down(width, norm),  # H/2
                bottleneck=Down(width, norm),  # H/4
            )
        )
        self.up1 = Up(width, norm)  # H/4 -> H/2
        self.up2 = Up(width, norm)  # H/2 -> H
        self.head = nn.Conv2d(width, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init for the LeakyReLU convs; without norm, the last conv of each residual branch is
        # scaled down so that the five units (and the skips) do not blow the activations up at
        # the start (GroupNorm undoes the scale; scaling its weight instead learnt slower), and
        # the head starts near zero so the first Adam steps at lr 1e-3 are not saturated.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, ResUnit):
                    m.body[-1][0].weight.mul_(0.1)
        nn.init.normal_(self.head.weight, std=0.01)

    @property
    def named_stages(self) -> list[tuple[str, nn.Module]]:
        decoder = [("up1", self.up1), ("up2", self.up2), ("head", self.head)]
        return [*self.encoder.named_children(), *decoder]

    @property
    def stages(self) -> list[nn.Module]:
        return [module for _, module in self.named_stages]

    def reconstruction_decoder(self) -> nn.Module:
        """A fresh decoder from the encoder's features back to the image (sigmoid, [0, 1]), for
        autoencoder pre-training. It has no skips: with them the identity is trivially learned
        through ``enc1`` and the bottleneck would learn nothing."""
        width, channels = self.head.in_channels, self.encoder.stem[0].in_channels
        norm = "group" if isinstance(self.encoder.stem[1], nn.GroupNorm) else "none"
        return nn.Sequential(Up(width, norm), Up(width, norm), nn.Conv2d(width, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"ShortRes needs H and W divisible by 4, got {tuple(x.shape[-2:])}")
        stem, enc1, enc2, bottleneck = self.encoder
        f1 = enc1(stem(x))
        f2 = enc2(f1)
        x = bottleneck(f2)
        x = self.up1(x, f2 if self.skips else None)
        x = self.up2(x, f1 if self.skips else None)
        return self.head(x)


def stage_keys(model: nn.Module, k: int) -> list[str]:
    """The state-dict keys (parameters and buffers) of the model's first k stages."""
    stages = model.named_stages
    if not 0 <= k <= len(stages):
        names = ", ".join(name for name, _ in stages)
        raise ValueError(f"cannot take the first {k} stages of a model with {len(stages)} ({names})")
    owned = {id(t) for _, stage in stages[:k] for t in [*stage.parameters(), *stage.buffers()]}
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return [key for key in model.state_dict() if id(tensors.get(key)) in owned]


def tile_scores(seg_logits: torch.Tensor) -> torch.Tensor:
    """Detection head of SNOW's Weak/SoftWeak strategies: per-class max over H, W -> (B, K)."""
    return seg_logits.amax(dim=(-2, -1))


class _Staged(nn.Module):
    """A classifier made of named stages run in order (the `named_stages` protocol)."""

    @property
    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return list(self.body.named_children())

    @property
    def stages(self) -> list[nn.Module]:
        return [module for _, module in self.named_stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _head(width: int, num_classes: int) -> nn.Sequential:
    # global average pooling: any input size (8x8 digits, 28x28 MedMNIST, 64x64 tiles) works
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class SmallCNN(_Staged):
    """Two conv blocks (2 x (3x3 conv [+ GroupNorm] + ReLU), then 2x2 max-pooling) and a linear
    head on globally pooled features: the small CNN of Flower's quickstarts, size-agnostic.
    Stages: block1, block2, head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32,
                 norm: str = "group"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")

        def block(cin: int, cout: int) -> nn.Sequential:
            layers = []
            for c in (cin, cout):
                conv = nn.Conv2d(c, cout, 3, padding=1, bias=norm == "none")
                layers += [conv, _norm(norm, cout), nn.ReLU()]
            return nn.Sequential(*layers, nn.MaxPool2d(2, ceil_mode=True))

        self.body = nn.Sequential(OrderedDict(
            block1=block(in_channels, width),
            block2=block(width, 2 * width),
            head=_head(2 * width, num_classes),
        ))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs [+ GroupNorm] with an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=norm == "none"),
            _norm(norm, cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout),
        )
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(_Staged):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3 stem, three stages of `depth`
    basic blocks at widths w, 2w, 4w (the last two halve the resolution), global pooling, linear
    head. GroupNorm instead of BatchNorm when `norm: group` (Opacus, and no site statistics mixed
    by FedAvg). Stages: stem, stage1, stage2, stage3, head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16, depth: int = 1,
                 norm: str = "group"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*(BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, norm)
                                   for i in range(depth)))

        self.body = nn.Sequential(OrderedDict(
            stem=nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"),
                               _norm(norm, width), nn.ReLU()),
            stage1=stage(width, width, 1),
            stage2=stage(width, 2 * width, 2),
            stage3=stage(2 * width, 4 * width, 2),
            head=_head(4 * width, num_classes),
        ))


MODELS: dict[str, type[nn.Module]] = {"shortres": ShortRes, "smallcnn": SmallCNN, "resnet": ResNet}
# which task each model solves: dense per-pixel logits or one logit vector per image
MODEL_TASKS = {"shortres": "segmentation", "smallcnn": "classification", "resnet": "classification"}


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered network by its config name."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}") from None
    return cls(**kwargs)


def model_from_config(model_cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The network a `model` config (its name and constructor parameters) describes: what the
    server, every node and the reference runs build (the checks are the simulator's, up front:
    sim.federation.sites.configured_model)."""
    params = {k: v for k, v in model_cfg.items() if k != "name"}
    return build_model(model_cfg["name"], num_classes=int(num_classes), **params)
