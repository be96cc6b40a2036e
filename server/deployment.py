"""The server's side of a run under `flwr run .`: a real deployment's coordinator store, the
wait for every site's SuperNode, and the rounds with the run directory's closing.

`snowfed.sim.run.flwr_app` is the ServerApp Flower starts (pyproject's components); it checks
the config and, in a simulation, builds the virtual federation's store, then hands over to
`federate` here. A deployment needs no simulation code: the coordinator's store was made
beforehand with `snowfed prepare`, and the partner sites' data never leaves them (each
SuperNode's `--node-config` names its own, and no store path is sent to the sites).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from snowfed.config import ConfigError, require
from snowfed.progress import RoundProgress
from snowfed.rundir import start_run_dir
from snowfed.server.app import FederationStopped, run_federation
from snowfed.server.summary import write_summary
from snowfed.store import FederationStore

NODES_WAIT_S = 300.0  # how long a deployment waits for every site's SuperNode to connect

# (run_dir, store, status, wall_time_s, reason) -> the summary written
Finish = Callable[[Path, FederationStore, str, float, "str | None"], dict]


def coordinator_store(cfg: dict[str, Any], path: Path, run_dir: Path) -> FederationStore:
    """The coordinator's store, checked against the run's config; a new run directory."""
    try:
        store = FederationStore(path)
    except FileNotFoundError as err:
        raise ConfigError("store", str(path), "a federation store folder (`snowfed prepare DIR "
                          "...`)") from err
    made_for = {"federation": store.manifest["federation"], "model": store.manifest["model"]}
    wanted = {"federation": cfg["federation"]["name"], "model": dict(cfg["model"])}
    require(made_for == wanted, "store", str(path), f"a store prepared with this run's federation "
            f"and model ({wanted}); this one was prepared for {made_for}")
    start_run_dir(cfg, run_dir, key="run-dir")
    return store


def wait_for_nodes(grid: Grid, expected: int, wait_s: float) -> int:
    """The number of connected nodes once `expected` are there or `wait_s` seconds passed."""
    deadline = time.monotonic() + wait_s
    while True:
        num_nodes = len(list(grid.get_node_ids()))
        if num_nodes >= expected or time.monotonic() >= deadline:
            return num_nodes
        time.sleep(1.0)


def federate(grid: Grid, cfg: dict[str, Any], store: FederationStore, run_dir: Path,
             share_store: bool, finish: Finish = write_summary) -> None:
    """The rounds, with `snowfed run`'s progress lines in Flower's log stream, and summary.json
    whatever happens (`finish`; a simulation's adds its shortcut report)."""
    start, status, reason = time.monotonic(), "failed", None
    progress = RoundProgress(cfg["rounds"])
    try:
        result = run_federation(grid, cfg, store, run_dir, progress.update, share_store=share_store)
        status = "completed" if result.rounds_completed == cfg["rounds"] else "failed"
    except FederationStopped as stop:  # too few sites replied: a result, not a crash
        reason = str(stop)
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        progress.close()
        finish(run_dir, store, status, time.monotonic() - start, reason)
    print(f"snowfed: run directory {run_dir}")
