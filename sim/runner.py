"""One simulation: validate, build the federation, run Flower's simulation engine (Ray backend),
leave the run directory behind (config.yaml, metrics.jsonl, checkpoint.pt, summary.json, plots).

`resume` continues a stopped run from its last checkpoint in the same directory. The reference
aggregations (`pooled`, `local`) are not federated and run in this process (sim.reference).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from snowfed.config import (
    ConfigError,
    require,
    require_creatable_dir,
    require_int,
    require_keys,
    require_number,
)
from snowfed.plots import noise_label, plot_f1_per_round
from snowfed.progress import RoundProgress
from snowfed.rundir import (
    CONFIG,
    FINAL_MODEL,
    METRICS,
    SUMMARY,
    atomic_write_json,
    atomic_write_text,
    build_summary,
    load_checkpoint,
    read_jsonl,
    read_summary_status,
    run_lock,
)
from snowfed.server.aggregation import REFERENCES, sites_per_round
from snowfed.server.privacy import CENTRAL
from snowfed.server.privacy import PARAMS as CENTRAL_PARAMS
from snowfed.server.quality import quality_report
from snowfed.sim.processes import end_children, ray_environment
from snowfed.store import FederationStore
from snowfed.tracking import RunTracking, validate_logger

from .federation import build_store, node_facts, resolve_federation
from .sites import configured_model, expand_hospitals

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
    if num_gpus > 0:  # else Flower's actor pool stays empty and the simulation waits forever
        import torch

        require(torch.cuda.is_available(), "backend.client_resources.num_gpus", num_gpus,
                "0 on this machine (torch sees no CUDA device; backend=cpu runs the clients on "
                "the CPU)")
    init_args = dict(backend.get("init_args") or {})
    return {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, "init_args": init_args}


def validate(cfg: Mapping[str, Any]):
    """Every check that can fail, before any data is generated or Ray starts."""
    plan = resolve_federation(cfg)  # the aggregation's keys and site counts included
    backend_config(cfg["backend"])
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


def prepare(cfg: Mapping[str, Any], run_dir: Path):
    """Validate, write config.yaml and the federation store; return (plan, store)."""
    plan = validate(cfg)
    start_run_dir(cfg, run_dir)
    store = build_store(plan, cfg, run_dir / STORE_DIR)
    return plan, store


def start_run_dir(cfg: Mapping[str, Any], run_dir: Path, key: str = "run_dir") -> None:
    """Refuse a run directory holding a previous run's results; write config.yaml into it."""
    require_creatable_dir(run_dir, key)
    if (run_dir / METRICS).exists() or (run_dir / SUMMARY).exists():
        raise ConfigError(key, str(run_dir), "a new or empty run directory (this one holds "
                          "a previous run's results, which snowfed never overwrites)")
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.create(dict(cfg)))
    atomic_write_text(run_dir / STARTED_CONFIG, text)  # what resume compares config.yaml with
    atomic_write_text(run_dir / CONFIG, text)


STARTED_CONFIG = ".config-at-start.yaml"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: leaf value}."""
    if isinstance(value, Mapping) and value:
        return {k: v for key, item in value.items()
                for k, v in _flat(item, f"{prefix}.{key}" if prefix else str(key)).items()}
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}.{i}").items()}
    return {prefix: value}


def edited_keys(run_dir: Path, cfg: Mapping[str, Any]) -> list[str]:
    """The keys of `cfg` (the run's config.yaml) that differ from the config the run started
    with, as `key: old -> new`, RESUME_OVERRIDES aside; none when the run predates the record."""
    if not (run_dir / STARTED_CONFIG).is_file():
        return []
    before = _flat(plain_config(OmegaConf.load(run_dir / STARTED_CONFIG)))
    after = _flat(dict(cfg))
    changed = sorted(k for k in before.keys() | after.keys()
                     if k.split(".")[0] not in RESUME_OVERRIDES and before.get(k) != after.get(k))
    return [f"{k}: {before.get(k, '(absent)')!r} -> {after.get(k, '(absent)')!r}" for k in changed]


def finish(run_dir: Path, store, status: str, wall_time_s: float, reason: str | None = None) -> dict:
    """Write summary.json and the plots from whatever metrics.jsonl holds (also after a crash)."""
    records = read_jsonl(run_dir / METRICS)
    facts = node_facts(store)
    summary = build_summary(records, facts, status, wall_time_s, reason)
    quality = quality_report(records, facts)
    if quality is not None:
        summary["quality"] = quality
    personalized = [n["personalized"] for n in summary["nodes"].values() if "personalized" in n]
    if personalized:
        summary["personalization"] = {
            k: sum(p[f"{k}-f1"] for p in personalized) / len(personalized)
            for k in ("global", "personalized")
        }
    spent = {name: {k: n["final_train"][k] for k in ("epsilon", "delta", "dp-steps", "noise-multiplier",
                                                     "sample-rate")}
             for name, n in summary["nodes"].items() if "epsilon" in n.get("final_train", {})}
    if spent:
        summary["privacy"] = spent
    if "data" in store.manifest:  # a loaded dataset: source, skipped files, leakage check
        summary["data"] = store.manifest["data"]
    shortcut = _shortcut_summary(run_dir, store)
    if shortcut:
        summary["shortcut"] = shortcut
    atomic_write_json(run_dir / SUMMARY, summary)
    plot_f1_per_round(records, run_dir / F1_PLOT,
                      {n: noise_label(f["noise_profile"], f["noise"]) for n, f in facts.items()})
    return summary


def _shortcut_summary(run_dir: Path, store) -> dict:
    """The final model at each shortcut site, with and without the shortcut (the trap shown)."""
    if not any("shortcut" in n for n in store.nodes) or not (run_dir / FINAL_MODEL).is_file():
        return {}
    import torch

    from snowfed.server.app import build_global_model

    from .dataset_sites import shortcut_report

    cfg = store.manifest
    model = build_global_model(cfg["model"], cfg["num_classes"], int(cfg["seed"]))
    model.load_state_dict(torch.load(run_dir / FINAL_MODEL, map_location="cpu", weights_only=True))
    return shortcut_report(store, model)


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


PRIVACY = ("none", "dp_sgd", *CENTRAL, "secagg")
SECAGG_UNSUPPORTED = (
    "a privacy option this Flower supports: Flower 1.41 has SecAgg+ only in its legacy workflow "
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
    edited = edited_keys(run_dir, cfg)
    require(not edited, "resume", str(run_dir), f"a run whose {CONFIG} is as the run started (edited "
            f"since: {'; '.join(edited)}); put the values back, or start a new run")
    cfg.update(overrides)
    validate(cfg)
    finished = saved["round"] == cfg["rounds"] and read_summary_status(run_dir) == "completed"
    require(saved["round"] <= cfg["rounds"] and not finished, "rounds", cfg["rounds"],
            f"more than the {saved['round']} rounds this run has completed already")
    atomic_write_text(run_dir / CONFIG, OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return _run_locked(cfg, run_dir, True, federate, quiet, on_round)


# How a federated run's rounds are carried out: (cfg, plan, store, run_dir, on_round) -> the
# server's FederationResult. `simulate` (the default) starts Flower's simulation engine for this
# run alone; a sweep (sim.sweep) runs many federations on one simulation's Grid.
Federate = Callable[..., Any]


RoundHook = Callable[[int, dict, dict[str, float]], None]  # (round, global metrics, node f1)


def run(
    cfg: DictConfig | Mapping[str, Any], run_dir: str | Path, resuming: bool = False,
    federate: Federate | None = None, quiet: bool = False, on_round: RoundHook | None = None,
) -> dict[str, Any]:
    """Run one simulation to its end; returns the summary (also written to summary.json).
    `resuming`: the run directory holds this run's store and checkpoint (see `resume`).
    `federate`: how the rounds are run (default `simulate`); `quiet`: no per-round lines;
    `on_round`: also called after each evaluated round (round 0 is the initial model)."""
    cfg = plain_config(cfg)
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        return _run_locked(cfg, run_dir, resuming, federate, quiet, on_round)


def _run_locked(cfg: dict[str, Any], run_dir: Path, resuming: bool, federate: Federate | None = None,
                quiet: bool = False, hook: RoundHook | None = None) -> dict[str, Any]:
    federated = federate is None and cfg.get("aggregation", {}).get("name") not in REFERENCES
    with ray_started_early(cfg if federated else None) as ray_start:
        return _run_started(cfg, run_dir, resuming, federate, quiet, hook, ray_start)


def _run_started(cfg: dict[str, Any], run_dir: Path, resuming: bool, federate: Federate | None,
                 quiet: bool, hook: RoundHook | None, ray_start: RayStart | None) -> dict[str, Any]:
    from snowfed.server.app import FederationStopped

    if resuming:
        plan, store = validate(cfg), FederationStore(run_dir / STORE_DIR)
    else:
        plan, store = prepare(cfg, run_dir)
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
            from .reference import run_reference

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


PRELOAD = "snowfed.client.preload"  # what every Ray worker imports as it starts
def ray_init_args(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`ray.init`'s arguments for a run: the backend's `init_args`, and the ClientApp's imports
    preloaded in every worker (Ray's `preload_python_modules`; a runtime_env setup hook would
    stop Ray from starting workers before the actors ask for them). The actors' own output
    (Flower's "Manually terminating ClientAppActor" at every shutdown) reaches the terminal with
    `verbose=true` only: a site's failure comes back to the server as an error reply, recorded
    in its metrics and summarised."""
    return {"include_dashboard": False, "log_to_driver": bool(cfg.get("verbose", False)),
            "logging_level": logging.INFO if cfg.get("verbose") else logging.WARNING,
            **backend_config(cfg["backend"])["init_args"],
            "_system_config": {"preload_python_modules": [PRELOAD]}}


class RayStart:
    """Ray started in a background thread, so that its start (about 4 s here, mostly spent
    waiting for its processes) and its workers' imports overlap the driver's own start-up:
    config checks, loading the data, building the store. `run_engine` waits for it.

    Ray's processes are started with PR_SET_PDEATHSIG, so they die with the thread that started
    them: the thread stays until Ray is shut down (Flower's backend does that at the end of a
    simulation; `close` does it for a start nobody used)."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.init_args = ray_init_args(cfg)
        quiet_terminal(bool(cfg.get("verbose", False)))
        ray_environment()
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
    up and shuts Ray down when the simulation ends. `stop`: set by Ctrl-C (`ctrl_c_sets`)."""
    ray_environment()
    import ray
    import torch
    from flwr.simulation import run_simulation

    from snowfed.client.app import app as client_app

    verbose = bool(cfg.get("verbose", False))
    quiet_terminal(verbose)
    args = ray_init_args(cfg)
    if ray_start is not None:
        ray_start.wait()
        if ray_start.init_args != args:  # started for another run's backend
            ray.shutdown()
    if not ray.is_initialized():
        ray.init(**args)
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

    from snowfed.server.app import RunInterrupted, run_federation

    outcome: dict[str, Any] = {}
    server_app = ServerApp()
    stop = threading.Event()

    @server_app.main()
    def main(grid, context) -> None:
        try:
            outcome["result"] = run_federation(grid, cfg, store, run_dir, on_round, stop=stop)
        except (Exception, RunInterrupted) as exc:  # Flower only logs a ServerApp's exception
            outcome["error"] = exc

    run_engine(server_app, len(plan.hospitals), cfg, ray_start, stop)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
