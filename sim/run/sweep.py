"""A sweep: many runs in one Flower simulation, so Ray, its actors and their imports start once
per sweep instead of once per run.

`snowfed run -m ...` lets Hydra expand the sweep and make each job's directory (with its
`.hydra/` files); the jobs are then handed here together. Runs that share a simulation must have
the same number of sites (Flower's simulation has a fixed set of SuperNodes) and the same Ray
resources per client; other runs get a simulation of their own. Inside a simulation, `parallel`
runs go at once, each in its own thread of the ServerApp, all on the one Grid: their messages
queue for the same actor pool, so Ray is never asked for more than the machine has, while one
run's server-side work (aggregation, evaluation, checkpoints) and message latency are filled by
another run's client work. Each run's randomness stays its own (server.app.RunRandomness), so a
run's results do not depend on what ran beside it.

A sweep stopped half-way and started again with the same command runs only what is missing:
a completed run is skipped, an unfinished one with a checkpoint resumes from it, and one without
(stopped before round 0 was evaluated) is moved aside, kept, and run again. Ctrl-C stops the
runs in flight at their next wait for replies (their summaries say `interrupted`) and starts no
other. Reference aggregations (pooled, local) are not federated and run in this process, one
after another.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from snowfed.config import ConfigError, plain_config, require
from snowfed.progress import LiveLine
from snowfed.rundir import CHECKPOINT, METRICS, SUMMARY, read_summary_status
from snowfed.server.aggregation import REFERENCES, sites_per_round
from snowfed.server.transport import RunInterrupted
from snowfed.sim.run.engine import RayStart, ray_started_early, run_engine
from snowfed.sim.run.plan import attach_address, backend_config, cluster_address, validate
from snowfed.sim.run.runner import RoundHook, resume, run

PARALLEL_MAX = 8  # the client keeps the nodes of this many stores (client.app.STORES_KEPT)


@dataclass
class Job:
    """One run of the sweep: its resolved config and its directory."""

    cfg: dict[str, Any]
    run_dir: Path
    action: str = "run"  # run | resume | skip (set by `plan_jobs`)
    plan: Any = None  # validate's, for its run (set by `plan_jobs`)


@dataclass
class Outcome:
    job: Job
    status: str  # completed | failed | interrupted | skipped | crashed
    summary: dict[str, Any] | None = None
    error: str | None = None


def plan_jobs(jobs: Sequence[Job]) -> list[Any]:
    """Validate every job's config before anything runs (an error names the job's directory) and
    decide what each job needs: run, resume from its checkpoint, or skip (completed already).
    Jobs over the same loaded dataset share one copy of it."""
    plans, loaded = [], {}
    for job in jobs:
        job.cfg = plain_config(job.cfg)
        try:
            job.plan = validate(job.cfg, loaded)
            plans.append(job.plan)
        except ConfigError as err:
            raise ConfigError(err.key, err.value, f"{err.allowed} (sweep job {job.run_dir})") from None
        if read_summary_status(job.run_dir) == "completed":
            job.action = "skip"
        elif (job.run_dir / CHECKPOINT).exists():
            job.action = "resume"
    return plans


def parallel_runs(setting: int | str, jobs: Sequence[Job], plans: Sequence[Any]) -> int:
    """How many runs of one simulation go at once. `auto`: enough runs that the sites sampled per
    round cover every actor Flower will start, plus one to fill the gaps between rounds; a number
    is taken as given (at most PARALLEL_MAX)."""
    if setting != "auto":
        require(isinstance(setting, int) and 1 <= setting <= PARALLEL_MAX, "--parallel", setting,
                f"auto or a whole number from 1 to {PARALLEL_MAX}")
        return int(setting)
    if not jobs:
        return 1
    actors = _actors(jobs[0].cfg)
    per_round = min(sites_per_round(job.cfg["aggregation"], len(plan.hospitals))
                    for job, plan in zip(jobs, plans))
    return max(1, min(len(jobs), PARALLEL_MAX, math.ceil(actors / max(per_round, 1)) + 1))


def _actors(cfg: dict[str, Any]) -> int:
    """The actors Flower's Ray backend will start: the machine's CPUs (or GPUs) over a client's;
    on a cluster (attached already: `_run_planned`), Flower's own count over its nodes."""
    if cluster_address(cfg["backend"]) is not None:
        import ray

        from snowfed.sim.run.cluster import actors_on_cluster
        from snowfed.sim.run.engine import ray_init_args

        if not ray.is_initialized():  # a later group's simulation: run_engine keeps this Ray
            ray.init(**ray_init_args(cfg, attach_address(cfg["backend"])))
        return actors_on_cluster(cfg["backend"])
    resources = backend_config(cfg["backend"])
    init_args = resources["init_args"]
    client = resources["client_resources"]
    actors = int((init_args.get("num_cpus") or os.cpu_count() or 1) // client["num_cpus"])
    if client["num_gpus"] > 0:
        gpus = init_args.get("num_gpus")
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        actors = min(actors, int(gpus // client["num_gpus"]))
    return max(actors, 1)


class SweepProgress:
    """`sweep 4/12 | completed f1 0.812 | DIR | 3m elapsed, ~6m left` as each run ends; on a
    terminal, a live line below those: the runs done out of the total and the round of each run
    in flight (`run_hook`)."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total, self.done, self.timed = total, 0, 0
        self.line = LiveLine(stream, every_line=False)
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.in_flight: dict[int, str] = {}  # job number -> its last round, "3/6"

    def run_hook(self, number: int, rounds: int) -> RoundHook:
        """The per-round callback of job `number`: its round joins the live line."""
        def on_round(rnd: int, *_: Any) -> None:
            with self.lock:
                self.in_flight[number] = f"{rnd}/{rounds}"
                self._show()
        return on_round

    def _show(self) -> None:
        runs = " ".join(f"#{n} r{r}" for n, r in sorted(self.in_flight.items()))
        self.line.show(f"sweep {self.done}/{self.total} done | in flight: {runs or '-'} | "
                       f"{(time.monotonic() - self.start) / 60:.1f}m elapsed")

    def finished(self, outcome: Outcome, number: int | None = None) -> None:
        with self.lock:
            self.done += 1
            self.timed += outcome.status != "skipped"
            self.in_flight.pop(number, None)
            elapsed = time.monotonic() - self.start
            left = ""
            if self.timed and self.done < self.total:
                left = f", ~{elapsed / self.timed * (self.total - self.done) / 60:.1f}m left"
            what = outcome.status
            if outcome.summary and "f1" in outcome.summary.get("global", {}):
                what += f" f1 {outcome.summary['global']['f1']:.3f}"
                diagnostics = outcome.summary.get("diagnostics") or {}
                what += " degenerate" if diagnostics.get("degenerate") else ""
                what += " not-converged" if diagnostics.get("stable") is False else ""
            if outcome.error:
                what += f" ({outcome.error})"
            self.line.print(f"sweep {self.done}/{self.total} | {what} | {outcome.job.run_dir} | "
                            f"{elapsed / 60:.1f}m elapsed{left}")
            if self.in_flight:
                self._show()

    def close(self) -> None:
        self.line.close()


def run_sweep(jobs: Sequence[Job], parallel: int | str = "auto", stream: TextIO | None = None
              ) -> list[Outcome]:
    """Run every job (see the module docstring); returns their outcomes in the jobs' order."""
    parallel_runs(parallel, [], [])  # a bad --parallel stops the sweep before anything runs
    # Ray starts while the jobs are checked, for the first run that will need it
    first = next((j for j in jobs if j.cfg.get("aggregation", {}).get("name") not in REFERENCES
                  and read_summary_status(j.run_dir) != "completed"), None)
    with ray_started_early(first.cfg if first is not None else None) as ray_start:
        return _run_jobs(jobs, parallel, stream, ray_start)


def _run_jobs(jobs: Sequence[Job], parallel: int | str, stream: TextIO | None,
              ray_start: RayStart | None) -> list[Outcome]:
    progress = SweepProgress(len(jobs), stream)
    progress.line.print(f"sweep: {len(jobs)} runs; checking every config before the first starts")
    plans = plan_jobs(jobs)
    try:
        return _run_planned(jobs, plans, parallel, progress, ray_start)
    finally:
        progress.close()


def _run_planned(jobs: Sequence[Job], plans: list, parallel: int | str, progress: SweepProgress,
                 ray_start: RayStart | None) -> list[Outcome]:
    outcomes: dict[int, Outcome] = {}
    federated: dict[str, list[int]] = {}
    for i, (job, plan) in enumerate(zip(jobs, plans)):
        if job.action == "skip":
            outcomes[i] = Outcome(job, "skipped", error="done already")
            progress.finished(outcomes[i])
        elif job.cfg["aggregation"]["name"] in REFERENCES:
            outcomes[i] = _run_job(job, None, progress.run_hook(i, job.cfg["rounds"]))
            progress.finished(outcomes[i], i)
        else:
            key = json.dumps([len(plan.hospitals), backend_config(job.cfg["backend"])], sort_keys=True)
            federated.setdefault(key, []).append(i)
    stop = threading.Event()  # Ctrl-C: runs in flight stop, the ones not started stay so
    for indices in federated.values():
        group = [jobs[i] for i in indices]
        if stop.is_set():
            for i in indices:
                outcomes[i] = Outcome(jobs[i], "interrupted", error="not started")
            continue
        if ray_start is not None and cluster_address(group[0].cfg["backend"]) is not None:
            ray_start.wait()  # attached: the width counts the cluster's actors
        width = parallel_runs(parallel, group, [plans[i] for i in indices])
        progress.line.print(f"sweep: {len(group)} runs of {len(plans[indices[0]].hospitals)} sites "
                            f"in one Flower simulation, {width} at a time")
        num_sites = len(plans[indices[0]].hospitals)
        results = _simulate_group(group, indices, num_sites, width, progress, ray_start, stop)
        ray_start = None  # used (or shut down) by the first simulation
        for i, outcome in zip(indices, results):
            outcomes[i] = outcome
    return [outcomes[i] for i in range(len(jobs))]


def _simulate_group(jobs: list[Job], numbers: list[int], num_sites: int, width: int,
                    progress: SweepProgress, ray_start: RayStart | None = None,
                    stop: threading.Event | None = None) -> list[Outcome]:
    """One Flower simulation (Ray backend) whose ServerApp runs `jobs`, `width` at a time;
    once `stop` is set (Ctrl-C), the runs in flight end `interrupted` and no other starts."""
    from flwr.serverapp import ServerApp

    from snowfed.server.app import run_federation
    from snowfed.sim.run.cluster import require_store_on_every_node

    outcomes: list[Outcome | None] = [None] * len(jobs)
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        def federate(cfg, plan, store, run_dir, on_round):
            require_store_on_every_node(cfg, store)
            return run_federation(grid, cfg, store, run_dir, on_round, stop=stop)

        def one(i: int) -> None:
            if stop is not None and stop.is_set():
                outcomes[i] = Outcome(jobs[i], "interrupted", error="not started")
            else:
                hook = progress.run_hook(numbers[i], jobs[i].cfg["rounds"])
                outcomes[i] = _run_job(jobs[i], federate, hook)
            progress.finished(outcomes[i], numbers[i])

        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="snowfed-run") as pool:
            list(pool.map(one, range(len(jobs))))

    run_engine(server_app, num_sites, jobs[0].cfg, ray_start, stop)
    return [o or Outcome(job, "crashed", error="the simulation stopped before this run")
            for job, o in zip(jobs, outcomes)]


def _run_job(job: Job, federate, on_round: RoundHook) -> Outcome:
    """One run (or its resumption); a crash is recorded in the outcome, not raised, so the
    other runs of the sweep go on."""
    try:
        if job.action == "resume":
            summary = resume(job.run_dir, federate=federate, quiet=True, on_round=on_round)
        else:
            _move_aside_unfinished(job.run_dir)
            summary = run(job.cfg, job.run_dir, federate=federate, quiet=True, on_round=on_round,
                          plan=job.plan)
    except RunInterrupted:  # its summary says so; the sweep's other runs stop too
        return Outcome(job, "interrupted", error="interrupted by the user")
    except Exception as exc:  # noqa: BLE001 - reported per run; the sweep goes on
        traceback.print_exc()
        return Outcome(job, "crashed", error=f"{type(exc).__name__}: {exc}")
    return Outcome(job, summary["status"], summary)


def _move_aside_unfinished(run_dir: Path) -> None:
    """A run stopped before its first checkpoint: keep what it left under another name."""
    if (run_dir / SUMMARY).exists() or (run_dir / METRICS).exists():
        aside = run_dir.with_name(f"{run_dir.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"unfinished run moved to {aside}; running it again", file=sys.stderr, flush=True)
