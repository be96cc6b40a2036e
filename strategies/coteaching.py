"""Co-teaching (Han et al., NeurIPS 2018): two networks teach each other which labels to trust.

Each step both networks score the batch; each keeps its (1 - forget rate) smallest-loss
samples (probably clean: networks fit clean labels before noisy ones) and the *other* network
learns from them. The forget rate ramps linearly from 0 to `forget_rate` over `warmup_steps`
(the paper's T_k, counted here in local steps, across rounds). Set `forget_rate` near the site's
expected noise rate.

Federated: the federated network is the one Flower sends; the peer lives at the node only (its
weights in the node's memory, written after each round, so it survives across Ray actors and
resumed runs). It starts from a fresh random init drawn from the node's stream: two identical
networks would select identical samples and co-teaching would reduce to self-paced learning.
Its optimiser state (Adam moments) starts afresh each round, like the federated network's.
Classification only: small-loss selection is per sample, and a tile is not a sample.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from .parts import RoundLoss

PEER_KEY = "coteaching-peer"  # the peer network's weights in the node's memory
STEP_KEY = "coteaching-step"  # local steps taken so far (the forget-rate schedule)


class CoTeaching(RoundLoss):
    """The `coteaching` loss: bound to a peer network for the round by `start_round`."""

    def __init__(self, forget_rate: float, warmup_steps: int):
        self.forget_rate, self.warmup_steps = forget_rate, warmup_steps
        self.peer: torch.nn.Module | None = None
        self.peer_optimizer: torch.optim.Optimizer | None = None
        self.step = 0

    def start_round(self, model, memory: dict[str, Any], generator: torch.Generator, lr: float,
                    optimizer_cls, device) -> None:
        self.peer = copy.deepcopy(model)
        if PEER_KEY in memory:
            self.peer.load_state_dict(memory[PEER_KEY])
        else:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for module in self.peer.modules():
                    if module is not self.peer and hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        self.peer.to(device).train()
        for p in self.peer.parameters():
            p.requires_grad_(True)
        self.peer_optimizer = optimizer_cls(self.peer.parameters(), lr=lr)
        self.step = int(memory[STEP_KEY]["step"]) if STEP_KEY in memory else 0

    def end_round(self, memory: dict[str, Any]) -> None:
        """New memory entries (new objects), so the node writes them again."""
        memory[PEER_KEY] = {k: v.detach().cpu().clone() for k, v in self.peer.state_dict().items()}
        memory[STEP_KEY] = {"step": torch.tensor(self.step)}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.peer_optimizer] if self.peer_optimizer is not None else []

    def rate(self) -> float:
        return self.forget_rate * min(1.0, self.step / max(1, self.warmup_steps))

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The federated network's loss on the samples the peer trusts; the peer takes its own
        step on the samples the federated network trusts."""
        if labels.dim() != 1:
            raise ValueError("co-teaching selects samples: it needs one label per image (classification)")
        peer_logits = self.peer(images)
        keep = max(1, round((1.0 - self.rate()) * len(labels)))
        own = F.cross_entropy(logits.detach(), labels, reduction="none")
        other = F.cross_entropy(peer_logits.detach(), labels, reduction="none")
        trusted_by_model = torch.argsort(own)[:keep]
        trusted_by_peer = torch.argsort(other)[:keep]
        peer_loss = F.cross_entropy(peer_logits[trusted_by_model], labels[trusted_by_model])
        self.peer_optimizer.zero_grad(set_to_none=True)
        peer_loss.backward()
        self.peer_optimizer.step()
        self.step += 1
        return F.cross_entropy(logits[trusted_by_peer], labels[trusted_by_peer])
