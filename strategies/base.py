"""A local strategy is a composition of small parts chosen by name in config.

SNOW's own code made every strategy a flag of one big train(); here each part (sampler, loss,
label transform, augmentation, initialisation, teacher, optimiser) is looked up in its registry
and can be tested alone. All but the optimiser are `Part`s: a name plus a `<part>_params`
mapping, checked against the part's schema (unknown names, bad values) when the strategy is
built from its config mapping.

A node's strategy keeps what must survive between rounds (its initial weights, a trained
teacher) in a `memory` mapping the caller owns; the ClientApp writes it next to the node's data
(`node-memory/` in the store), so it follows the node to whichever Ray actor runs it and
survives a resumed run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from snowfed.config import ConfigError, require_int, require_number
from snowfed.models import stage_keys
from snowfed.store import take_rows

from .augment import AUGMENTATIONS, Augmentation
from .init import INITS, Init
from .losses import LOSSES, Loss
from .parts import Part, RoundLoss
from .samplers import SAMPLERS
from .teacher import TEACHERS, NoTeacher
from .transforms import LABEL_TRANSFORMS, LabelTransform

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
LABELS_OF = {"segmentation": "masks", "classification": "one label per image"}  # task -> labels
# How the learning rate moves over a run's local steps (docs/results/learning.md, section 5):
# `cosine` anneals it from `lr` to 0 over rounds x local_steps, so that the last rounds settle;
# `constant` keeps `lr` throughout (the behaviour before schedules existed).
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_LR_SCHEDULE = "cosine"

# field -> registry of the parts configured by `<field>` and `<field>_params`
PARTS: dict[str, dict[str, Part]] = {
    "sampler": SAMPLERS,
    "loss": LOSSES,
    "label_transform": LABEL_TRANSFORMS,
    "augmentation": AUGMENTATIONS,
    "init": INITS,
    "teacher": TEACHERS,
}
# default "none" when a config leaves them out
OPTIONAL_PARTS = ("label_transform", "augmentation", "init", "teacher")
INIT_KEY = "init"  # where the node's initial weights sit in its memory


@dataclass(frozen=True)
class StrategySpec:
    """The validated config of a local strategy (plain values, picklable, JSON-able).

    `*_params` hold every parameter of the named part, defaults filled in by `from_config`.
    """

    name: str
    sampler: str
    loss: str
    optimizer: str
    lr: float
    local_steps: int
    batch_size: int
    tile_size: int
    sampler_params: dict[str, Any] = field(default_factory=dict)
    loss_params: dict[str, Any] = field(default_factory=dict)
    label_transform: str = "none"
    label_transform_params: dict[str, Any] = field(default_factory=dict)
    augmentation: str = "none"
    augmentation_params: dict[str, Any] = field(default_factory=dict)
    init: str = "none"
    init_params: dict[str, Any] = field(default_factory=dict)
    freeze_stages: int = 0  # the first k model stages keep their initial weights at this node
    teacher: str = "none"
    teacher_params: dict[str, Any] = field(default_factory=dict)
    # a spec stored before schedules existed (a store being resumed) ran at a constant lr
    lr_schedule: str = "constant"

    def require_task(self, task: str, key: str) -> None:
        """Refuse a part that cannot use this task's labels (each part declares its tasks);
        `key` is where the strategy sits in the config."""
        for name, registry in PARTS.items():
            chosen = getattr(self, name)
            if task not in registry[chosen].tasks:
                allowed = [option for option, part in registry.items() if task in part.tasks]
                works_on = " or ".join(LABELS_OF[t] for t in registry[chosen].tasks)
                raise ConfigError(f"{key}.{name}", chosen, f"one of {', '.join(allowed)} with "
                                  f"task={task} ({chosen} works on {works_on})")

    def require_private(self, key: str) -> None:
        """Refuse a part that cannot run under DP-SGD (each part says why not)."""
        for name, registry in PARTS.items():
            chosen = getattr(self, name)
            why = registry[chosen].not_private
            if why is not None:
                raise ConfigError(f"{key}.{name}", chosen, f"not {chosen} with privacy=dp_sgd ({why})")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], key: str = "strategy") -> StrategySpec:
        """Validate a strategy mapping; `key` is where it sits in the config (for errors)."""
        known = [f.name for f in fields(cls)]
        for name in cfg:
            if name not in known:
                raise ConfigError(f"{key}.{name}", cfg[name], f"a strategy key ({', '.join(known)})")
        registries = {**PARTS, "optimizer": OPTIMIZERS}
        chosen = {name: cfg.get(name, "none" if name in OPTIONAL_PARTS else None) for name in registries}
        for name, registry in registries.items():
            if not isinstance(chosen[name], str) or chosen[name] not in registry:
                raise ConfigError(f"{key}.{name}", chosen[name], f"one of {', '.join(registry)}")
        schedule = cfg.get("lr_schedule", DEFAULT_LR_SCHEDULE)
        if not isinstance(schedule, str) or schedule not in LR_SCHEDULES:
            raise ConfigError(f"{key}.lr_schedule", schedule, f"one of {', '.join(LR_SCHEDULES)}")
        params = {
            f"{name}_params": PARTS[name][chosen[name]].resolve(
                cfg.get(f"{name}_params"), f"{key}.{name}_params"
            )
            for name in PARTS
        }
        return cls(
            name=str(cfg.get("name", "custom")),
            lr=require_number(cfg.get("lr"), f"{key}.lr", low=0.0, low_open=True),
            local_steps=require_int(cfg.get("local_steps"), f"{key}.local_steps", 1),
            batch_size=require_int(cfg.get("batch_size"), f"{key}.batch_size", 1),
            tile_size=require_int(cfg.get("tile_size"), f"{key}.tile_size", 4),
            freeze_stages=require_int(cfg.get("freeze_stages", 0), f"{key}.freeze_stages", 0),
            lr_schedule=schedule,
            **chosen,
            **params,
        )


@dataclass
class LocalStrategy:
    """A strategy bound to one node's training data: what the local trainer runs each round."""

    spec: StrategySpec
    sampler: Any
    loss: Loss
    label_transform: LabelTransform
    augmentation: Augmentation
    init: Init
    teacher: NoTeacher
    images: np.ndarray  # the node's training images (the autoencoder init reads them)

    @classmethod
    def build(
        cls,
        spec: StrategySpec,
        images: np.ndarray,
        labels: np.ndarray,
        verified: np.ndarray | None = None,
    ) -> LocalStrategy:
        """Bind the spec's parts to a node's data (parameters re-checked: specs also come from
        JSON). `verified` marks the training images whose labels are clean (the teacher's)."""

        def make(name: str, *args):
            part = PARTS[name][getattr(spec, name)]
            params = part.resolve(getattr(spec, f"{name}_params"), f"strategy.{name}_params")
            return part.build(*args, **params)

        if spec.label_transform != "none" and len(labels) and labels.max() > 1:
            raise ValueError(
                f"label transform {spec.label_transform!r} works on binary masks, but this node's "
                f"labels go up to {labels.max()}"
            )
        # the verified images: a slice (no copy) when they are one run of rows, as in a store
        rows = None
        if verified is not None:
            verified = np.asarray(verified)
            if verified.dtype == bool and len(verified) != len(images):
                raise ValueError(f"verified marks {len(verified)} images, the node has {len(images)}")
            rows = np.flatnonzero(verified) if verified.dtype == bool else verified
        return cls(
            spec=spec,
            sampler=make("sampler", images, labels),
            loss=make("loss"),
            label_transform=make("label_transform"),
            augmentation=make("augmentation"),
            init=make("init"),
            teacher=make("teacher", take_rows(images, rows) if rows is not None else None,
                         take_rows(labels, rows) if rows is not None else None),
            images=images,
        )

    def start_round(
        self,
        model: torch.nn.Module,
        memory: dict[str, Any],
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> list[torch.nn.Parameter]:
        """Before the round's local steps (the model holds the received global model): apply
        the init in the node's first round, put the frozen stages back to their initial weights,
        set up the teacher. Returns the parameters the optimiser may change."""
        spec = self.spec
        frozen = stage_keys(model, spec.freeze_stages)
        if spec.init != "none" or frozen:
            if INIT_KEY not in memory:
                initial = self.init(model, self.images, spec.tile_size, generator, device)
                memory[INIT_KEY] = initial
                model.load_state_dict(initial)
            else:
                model.load_state_dict({k: memory[INIT_KEY][k] for k in frozen}, strict=False)
        self.teacher.prepare(model, memory, self, generator, device)
        if isinstance(self.loss, RoundLoss):
            self.loss.start_round(model, memory, generator, spec.lr, OPTIMIZERS[spec.optimizer], device)
        frozen_set = set(frozen)
        trainable = []
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen_set)
            if name not in frozen_set:
                trainable.append(param)
        return trainable

    def step_loss(
        self,
        model: torch.nn.Module,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of one training step: a batch, the teacher's pseudo-labels, the loss.
        `idx`: the sampler's images to take a tile from (DP-SGD's Poisson sample)."""
        x, y = self.batch(generator, device, idx)
        y, teacher_logits = self.teacher.relabel(x, y)
        logits = model(x)
        loss = self.loss(logits, y, x) if isinstance(self.loss, RoundLoss) else self.loss(logits, y)
        return loss + self.teacher.extra_loss(logits, teacher_logits)

    def end_round(self, memory: dict[str, Any]) -> None:
        """After the round's steps: parts that learn alongside the model (co-teaching's peer)
        put their new state in the node's memory."""
        if isinstance(self.loss, RoundLoss):
            self.loss.end_round(memory)

    def batch(
        self,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch on `device`: sampled tiles, then the label transform and the
        augmentation there (after the transform, so a dilated mask is warped with its image)."""
        x, y = self.sampler(self.spec.batch_size, self.spec.tile_size, generator, idx)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return self.augmentation(x, self.label_transform(y, generator), generator)

    def optimizer(self, params) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.spec.optimizer](params, lr=self.spec.lr)

    def learning_rate(self, step: int, total: int) -> float:
        """The lr of the run's local step `step` (0-based) of `total`. The closed form of
        torch's CosineAnnealingLR (eta_min 0, T_max `total`), computed here because the
        optimiser is rebuilt every round while the schedule spans the whole run."""
        if self.spec.lr_schedule == "constant":
            return self.spec.lr
        return self.spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))

    def set_learning_rate(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Every network a step trains follows the schedule: the model's optimiser and a peer's
        (co-teaching's)."""
        own = self.loss.optimizers() if isinstance(self.loss, RoundLoss) else []
        for opt in (optimizer, *own):
            for group in opt.param_groups:
                group["lr"] = lr
