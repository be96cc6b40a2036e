"""A run's plan: every check that can fail, before any data is generated or Ray starts
(`validate`), and the run directory with its federation store (`prepare`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from snowfed.config import ConfigError, require, require_int, require_keys, require_number
from snowfed.rundir import start_run_dir
from snowfed.server.aggregation import REFERENCES, sites_per_round
from snowfed.server.privacy import CENTRAL
from snowfed.server.privacy import PARAMS as CENTRAL_PARAMS
from snowfed.sim.federation import build_store, resolve_federation
from snowfed.sim.federation.sites import configured_model, expand_hospitals
from snowfed.tracking import validate_logger

STORE_DIR = "federation"


BACKEND_KEYS = ("name", "address", "client_resources", "init_args")
ADDRESS_FORMS = ("auto (RAY_ADDRESS, else the cluster `ray start` started on this machine), "
                 "host:port (the head node's GCS) or ray://host:port (Ray Client)")


def cluster_address(backend: Mapping[str, Any]) -> str | None:
    """The running Ray cluster a backend attaches to (backend=cluster, docs/cluster.md); None:
    snowfed starts a private Ray on this machine for the run."""
    address = backend.get("address")
    if address is None:
        return None
    host_port = str(address).removeprefix("ray://").rpartition(":")
    valid = address == "auto" or (
        isinstance(address, str) and host_port[0] != "" and "/" not in host_port[0]
        and host_port[2].isdigit() and 0 < int(host_port[2]) < 65536)
    require(valid, "backend.address", address, ADDRESS_FORMS)
    return address


def ray_address_file() -> Path:
    """Where `ray start` records the cluster it started on this machine (Ray's own rule, from
    ray._common.utils: RAY_TMPDIR, else TMPDIR on Linux, else /tmp). Followed here rather than
    called, because importing Ray fixes what it reads of the environment, and that depends on
    the address found (sim.run.processes.ray_environment)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray" / "ray_current_cluster"


def attach_address(backend: Mapping[str, Any]) -> str | None:
    """The host:port (or ray://host:port) a backend attaches to, `auto` resolved as Ray resolves
    it (RAY_ADDRESS, else the cluster `ray start` started here), checked to answer a connection;
    None: a private Ray. ConfigError when there is no such cluster."""
    address = cluster_address(backend)
    if address is None:
        return None
    given = address
    if address == "auto":
        record = ray_address_file()
        address = os.environ.get("RAY_ADDRESS") or (
            record.read_text().strip() if record.is_file() else "")
        require(address != "", "backend.address", given,
                f"the address of a running Ray cluster: `auto` found none (RAY_ADDRESS is unset and "
                f"{record} records no cluster started with `ray start` here); give its host:port")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except (OSError, ValueError) as err:
        raise ConfigError("backend.address", given, f"the address of a running Ray cluster: "
                          f"nothing answers at {address} ({err})") from None
    return address


def backend_config(backend: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's simulation backend config from `backend.*`, validated."""
    require_keys(backend, BACKEND_KEYS, "backend", "a key of a backend")
    attached = cluster_address(backend) is not None
    res = backend.get("client_resources") or {}
    num_cpus = require_number(res.get("num_cpus"), "backend.client_resources.num_cpus", low=0.01)
    num_gpus = require_number(res.get("num_gpus", 0.0), "backend.client_resources.num_gpus", low=0.0)
    if num_gpus > 0 and not attached:  # else Flower's actor pool stays empty and waits forever
        import torch

        require(torch.cuda.is_available(), "backend.client_resources.num_gpus", num_gpus,
                "0 on this machine (torch sees no CUDA device; backend=cpu runs the clients on "
                "the CPU)")
    # a cluster's GPUs are on its nodes: sim.run.cluster checks them once attached
    init_args = dict(backend.get("init_args") or {})
    return {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, "init_args": init_args}


def validate(cfg: Mapping[str, Any], loaded: dict | None = None):
    """Every check that can fail, before any data is generated or Ray starts; the run's plan
    (the federation's sites, checked), which then flows down to `prepare` and the run.
    `loaded`: the datasets loaded already, shared by the plans of a sweep."""
    plan = resolve_federation(cfg, loaded)  # the aggregation's keys and site counts included
    backend_config(cfg["backend"])
    attach_address(cfg["backend"])  # a cluster that answers, before anything starts
    validate_logger(cfg)
    _validate_privacy(cfg, plan)
    aggregation = cfg["aggregation"]["name"]
    require(isinstance(cfg.get("verbose", False), bool), "verbose", cfg.get("verbose"),
            "true or false")
    steps = require_int(cfg.get("personalize_steps", 0), "personalize_steps", 0)
    require(not (steps and aggregation == "local"), "personalize_steps", steps,
            "0 with aggregation=local (each site's model is already its own)")
    if aggregation == "pooled":
        for i, h in enumerate(plan.hospitals):
            require(h.strategy == plan.hospitals[0].strategy, f"federation.hospitals[{i}].strategy",
                    h.strategy.name, f"the strategy of every other site ({plan.hospitals[0].strategy.name}"
                    "): aggregation=pooled trains one model with one strategy")
    return plan


def prepare(cfg: Mapping[str, Any], run_dir: Path, plan=None):
    """Write config.yaml and the federation store of `plan` (`validate`'s for `cfg`; validated
    here when the caller has none); return (plan, store)."""
    plan = validate(cfg) if plan is None else plan
    start_run_dir(cfg, run_dir)
    store = build_store(plan, cfg, run_dir / STORE_DIR)
    return plan, store


PRIVACY = ("none", "dp_sgd", *CENTRAL, "secagg")
SECAGG_UNSUPPORTED = (
    "a privacy option this Flower supports: Flower 1.41-1.42 has SecAgg+ only in its legacy workflow "
    "API (flwr.server.workflow.SecAggPlusWorkflow + secaggplus_mod), in the simulation and the "
    "deployment runtime alike, and none for the Message-API strategies snowfed runs; use "
    "privacy=central_dp_fixed privacy.side=client to keep raw updates noisy at the server, or "
    "none")
DP_KEYS = ("name", "noise_multiplier", "target_epsilon", "delta", "max_grad_norm")


def _validate_privacy(cfg: Mapping[str, Any], plan) -> None:
    """`privacy.*` and what DP-SGD cannot be combined with (each named, before anything runs)."""
    privacy = cfg["privacy"]
    name = privacy.get("name")
    require(name in PRIVACY, "privacy.name", name, f"one of {', '.join(PRIVACY)}")
    require(name != "secagg", "privacy.name", name, SECAGG_UNSUPPORTED)
    if name == "none":
        return
    if name in CENTRAL:
        _validate_central_dp(cfg)
        return
    require_keys(privacy, DP_KEYS, "privacy", "a key of dp_sgd")
    if privacy.get("target_epsilon") is None:
        require_number(privacy.get("noise_multiplier"), "privacy.noise_multiplier", low=0.0)
        require(privacy["noise_multiplier"] > 0, "privacy.noise_multiplier",
                privacy["noise_multiplier"], "> 0 (or set privacy.target_epsilon)")
    else:
        require_number(privacy["target_epsilon"], "privacy.target_epsilon", low=0.01)
    delta = require_number(privacy.get("delta"), "privacy.delta", 0.0, 1.0)
    require(0 < delta < 1, "privacy.delta", delta, "in (0, 1)")
    require_number(privacy.get("max_grad_norm"), "privacy.max_grad_norm", low=1e-6)
    aggregation = cfg["aggregation"]["name"]
    require(aggregation not in ("fedprox", *REFERENCES), "aggregation.name", aggregation,
            "not fedprox, pooled or local with privacy=dp_sgd (the proximal term escapes Opacus's "
            "per-example clipping; the reference runs are not private)")
    hospitals_cfg = expand_hospitals(cfg["federation"]["hospitals"])
    for i, h in enumerate(plan.hospitals):
        key = f"federation.hospitals[{i}].strategy" if hospitals_cfg[i].get(
            "strategy") is not None else "strategy"
        h.strategy.require_private(key)
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(configured_model(cfg, getattr(plan, "num_classes", None)), strict=False)
    require(not errors, "model", cfg["model"].get("name"),
            f"Opacus-compatible for privacy=dp_sgd ({'; '.join(map(str, errors))}); "
            "try model.norm=group")


def _validate_central_dp(cfg: Mapping[str, Any]) -> None:
    privacy = cfg["privacy"]
    name = privacy["name"]
    allowed = ("name", "side", "delta", *CENTRAL_PARAMS[name])
    require_keys(privacy, allowed, "privacy", f"a key of {name}")
    require(privacy.get("side") in ("server", "client"), "privacy.side", privacy.get("side"),
            "server or client (who clips the updates)")
    require_number(privacy.get("noise_multiplier"), "privacy.noise_multiplier", low=0.0)
    delta = require_number(privacy.get("delta"), "privacy.delta", 0.0, 1.0)
    require(0 < delta < 1, "privacy.delta", delta, "in (0, 1)")
    for key in CENTRAL_PARAMS[name][1:]:
        if key != "clipped_count_stddev" or privacy.get(key) is not None:
            require_number(privacy.get(key), f"privacy.{key}", low=0.0)
    aggregation = cfg["aggregation"]["name"]
    require(aggregation not in REFERENCES, "aggregation.name", aggregation,
            f"a federated aggregation with privacy={name} (pooled and local are not federated)")
    if name == "central_dp_adaptive" and privacy["noise_multiplier"] > 0:
        from flwr.supercore.differential_privacy import compute_adaptive_noise_params

        per_round = sites_per_round(cfg["aggregation"], len(cfg["federation"]["hospitals"]))
        try:
            compute_adaptive_noise_params(privacy["noise_multiplier"], per_round,
                                          privacy.get("clipped_count_stddev"))
        except ValueError:
            raise ConfigError("privacy.clipped_count_stddev", privacy.get("clipped_count_stddev"),
                              f"more than noise_multiplier/2 = {privacy['noise_multiplier'] / 2} "
                              f"(Flower's default, sites per round/20, is {per_round / 20}: set "
                              "it, or lower privacy.noise_multiplier)") from None
