"""The simulation's ServerApp for Flower's own `flwr run .` (components in pyproject.toml).

`snowfed run` builds the federation itself and hands a ServerApp to Flower's simulation engine;
under `flwr run .` Flower starts this app instead, so it does the same steps from the run config:
`overrides` (Hydra overrides, space separated) and `run-dir`.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from snowfed.config import ConfigError, compose
from snowfed.server.app import FederationStopped, run_federation

from .runner import finish, plain_config, prepare

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    overrides = str(context.run_config.get("overrides", "")).split()
    cfg = plain_config(compose(overrides))
    run_dir = Path(str(context.run_config.get("run-dir", "")) or cfg["run_dir"]).resolve()
    plan, store = prepare(cfg, run_dir)
    num_nodes = len(list(grid.get_node_ids()))
    if num_nodes != len(plan.hospitals):
        raise ConfigError("options.num-supernodes", num_nodes,
                          f"{len(plan.hospitals)}, the number of hospitals of federation "
                          f"{plan.name!r}")
    start, status, reason = time.monotonic(), "failed", None
    try:
        result = run_federation(grid, cfg, store, run_dir)
        status = "completed" if result.rounds_completed == cfg["rounds"] else "failed"
    except FederationStopped as stop:  # too few sites replied: a result, not a crash
        reason = str(stop)
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        finish(run_dir, store, status, time.monotonic() - start, reason)
    print(f"snowfed: run directory {run_dir}")
