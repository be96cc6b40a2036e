"""Initialisations: what a node's model starts from the first time the node trains.

An init is `(model, images, tile_size, generator, device) -> state dict`: it returns the weights
the node's model takes in its first local round (the model passed in holds the global model the
node received). With `freeze_stages: k` in the strategy, the first k stages keep those weights in
every later round too, whatever the server sends (see `LocalStrategy.start_round`).

- `none`: the global model as received.
- `autoencoder` (SNOW's semi-supervised strategy): the encoder is pre-trained as an autoencoder on
  the node's own images, labels unused (MSE reconstruction + `weight_l1` x L1 norm of the
  weights); the decoder of the autoencoder is discarded, the segmentation decoder kept.
- `checkpoint` (transfer learning): the weights of a checkpoint file or of an earlier run
  directory's final model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from snowfed.config import ConfigError, require
from snowfed.rundir import FINAL_MODEL, SUMMARY

from .parts import Param, Part, integer, number
from .samplers import RandomTileSampler

StateDict = dict[str, torch.Tensor]
Init = Callable[[torch.nn.Module, np.ndarray, int, torch.Generator, torch.device | str], StateDict]

LAST_RUN = "last"  # checkpoint path meaning: the newest completed run under the run root


def _copy_state(model: torch.nn.Module) -> StateDict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def as_received() -> Init:
    """The global model as the node received it."""
    return lambda model, images, tile_size, generator, device: _copy_state(model)


def autoencoder(steps: int, batch_size: int, lr: float, weight_l1: float) -> Init:
    """Pre-train the model's encoder as an autoencoder on random tiles of the node's images."""

    def init(model, images, tile_size, generator, device) -> StateDict:
        encoder = copy.deepcopy(model.encoder).to(device)
        decoder = model.reconstruction_decoder().to(device)
        autoencoder = torch.nn.Sequential(encoder, decoder).train()
        sampler = RandomTileSampler(images, np.zeros(images.shape[:3], dtype=np.uint8))
        optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
        weights = [p for n, p in autoencoder.named_parameters() if n.endswith("weight")]
        for _ in range(steps):
            x, _ = sampler(batch_size, tile_size - tile_size % 4, generator)
            x = x.to(device, non_blocking=True)
            loss = F.mse_loss(autoencoder(x), x)
            if weight_l1:
                loss = loss + weight_l1 * sum(w.abs().sum() for w in weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        state = _copy_state(model)
        state.update({f"encoder.{k}": v.detach().cpu().clone() for k, v in encoder.state_dict().items()})
        return state

    return init


def checkpoint_file(path: str | Path) -> Path:
    """The model file a checkpoint path names: the file itself, or a run directory's final model."""
    path = Path(path).expanduser()
    return path / FINAL_MODEL if path.is_dir() else path


def last_run_checkpoint(run_root: Path, fits: Callable[[Path], bool]) -> Path | None:
    """The final model of the newest completed run under `run_root` (single runs and sweeps)
    that `fits` the configured model, or None."""
    candidates = []
    for summary in run_root.glob(f"**/{SUMMARY}"):
        model = summary.parent / FINAL_MODEL
        try:
            completed = json.loads(summary.read_text()).get("status") == "completed"
        except (OSError, ValueError):
            continue
        if completed and model.is_file():
            candidates.append((model.stat().st_mtime, model))
    for _, model in sorted(candidates, reverse=True):
        if fits(model):
            return model
    return None


def load_checkpoint(path: str | Path, model: torch.nn.Module, key: str) -> StateDict:
    """A checkpoint's state dict, checked against `model` (same keys, same shapes); ConfigError
    naming `key` otherwise."""
    file = checkpoint_file(path)
    allowed = "a model file saved with torch.save(state_dict) or a run directory holding " + FINAL_MODEL
    require(file.is_file(), key, str(path), allowed)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ConfigError(key, str(path), f"{allowed} (loading it failed: {err})") from None
    require(isinstance(state, dict), key, str(path), allowed)
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ConfigError(key, str(path), f"a checkpoint of the configured model (missing keys "
                          f"{missing[:3]}, unexpected keys {extra[:3]})")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ConfigError(key, str(path), f"a checkpoint of the configured model ({name} has "
                              f"shape {tuple(state[name].shape)}, the model {tuple(tensor.shape)}; "
                              "same model.width?)")
    return state


def checkpoint(path: str) -> Init:
    """The weights of a checkpoint (resolved and checked when the config is validated)."""

    def init(model, images, tile_size, generator, device) -> StateDict:
        return load_checkpoint(path, model, "strategy.init_params.path")

    return init


def _path(value: Any, key: str) -> str:
    require(isinstance(value, str) and value, key, value,
            f"a checkpoint file, a run directory, or {LAST_RUN!r} (the newest completed run)")
    return value


INITS: dict[str, Part] = {
    "none": Part(as_received),
    "autoencoder": Part(
        autoencoder,
        {
            "steps": Param(200, integer(1)),
            "batch_size": Param(8, integer(1)),
            "lr": Param(1e-3, number(0.0, low_open=True)),
            "weight_l1": Param(1e-5, number(0.0)),  # SNOW's L1 penalty on the weights
        },
        tasks=("segmentation",),  # the autoencoder's decoder is ShortRes's
        not_private="its pre-training on the site's images is not private",
    ),
    "checkpoint": Part(checkpoint, {"path": Param(LAST_RUN, _path)}),
}
