"""The ServerApp for Flower's own `flwr run .` (components in pyproject.toml), in simulation and
in a real deployment.

`snowfed run` builds the federation itself and hands a ServerApp to Flower's simulation engine;
under `flwr run .` Flower starts this app instead, so it does the same steps from the run config:
`overrides` (Hydra overrides, space separated), `run-dir` and `store`:

- `store` empty (simulation): build the virtual federation's store in the run directory; every
  node reads it (its path goes in the server's messages).
- `store` a folder (deployment, `docs/deployment.md`): the coordinator's federation store, made
  beforehand with `snowfed prepare` and the same overrides (server.deployment).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from snowfed.config import ConfigError, compose, plain_config
from snowfed.server.deployment import NODES_WAIT_S, coordinator_store, federate, wait_for_nodes
from snowfed.sim.run.plan import prepare, validate
from snowfed.sim.run.runner import finish

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    overrides = str(context.run_config.get("overrides", "")).split()
    cfg = plain_config(compose(overrides))
    run_dir = Path(str(context.run_config.get("run-dir", "")) or cfg["run_dir"]).resolve()
    store_dir = str(context.run_config.get("store", ""))
    plan = validate(cfg)
    store = coordinator_store(cfg, Path(store_dir), run_dir) if store_dir else None
    num_nodes = wait_for_nodes(grid, len(plan.hospitals), NODES_WAIT_S if store_dir else 0.0)
    if num_nodes != len(plan.hospitals) and store_dir:
        raise ConfigError("connected SuperNodes", num_nodes, f"{len(plan.hospitals)}, the number "
                          f"of hospitals of federation {plan.name!r}")
    if num_nodes != len(plan.hospitals):  # Flower's local simulation has 2 SuperNodes by default
        raise ConfigError("the simulation's SuperNodes", num_nodes, f"{len(plan.hospitals)}, the "
                          f"number of hospitals of federation {plan.name!r}: run `flwr federation "
                          f"{simulation_config_command(len(plan.hospitals))}`, then flwr run again")
    if store is None:  # simulation: the virtual federation's store, once the nodes are right
        plan, store = prepare(cfg, run_dir, plan)
    federate(grid, cfg, store, run_dir, share_store=not store_dir, finish=finish)


def simulation_config_command(num_sites: int) -> str:
    """The `flwr federation` subcommand that gives Flower's local simulation `num_sites`
    SuperNodes (Flower 1.41-1.42 keeps it in $FLWR_HOME/config.toml, not in pyproject)."""
    return f"simulation-config @none/default local --num-supernodes {num_sites}"
