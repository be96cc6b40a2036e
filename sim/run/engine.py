"""Flower's simulation engine with the Ray backend: Ray started early in a background thread,
the terminal kept to snowfed's own lines, Ctrl-C turned into an orderly stop."""

from __future__ import annotations

import copy
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from snowfed.config import ConfigError
from snowfed.sim.run.plan import attach_address, backend_config
from snowfed.sim.run.processes import end_children, ray_environment


class _DropLines(logging.Filter):
    """Drops the records whose message holds one of `phrases`."""

    def __init__(self, *phrases: str):
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(phrase in record.getMessage() for phrase in self.phrases)


# Lines that say nothing a snowfed user can act on. run_simulation is Flower's Python entry to its
# simulation engine and the only one that takes a ServerApp object, and Flower calls it
# deprecated. Ray starts in a thread (RayStart), so it says it set no SIGTERM handler: snowfed's
# own, on the main thread, ends a run as Ctrl-C does (cli.console, ctrl_c_sets).
_FLOWER_NOISE = _DropLines("run_simulation")


class _DropSiteErrors(logging.Filter):
    """Drops Flower's ERROR records of a site's exception (its Ray backend's notice, the
    exception and its traceback): Flower turns it into the site's error reply, which snowfed
    records (metrics.jsonl: the exception's line, and the traceback) and the run's last lines
    name. With `verbose=true` they print as Flower logs them."""

    WHERE = {("raybackend", "process_message"), ("vce_api", "worker")}

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.module, record.funcName) not in self.WHERE


_SITE_ERRORS = _DropSiteErrors()
_RAY_NOISE = _DropLines("SIGTERM handler is not set")


def quiet_terminal(verbose: bool) -> None:
    """snowfed prints its own progress; Flower's per-round INFO logs and Ray's start-up lines come
    back with `verbose=true`. Called before Ray starts (`ray_started_early`, `run_engine`)."""
    flwr, ray_logger = logging.getLogger("flwr"), logging.getLogger("ray")
    ray_worker = logging.getLogger("ray._private.worker")  # a filter acts where a record is made
    # Flower's simulation imports alembic, whose plugin registry logs a line per plugin at INFO
    logging.getLogger("alembic").setLevel(logging.WARNING)
    level = logging.INFO if verbose else logging.WARNING
    flwr.setLevel(level)
    ray_logger.setLevel(level)
    for logger, noise in ((flwr, _FLOWER_NOISE), (flwr, _SITE_ERRORS), (ray_worker, _RAY_NOISE)):
        if verbose:
            logger.removeFilter(noise)
        else:
            logger.addFilter(noise)  # a filter already there is not added twice
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")


PRELOAD = "snowfed.client.preload"  # what every Ray worker imports as it starts


def ray_init_args(cfg: Mapping[str, Any], address: str | None) -> dict[str, Any]:
    """`ray.init`'s arguments for a run (`address`: the backend's `attach_address`, resolved
    once by the caller): the backend's `init_args`, and

    - on one machine, a private Ray (`address="local"`: never a cluster that `ray start` or
      RAY_ADDRESS left on this machine) whose workers preload the ClientApp's imports (Ray's
      `preload_python_modules`; a runtime_env setup hook would stop Ray from starting workers
      before the actors ask for them);
    - with backend=cluster, the cluster's address: its own system config stays as its head node
      set it (Ray refuses another), so its workers import the ClientApp at their first message.

    The actors' own output (Flower's "Manually terminating ClientAppActor" at every shutdown)
    reaches the terminal with `verbose=true` only: a site's failure comes back to the server as
    an error reply, recorded in its metrics and summarised."""
    backend = cfg["backend"]
    logs = {"log_to_driver": bool(cfg.get("verbose", False)),
            "logging_level": logging.INFO if cfg.get("verbose") else logging.WARNING}
    if address is not None:
        return {**logs, **backend_config(backend)["init_args"], "address": address}
    return {"address": "local", "include_dashboard": False, **logs,
            **backend_config(backend)["init_args"],
            "_system_config": {"preload_python_modules": [PRELOAD]}}


class RayStart:
    """Ray started in a background thread, so that its start (about 4 s here, mostly spent
    waiting for its processes) and its workers' imports overlap the driver's own start-up:
    config checks, loading the data, building the store. `run_engine` waits for it.

    Ray's processes are started with PR_SET_PDEATHSIG, so they die with the thread that started
    them: the thread stays until Ray is shut down (Flower's backend does that at the end of a
    simulation; `close` does it for a start nobody used)."""

    def __init__(self, cfg: Mapping[str, Any]):
        address = attach_address(cfg["backend"])
        self.init_args = ray_init_args(cfg, address)
        quiet_terminal(bool(cfg.get("verbose", False)))
        ray_environment(address)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        threading.Thread(target=self._start, name="snowfed-ray-start", daemon=True).start()

    def _start(self) -> None:
        import ray

        try:
            ray.init(**copy.deepcopy(self.init_args))  # Ray adds to the _system_config it is given
        except BaseException as exc:  # noqa: BLE001 - raised in the thread that waits for it
            self._error = exc
        finally:
            self._ready.set()
        while ray.is_initialized():
            time.sleep(0.5)

    def wait(self) -> None:
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Shut down a Ray this start left running (the run stopped before its simulation)."""
        import ray

        self._ready.wait()
        if ray.is_initialized():
            ray.shutdown()


@contextmanager
def ray_started_early(cfg: Mapping[str, Any] | None) -> Iterator[RayStart | None]:
    """A background start of Ray for a simulation of `cfg` (None: no start, nor for a config
    whose backend keys are bad: validation names them), closed when the block ends. Not on
    Ctrl-C: during the simulation Flower has shut Ray down already (`ctrl_c_sets`); before it,
    the CLI leaves at once (cli._interrupt_exits), since shutting Ray down from a
    KeyboardInterrupt crashed the interpreter (seen: a segfault)."""
    start = None
    if cfg is not None:
        try:
            start = RayStart(cfg)
        except (ConfigError, KeyError, TypeError):
            start = None
    try:
        yield start
    except KeyboardInterrupt:
        raise
    except BaseException:
        if start is not None:
            start.close()
        raise
    if start is not None:
        start.close()


@contextmanager
def ctrl_c_sets(stop: threading.Event | None) -> Iterator[None]:
    """Ctrl-C (or SIGTERM, which SLURM and `timeout` send) during a simulation sets `stop`: the
    ServerApp's loops (run_federation) then end at their next wait for replies, the runs'
    summaries say `interrupted`, and Flower ends the simulation in order: its workers finish the
    client task in hand, then it shuts Ray down. A KeyboardInterrupt in the engine's thread
    instead shut Ray down under those workers, and the interpreter crashed (a segfault, about one
    Ctrl-C in three). A second Ctrl-C leaves at once: the run directory is consistent after every
    write, and resumable."""
    if stop is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_ctrl_c(signum, frame) -> None:
        if stop.is_set():
            print("snowfed: interrupted twice; leaving now (the run directory holds every "
                  "completed round: `snowfed run resume=DIR`)", file=sys.stderr, flush=True)
            end_children(grace_s=0.0)
            os._exit(128 + signum)
        stop.set()
        what = "SIGTERM: " if signum == signal.SIGTERM else ""
        print(f"snowfed: {what}stopping after the client tasks in hand (Ctrl-C again to leave at "
              "once)", file=sys.stderr, flush=True)

    before = {sig: signal.signal(sig, on_ctrl_c) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def run_engine(server_app, num_sites: int, cfg: Mapping[str, Any], ray_start: RayStart | None = None,
               stop: threading.Event | None = None) -> None:
    """Flower's simulation engine (Ray backend) with snowfed's ClientApp on `num_sites` nodes.

    Ray is started by snowfed (`ray_start`, or here), before the engine would start it, without
    the runtime_env Flower adds (a PYTHONPATH for apps it installs itself; snowfed is installed
    in this interpreter): the worker processes Ray starts at init, which have imported the
    ClientApp already, then host the actors at once. Flower's backend skips ray.init when Ray is
    up and shuts Ray down when the simulation ends (attached to a cluster, backend=cluster: it
    disconnects, and the cluster stays). `stop`: set by Ctrl-C (`ctrl_c_sets`)."""
    address = attach_address(cfg["backend"])
    ray_environment(address)
    import ray
    import torch
    from flwr.simulation import run_simulation

    from snowfed.client.app import app as client_app

    verbose = bool(cfg.get("verbose", False))
    quiet_terminal(verbose)
    args = ray_init_args(cfg, address)
    if ray_start is not None:
        ray_start.wait()
        if ray_start.init_args != args:  # started for another run's backend
            ray.shutdown()
    if not ray.is_initialized():
        ray.init(**args)
    if address is not None:
        from snowfed.sim.run.cluster import actors_on_cluster

        actors_on_cluster(cfg["backend"])  # a node has room for a site, or ConfigError
    # The actors have the CPUs (one thread each): the server's evaluation, which runs while they
    # train, takes one thread too, rather than OpenMP threads spinning against the actors.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ctrl_c_sets(stop):
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_sites,
                           backend_config=backend_config(cfg["backend"]), verbose_logging=verbose)
    finally:
        torch.set_num_threads(threads)


def simulate(cfg: dict[str, Any], plan, store, run_dir: Path, on_round,
             ray_start: RayStart | None = None):
    """The federation under Flower's simulation engine (Ray backend); the server's result."""
    from flwr.serverapp import ServerApp

    from snowfed.server.app import run_federation
    from snowfed.server.transport import RunInterrupted
    from snowfed.sim.run.cluster import require_store_on_every_node

    outcome: dict[str, Any] = {}
    server_app = ServerApp()
    stop = threading.Event()

    @server_app.main()
    def main(grid, context) -> None:
        try:
            require_store_on_every_node(cfg, store)
            outcome["result"] = run_federation(grid, cfg, store, run_dir, on_round, stop=stop)
        except (Exception, RunInterrupted) as exc:  # Flower only logs a ServerApp's exception
            outcome["error"] = exc

    run_engine(server_app, len(plan.hospitals), cfg, ray_start, stop)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
