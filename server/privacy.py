"""Central differential privacy: Flower's DP strategy wrappers around the chosen aggregation.

`privacy=central_dp_fixed` / `central_dp_adaptive` with `side: server` (the server clips each
site's update) or `side: client` (each site clips its own update with Flower's client mod; the
server only adds noise). Flower adds Gaussian noise of std noise_multiplier x clipping norm /
sites per round to the mean update, which makes each round a Gaussian mechanism with noise
multiplier `noise_multiplier` on the participation of a whole site (site-level DP). The epsilon
spent after each round comes from Opacus's RDP accountant for that mechanism, with sampling rate
sites per round / sites (amplification only when sites are sampled, fraction_train < 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

WRAPPERS = {
    ("central_dp_fixed", "server"): DifferentialPrivacyServerSideFixedClipping,
    ("central_dp_fixed", "client"): DifferentialPrivacyClientSideFixedClipping,
    ("central_dp_adaptive", "server"): DifferentialPrivacyServerSideAdaptiveClipping,
    ("central_dp_adaptive", "client"): DifferentialPrivacyClientSideAdaptiveClipping,
}
CENTRAL = ("central_dp_fixed", "central_dp_adaptive")
# the wrappers' own parameters, per privacy option (besides name, side, delta)
PARAMS = {
    "central_dp_fixed": ("noise_multiplier", "clipping_norm"),
    "central_dp_adaptive": ("noise_multiplier", "initial_clipping_norm", "target_clipped_quantile",
                            "clip_norm_lr", "clipped_count_stddev"),
}


def wrap_central_dp(strategy: Strategy, privacy: Mapping[str, Any], sites_per_round: int) -> Strategy:
    """The aggregation wrapped in Flower's DP wrapper named by `privacy` (validated before)."""
    wrapper = WRAPPERS[(privacy["name"], privacy["side"])]
    kwargs = {k: privacy[k] for k in PARAMS[privacy["name"]] if privacy.get(k) is not None}
    return wrapper(strategy, num_sampled_clients=sites_per_round, **kwargs)


def central_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Site-level epsilon after `rounds` Gaussian-mechanism rounds (Opacus's RDP accountant)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant  # here: importing Opacus takes ~1.6 s

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))
