"""One simulation: validate, build the federation, run Flower's simulation engine (Ray backend),
leave the run directory behind (config.yaml, metrics.jsonl, checkpoint.pt, summary.json, plots).

`resume` continues a stopped run from its last checkpoint in the same directory. The reference
aggregations (`pooled`, `local`) are not federated and run in this process (sim.run.reference).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from snowfed.config import plain_config, require
from snowfed.progress import RoundProgress
from snowfed.rundir import (
    CONFIG,
    FINAL_MODEL,
    SUMMARY,
    atomic_write_text,
    edited_keys,
    load_checkpoint,
    read_summary_status,
    run_lock,
)
from snowfed.server.aggregation import REFERENCES
from snowfed.server.summary import write_summary
from snowfed.sim.run.engine import RayStart, ray_started_early, simulate
from snowfed.sim.run.plan import STORE_DIR, prepare, validate
from snowfed.store import FederationStore
from snowfed.tracking import RunTracking

# What `snowfed run resume=DIR` may change in the run's stored config.
RESUME_OVERRIDES = ("rounds", "verbose", "personalize_steps")


def resume(run_dir: str | Path, overrides: Mapping[str, Any] | None = None,
           federate: Federate | None = None, quiet: bool = False,
           on_round: RoundHook | None = None) -> dict[str, Any]:
    """Continue the run in `run_dir` from its last checkpoint, with its own config.yaml (only
    RESUME_OVERRIDES may change, e.g. more rounds); returns the new summary. `federate`,
    `quiet` and `on_round` as for `run`."""
    run_dir = Path(run_dir)
    overrides = dict(overrides or {})
    for key in overrides:
        require(key in RESUME_OVERRIDES, key, overrides[key],
                f"left out when resuming (the run's own {run_dir / CONFIG} holds it); a resumed run "
                f"may change only {', '.join(RESUME_OVERRIDES)}")
    require((run_dir / CONFIG).is_file(), "resume", str(run_dir),
            "a run directory (with config.yaml; a run stopped as it began leaves none: start it "
            "again instead)")
    with run_lock(run_dir):
        return _resume_locked(run_dir, overrides, federate, quiet, on_round)


def _resume_locked(run_dir: Path, overrides: dict[str, Any], federate: Federate | None,
                   quiet: bool, on_round: RoundHook | None) -> dict[str, Any]:
    saved = load_checkpoint(run_dir)
    require(saved is not None, "resume", str(run_dir),
            "a run directory with a checkpoint.pt (this run stopped before its first round was "
            "evaluated: start it again instead)")
    cfg = plain_config(OmegaConf.load(run_dir / CONFIG))
    edited = edited_keys(run_dir, cfg, RESUME_OVERRIDES)
    require(not edited, "resume", str(run_dir), f"a run whose {CONFIG} is as the run started (edited "
            f"since: {'; '.join(edited)}); put the values back, or start a new run")
    cfg.update(overrides)
    plan = validate(cfg)
    finished = saved["round"] == cfg["rounds"] and read_summary_status(run_dir) == "completed"
    require(saved["round"] <= cfg["rounds"] and not finished, "rounds", cfg["rounds"],
            f"more than the {saved['round']} rounds this run has completed already")
    atomic_write_text(run_dir / CONFIG, OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return _run_locked(cfg, run_dir, True, federate, quiet, on_round, plan)


# How a federated run's rounds are carried out: (cfg, plan, store, run_dir, on_round) -> the
# server's FederationResult. `simulate` (the default) starts Flower's simulation engine for this
# run alone; a sweep (sim.run.sweep) runs many federations on one simulation's Grid.
Federate = Callable[..., Any]


RoundHook = Callable[[int, dict, dict[str, float]], None]  # (round, global metrics, node f1)


def run(
    cfg: DictConfig | Mapping[str, Any], run_dir: str | Path, resuming: bool = False,
    federate: Federate | None = None, quiet: bool = False, on_round: RoundHook | None = None,
    plan=None,
) -> dict[str, Any]:
    """Run one simulation to its end; returns the summary (also written to summary.json).
    `resuming`: the run directory holds this run's store and checkpoint (see `resume`).
    `federate`: how the rounds are run (default `simulate`); `quiet`: no per-round lines;
    `on_round`: also called after each evaluated round (round 0 is the initial model);
    `plan`: `validate`'s for this config, when the caller has checked it already."""
    cfg = plain_config(cfg)
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        return _run_locked(cfg, run_dir, resuming, federate, quiet, on_round, plan)


def _run_locked(cfg: dict[str, Any], run_dir: Path, resuming: bool, federate: Federate | None,
                quiet: bool, hook: RoundHook | None, plan) -> dict[str, Any]:
    federated = federate is None and cfg.get("aggregation", {}).get("name") not in REFERENCES
    with ray_started_early(cfg if federated else None) as ray_start:
        if resuming:
            plan = validate(cfg) if plan is None else plan
            store = FederationStore(run_dir / STORE_DIR)
        else:
            plan, store = prepare(cfg, run_dir, plan)
        return _run_started(cfg, run_dir, resuming, federate, quiet, hook, ray_start, plan, store)


def _run_started(cfg: dict[str, Any], run_dir: Path, resuming: bool, federate: Federate | None,
                 quiet: bool, hook: RoundHook | None, ray_start: RayStart | None, plan,
                 store: FederationStore) -> dict[str, Any]:
    from snowfed.server.app import FederationStopped

    progress = None if quiet else RoundProgress(cfg["rounds"])
    tracking = RunTracking(cfg, run_dir, resuming)  # logger=...; never stops the run

    def on_round(rnd: int, global_metrics: dict, node_f1: dict[str, float]) -> None:
        if progress is not None:
            progress.update(rnd, global_metrics, node_f1)
        tracking.on_round(rnd, global_metrics, node_f1)
        if hook is not None:
            hook(rnd, global_metrics, node_f1)

    earlier = _earlier_wall_time(run_dir) if resuming else 0.0
    start = time.monotonic()
    status, reason = "failed", None
    try:
        if cfg["aggregation"]["name"] in REFERENCES:
            from snowfed.sim.run.reference import run_reference

            result = run_reference(cfg, store, run_dir, on_round)
        else:
            result = (federate(cfg, plan, store, run_dir, on_round) if federate is not None
                      else simulate(cfg, plan, store, run_dir, on_round, ray_start))
        if result is not None and result.rounds_completed == cfg["rounds"]:
            status = "completed"
        else:
            reason = "the server stopped before the last round"
    except FederationStopped as stop:
        reason = str(stop)
    except KeyboardInterrupt:
        status, reason = "interrupted", "interrupted by the user"
        raise
    except BaseException as exc:  # recorded in the summary, then re-raised
        reason = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if progress is not None:
            progress.close()
        summary = {"status": status, "reason": reason}
        try:
            summary = finish(run_dir, store, status, earlier + time.monotonic() - start, reason)
        finally:
            tracking.close(summary)
    return summary


def _earlier_wall_time(run_dir: Path) -> float:
    import json

    try:
        return float(json.loads((run_dir / SUMMARY).read_text())["wall_time_s"])
    except (OSError, ValueError, KeyError):
        return 0.0


def finish(run_dir: Path, store: FederationStore, status: str, wall_time_s: float,
           reason: str | None = None) -> dict:
    """summary.json (server.summary) with the simulator's shortcut report, if the run has one."""
    shortcut = _shortcut_summary(run_dir, store)
    return write_summary(run_dir, store, status, wall_time_s, reason,
                         {"shortcut": shortcut} if shortcut else None)


def _shortcut_summary(run_dir: Path, store: FederationStore) -> dict:
    """The final model at each shortcut site, with and without the shortcut (the trap shown)."""
    if not any("shortcut" in n for n in store.nodes) or not (run_dir / FINAL_MODEL).is_file():
        return {}
    import torch

    from snowfed.server.app import build_global_model
    from snowfed.sim.federation.shortcut import shortcut_report

    cfg = store.manifest
    model = build_global_model(cfg["model"], cfg["num_classes"], int(cfg["seed"]))
    model.load_state_dict(torch.load(run_dir / FINAL_MODEL, map_location="cpu", weights_only=True))
    return shortcut_report(store, model)
