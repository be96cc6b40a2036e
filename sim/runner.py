"""One simulation: validate, build the federation, run Flower's simulation engine (Ray backend),
leave the run directory behind (config.yaml, metrics.jsonl, summary.json, plots)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from snowfed.config import ConfigError, require, require_number
from snowfed.plots import plot_f1_per_round
from snowfed.progress import RoundProgress
from snowfed.rundir import (
    CONFIG,
    METRICS,
    SUMMARY,
    atomic_write_json,
    atomic_write_text,
    build_summary,
    read_jsonl,
)
from snowfed.server.aggregation import AGGREGATIONS

from .federation import build_store, node_facts, resolve_federation

STORE_DIR = "federation"
F1_PLOT = "f1_per_round.png"


def plain_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as plain Python values, without Hydra's own node."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in cfg.items() if k != "hydra"}


def backend_config(backend: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's simulation backend config from `backend.*`, validated."""
    res = backend.get("client_resources") or {}
    num_cpus = require_number(res.get("num_cpus"), "backend.client_resources.num_cpus", low=0.01)
    num_gpus = require_number(res.get("num_gpus", 0.0), "backend.client_resources.num_gpus", low=0.0)
    init_args = dict(backend.get("init_args") or {})
    return {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, "init_args": init_args}


def validate(cfg: Mapping[str, Any]):
    """Every check that can fail, before any data is generated or Ray starts."""
    plan = resolve_federation(cfg)
    backend_config(cfg["backend"])
    require(cfg["aggregation"].get("name") in AGGREGATIONS, "aggregation.name",
            cfg["aggregation"].get("name"), f"one of {', '.join(AGGREGATIONS)}")
    require(cfg["privacy"].get("name") == "none", "privacy.name", cfg["privacy"].get("name"),
            "none (differential privacy and secure aggregation are not built yet)")
    return plan


def prepare(cfg: Mapping[str, Any], run_dir: Path):
    """Validate, write config.yaml and the federation store; return (plan, store)."""
    plan = validate(cfg)
    if (run_dir / METRICS).exists() or (run_dir / SUMMARY).exists():
        raise ConfigError("run_dir", str(run_dir), "a new or empty run directory (this one holds "
                          "a previous run's results, which snowfed never overwrites)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, OmegaConf.to_yaml(OmegaConf.create(dict(cfg))))
    store = build_store(plan, cfg, run_dir / STORE_DIR)
    return plan, store


def finish(run_dir: Path, store, status: str, wall_time_s: float, reason: str | None = None) -> dict:
    """Write summary.json and the plots from whatever metrics.jsonl holds (also after a crash)."""
    records = read_jsonl(run_dir / METRICS)
    facts = node_facts(store)
    summary = build_summary(records, facts, status, wall_time_s, reason)
    atomic_write_json(run_dir / SUMMARY, summary)
    plot_f1_per_round(records, run_dir / F1_PLOT, {n: f["noise_profile"] for n, f in facts.items()})
    return summary


class _DropRunSimulationDeprecation(logging.Filter):
    # run_simulation is Flower's Python entry to its simulation engine and the only one that
    # takes a ServerApp object; its deprecation notice says nothing a snowfed user can act on.
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def _quiet_flower(verbose: bool) -> None:
    """Flower logs every round at INFO; snowfed prints its own progress instead."""
    logger = logging.getLogger("flwr")
    if not verbose:
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _DropRunSimulationDeprecation) for f in logger.filters):
            logger.addFilter(_DropRunSimulationDeprecation())
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")


def run(cfg: DictConfig | Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Run one simulation to its end; returns the summary (also written to summary.json)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from snowfed.client.app import app as client_app
    from snowfed.server.app import run_federation

    cfg = plain_config(cfg)
    run_dir = Path(run_dir)
    plan, store = prepare(cfg, run_dir)
    _quiet_flower(verbose=bool(cfg.get("verbose", False)))
    progress = RoundProgress(cfg["rounds"])
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        outcome["result"] = run_federation(grid, cfg, store, run_dir, progress.update)

    start = time.monotonic()
    status, reason = "failed", None
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(plan.hospitals),
            backend_config=backend_config(cfg["backend"]),
            verbose_logging=bool(cfg.get("verbose", False)),
        )
        result = outcome.get("result")
        if result is not None and result.rounds_completed == cfg["rounds"]:
            status = "completed"
        else:
            reason = "the server stopped before the last round"
    except KeyboardInterrupt:
        status, reason = "interrupted", "interrupted by the user"
        raise
    except BaseException as exc:  # recorded in the summary, then re-raised
        reason = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary = finish(run_dir, store, status, time.monotonic() - start, reason)
    return summary
