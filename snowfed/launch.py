"""What `snowfed run` hands to Hydra and gets back: a run's job (warm when a `snowfed serve`
takes it, else a simulation of its own), a sweep's collected jobs run together, a resume, and
the lines that say how each ended. snowfed.cli parses the command and starts Hydra."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from snowfed.config import ConfigError
from snowfed.data.common import DataError
from snowfed.sim.run.processes import end_children

EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
class CheckedByTheServer(ValueError):
    """A config error the warm simulation found (sim.run.warm.check), as its one line."""


BAD_INPUT = (ConfigError, DataError, CheckedByTheServer)  # a config key or a data file that cannot work
EXIT_INTERRUPTED = 130


def _bad_input(err: Exception) -> int:
    print(f"snowfed: {err}", file=sys.stderr)
    return EXIT_BAD_CONFIG



def _first_choices(overrides: list[str]) -> list[str]:
    """A sweep's overrides with the first choice of each (`a,b` and `choice(a,b)` -> `a`); a
    value Hydra would expand otherwise (range, glob, interval) is left out."""
    first = []
    for override in overrides:
        key, _, value = override.partition("=")
        value = value.strip()
        if value.startswith("choice(") and value.endswith(")"):
            value = value[len("choice("):-1]
        elif "(" in value:
            continue
        if "," in value and not value.startswith(("[", "{", "'", '"')):
            value = value.split(",", 1)[0]
        first.append(f"{key}={value}")
    return first


_SWEEP_JOBS: list = []  # the jobs Hydra's multirun laid out (config and directory of each)


def _run_sweep(parallel: int | str) -> int:
    from snowfed.sim.run.sweep import run_sweep

    try:
        outcomes = run_sweep(_SWEEP_JOBS, parallel)
    except BAD_INPUT as err:
        print(f"snowfed: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    print("sweep finished: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if "interrupted" in counts:
        print("snowfed: interrupted; the same command again runs only what is missing",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0 if set(counts) <= {"completed", "skipped"} else EXIT_FAILED


def resume_command(overrides: list[str]) -> int:
    import yaml

    from snowfed.sim.run.runner import resume

    values = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
    run_dir = Path(str(values.pop("resume")))
    with _interrupt_exits():
        try:
            summary = resume(run_dir, values)
        except BAD_INPUT as err:
            print(f"snowfed: {err}", file=sys.stderr)
            return EXIT_BAD_CONFIG
    _print_outcome(summary, run_dir)
    return 0 if summary["status"] == "completed" else EXIT_FAILED


class _interrupt_exits:
    """Ctrl-C: say where the results are and leave. The summary is already on disk. Leave without
    the interpreter's teardown: a Ctrl-C before the simulation took over (sim.run.engine.ctrl_c_sets)
    leaves Ray starting in a thread (sim.run.engine.RayStart), and tearing it down from there
    crashed the interpreter (seen: a segfault)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            print("snowfed: interrupted; the run directory holds everything up to the last round "
                  "(continue it with `snowfed run resume=DIR`)", file=sys.stderr, flush=True)
            sys.stdout.flush()
            end_children(grace_s=1.0)
            os._exit(EXIT_INTERRUPTED)
        return False


def _print_outcome(summary: dict, run_dir: Path) -> None:
    """The run's status and final F1, then whether it learned (snowfed.diagnostics) as its last
    line: a degenerate or unsettled model is not an answer."""
    from snowfed.diagnostics import verdict

    line = (f"{summary['status']}: {summary['rounds']} rounds, global f1 "
            f"{summary['global'].get('f1', float('nan')):.3f}, run directory {run_dir}")
    if summary.get("reason"):
        line += f"\n  reason: {summary['reason']}"
    for name, node in summary.get("nodes", {}).items():  # left out of rounds, and why
        counts = [f"{node[key]} {what}" for key, what in (("failures", "failed replies"),
                                                          ("refused_updates", "refused updates"))
                  if node.get(key)]
        if counts:
            last = node["last_failure"]
            line += (f"\n  site {name}: {', '.join(counts)}; the last in round {last['round']} "
                     f"({last['phase']}): {last['error']}")
    if summary.get("diagnostics"):
        line += f"\n{verdict(summary['diagnostics'])}"
    print(line)


def _job(cfg, planned: tuple | None = None) -> None:
    """One Hydra job: the run directory is Hydra's output directory (`run_dir`). A multirun's
    jobs are only collected here; `snowfed.sim.run.sweep` then runs them in one simulation (and
    skips or resumes what an earlier start of the same sweep left). `planned`: the (config,
    plan, warm) the command checked (cli.planned_run), used when Hydra composed the same
    config (its run_dir aside: `now`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from snowfed.config import plain_config

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from snowfed.sim.run.sweep import Job

        _SWEEP_JOBS.append(Job(plain_config(cfg), run_dir))
        return
    cfg = plain_config(cfg)
    plan, warm = None, True
    if planned is not None and _without_run_dir(planned[0]) == _without_run_dir(cfg):
        _, plan, warm = planned
    summary = _run_warm(cfg, run_dir) if warm else None
    if summary is None:  # no warm simulation serves it: a simulation of its own
        from snowfed.sim.run.runner import run

        try:
            summary = run(cfg, run_dir, plan=plan)
        except BAD_INPUT as err:  # found once Ray is up: a cluster's nodes (sim.run.cluster)
            sys.exit(_bad_input(err))
    _print_outcome(summary, run_dir)
    if summary["status"] != "completed":
        sys.exit(EXIT_FAILED)


def _run_warm(cfg: dict, run_dir: Path) -> dict | None:
    """The run in this user's warm simulation (`snowfed serve`), with its progress lines; None
    when none serves it."""
    from snowfed.progress import RoundProgress
    from snowfed.sim.run.warm import submit

    progress: list[RoundProgress] = []

    def on_round(rnd: int, global_metrics: dict, node_f1: dict) -> None:
        if not progress:
            progress.append(RoundProgress(cfg["rounds"]))
        progress[0].update(rnd, global_metrics, node_f1)

    try:
        return submit(cfg, run_dir, on_round, say=lambda line: print(line, file=sys.stderr))
    finally:
        if progress:
            progress[0].close()


def _without_run_dir(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "run_dir"}
