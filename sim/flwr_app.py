"""The ServerApp for Flower's own `flwr run .` (components in pyproject.toml), in simulation and
in a real deployment.

`snowfed run` builds the federation itself and hands a ServerApp to Flower's simulation engine;
under `flwr run .` Flower starts this app instead, so it does the same steps from the run config:
`overrides` (Hydra overrides, space separated), `run-dir` and `store`:

- `store` empty (simulation): build the virtual federation's store in the run directory; every
  node reads it (its path goes in the server's messages).
- `store` a folder (deployment, `docs/deployment.md`): the coordinator's federation store, made
  beforehand with `snowfed prepare` and the same overrides. The server takes from it the node
  names, its clean test set and the facts of the summary; the partner sites' data never leaves
  them: each SuperNode's `--node-config` names its own, and no store path is sent to the sites.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from snowfed.config import ConfigError, compose, require
from snowfed.progress import RoundProgress
from snowfed.server.app import FederationStopped, run_federation
from snowfed.store import FederationStore

from .runner import finish, plain_config, prepare, start_run_dir, validate

app = ServerApp()
NODES_WAIT_S = 300.0  # how long a deployment waits for every site's SuperNode to connect


@app.main()
def main(grid: Grid, context: Context) -> None:
    overrides = str(context.run_config.get("overrides", "")).split()
    cfg = plain_config(compose(overrides))
    run_dir = Path(str(context.run_config.get("run-dir", "")) or cfg["run_dir"]).resolve()
    store_dir = str(context.run_config.get("store", ""))
    plan = validate(cfg)
    store = _coordinator_store(cfg, Path(store_dir), run_dir) if store_dir else None
    num_nodes = _wait_for_nodes(grid, len(plan.hospitals), NODES_WAIT_S if store_dir else 0.0)
    if num_nodes != len(plan.hospitals) and store_dir:
        raise ConfigError("connected SuperNodes", num_nodes, f"{len(plan.hospitals)}, the number "
                          f"of hospitals of federation {plan.name!r}")
    if num_nodes != len(plan.hospitals):  # Flower's local simulation has 2 SuperNodes by default
        raise ConfigError("the simulation's SuperNodes", num_nodes, f"{len(plan.hospitals)}, the "
                          f"number of hospitals of federation {plan.name!r}: run `flwr federation "
                          f"{simulation_config_command(len(plan.hospitals))}`, then flwr run again")
    if store is None:  # simulation: the virtual federation's store, once the nodes are right
        plan, store = prepare(cfg, run_dir)
    start, status, reason = time.monotonic(), "failed", None
    progress = RoundProgress(cfg["rounds"])  # the lines of `snowfed run`, in flwr's log stream
    try:
        result = run_federation(grid, cfg, store, run_dir, progress.update,
                                share_store=not store_dir)
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


def simulation_config_command(num_sites: int) -> str:
    """The `flwr federation` subcommand that gives Flower's local simulation `num_sites`
    SuperNodes (Flower 1.41 keeps it in $FLWR_HOME/config.toml, not in pyproject)."""
    return f"simulation-config @none/default local --num-supernodes {num_sites}"


def _coordinator_store(cfg: dict[str, Any], path: Path, run_dir: Path) -> FederationStore:
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


def _wait_for_nodes(grid: Grid, expected: int, wait_s: float) -> int:
    """The number of connected nodes once `expected` are there or `wait_s` seconds passed."""
    deadline = time.monotonic() + wait_s
    while True:
        num_nodes = len(list(grid.get_node_ids()))
        if num_nodes >= expected or time.monotonic() >= deadline:
            return num_nodes
        time.sleep(1.0)
