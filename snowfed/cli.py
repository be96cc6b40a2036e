"""The `snowfed` command.

    snowfed run [HYDRA OVERRIDES]      one simulation (e.g. federation=smoke rounds=2)
    snowfed run -m [SWEEP OVERRIDES]   a Hydra multirun sweep (e.g. seed=0,1,2)
    snowfed run resume=DIR [rounds=N]  continue a stopped run from its last checkpoint
    snowfed report DIR... [FLAGS]      a table of finished runs (e.g. strategy x noise preset)
    snowfed bench [--quick]            snowfed against stock Flower and a plain PyTorch loop
    snowfed prepare DIR [OVERRIDES]    only write the federation store (a real deployment's data)

The CLI sits on top of the stack, so its command handlers import `snowfed.sim` lazily: the core
modules themselves never import a role package.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from pathlib import Path

from snowfed.config import CONFIG_PACKAGE, ConfigError, check_group_overrides, compose
from snowfed.data.loaders import DataError

USAGE = """usage: snowfed run [-m] [OVERRIDE ...]

  run        run a federated simulation; OVERRIDEs are Hydra overrides such as
             federation=smoke rounds=2 strategy.lr=0.0005 noise=noisy backend=gpu
  run -m     a sweep over comma-separated values (Hydra multirun), e.g. seed=0,1,2; run again,
             the same command runs only the jobs that have not completed
  run resume=DIR [rounds=N]
             continue the run in DIR from its last completed round (its own config; only
             rounds, verbose and personalize_steps may change)
  report     DIR... [--rows KEY] [--cols KEY] [--metric NAME] [--out DIR]: mean and spread of a
             final global metric over the completed runs under DIR, grouped by two config keys
             (defaults strategy.name x noise.name, f1) and a pairwise Wilcoxon score of the
             rows; writes report.md, report.csv and three plots: metric_per_round.png,
             metric_vs_noise.png (--noise-key KEY: a numeric config key as the noise level,
             default the measured label noise) and quality_quantity.png;
             --privacy-plot KEY: the metric against the epsilon spent (privacy_utility.png)
  bench      [--quick] [--only W1,W2,S,MEM] [--out DIR]: snowfed against a stock Flower app and a
             plain PyTorch loop on the same work; the last line holds the ratios (docs/benchmarks.md)
  prepare    DIR [OVERRIDE ...]: validate the config and write its federation store to DIR,
             without training: the data of a real deployment's rehearsal (docs/deployment.md)

Config groups: task dataset model federation noise strategy aggregation privacy backend experiment
(`snowfed run --cfg job` prints the composed config; `--help` lists the options of each group).
"""

EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
BAD_INPUT = (ConfigError, DataError)  # a config key or a data file that cannot work
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else EXIT_BAD_CONFIG
    command, args = argv[0], argv[1:]
    if command == "report":
        return report_command(args)
    if command == "prepare":
        return prepare_command(args)
    if command == "bench":
        from snowfed.sim.bench import main as bench_main

        return bench_main(args)
    if command != "run":
        print(f"snowfed: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return run_command(args)


def report_command(args: list[str]) -> int:
    import argparse

    from snowfed.sim.report import (
        build_table,
        check_report_keys,
        find_runs,
        friedman_ranking,
        pairwise_score,
        write_plots,
        write_ranking,
        write_report,
    )

    parser = argparse.ArgumentParser(prog="snowfed report")
    parser.add_argument("dirs", nargs="+", help="run or sweep directories")
    parser.add_argument("--rows", default="strategy.name", help="config key of the rows")
    parser.add_argument("--cols", default="noise.name", help="config key of the columns")
    parser.add_argument("--metric", default="f1", help="final global metric (f1, dice, mcc, ...)")
    parser.add_argument("--row-order", default="", help="comma-separated row labels, in order")
    parser.add_argument("--col-order", default="", help="comma-separated column labels, in order")
    parser.add_argument("--out", help="where report.md, report.csv and the plots go (default: the "
                        "first DIR)")
    parser.add_argument("--noise-key", metavar="KEY", help="the noise level of metric_vs_noise.png: "
                        "a numeric config key (e.g. noise.p_remove, "
                        "federation.hospitals.1.noise.rate); default: the run's measured label "
                        "noise, 1 - label F1 (segmentation) or the flip rate (classification), "
                        "num_train-weighted mean over sites")
    parser.add_argument("--privacy-plot", metavar="KEY", help="also plot the metric against the "
                        "epsilon spent, one series per value of config KEY (e.g. "
                        "privacy.noise_multiplier): privacy_utility.png")
    try:
        opts = parser.parse_args(args)
    except SystemExit as exit_:
        return EXIT_BAD_CONFIG if exit_.code else 0
    try:
        runs = find_runs(opts.dirs)
    except FileNotFoundError as err:
        print(f"snowfed: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    row_order, col_order = ([t for t in order.split(",") if t] for order in (opts.row_order, opts.col_order))
    keys = {"--rows": opts.rows, "--cols": opts.cols, "--noise-key": opts.noise_key,
            "--privacy-plot": opts.privacy_plot}
    try:
        check_report_keys(runs, {flag: key for flag, key in keys.items() if key}, opts.metric)
    except ValueError as err:
        print(f"snowfed: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    table = build_table(runs, opts.rows, opts.cols, opts.metric, row_order, col_order)
    out = Path(opts.out or opts.dirs[0])
    score = pairwise_score(runs, opts.rows, opts.cols, opts.metric)
    ranking = friedman_ranking(runs, opts.rows, opts.cols, opts.metric, row_order=row_order,
                               col_order=col_order)
    plots = write_ranking(ranking, out, opts.metric) + write_plots(runs, table, out, opts.noise_key)
    md, csv_path = write_report(table, out, score, plots, ranking)
    if opts.privacy_plot:
        from snowfed.plots import plot_metric_against_epsilon
        from snowfed.sim.report import Cell, privacy_utility

        series, reference = privacy_utility(runs, opts.privacy_plot, opts.metric)
        plot_metric_against_epsilon(series, out / "privacy_utility.png", opts.metric, reference)
        for label, points in [*series.items(), ("no privacy", [(0.0, v) for v in reference])]:
            eps, values = Cell(tuple(p[0] for p in points)), Cell(tuple(p[1] for p in points))
            print(f"{label}: epsilon {eps.mean:.2f}, {opts.metric} {values.text()} "
                  f"[{', '.join(f'{v:.3f}' for v in values.values)}]")
        print(f"wrote {out / 'privacy_utility.png'}")
    print(table.markdown(), end="")
    print(ranking.markdown(), end="")
    print(score.markdown(), end="")
    for line in plots:  # report.md's plot sections: a caption and image, or why not drawn
        if line.startswith("#"):
            continue
        if line.startswith("!["):
            print(f"  wrote {out / line[line.index('](') + 2 : -1]}")
        elif line:
            print(line)
    print(f"{sum(len(c.values) for c in table.cells.values())} runs ({table.skipped} not completed "
          f"skipped); wrote {md} and {csv_path}")
    return 0


def prepare_command(args: list[str]) -> int:
    """Write the federation store of the config (synthetic data, each site's labels) to DIR: the
    folder a deployment's coordinator and partner sites use until sites load their own images."""
    from snowfed.sim.federation import build_store
    from snowfed.sim.runner import plain_config, validate

    if not args or "=" in args[0]:
        print("usage: snowfed prepare DIR [OVERRIDE ...]", file=sys.stderr)
        return EXIT_BAD_CONFIG
    out, overrides = Path(args[0]), args[1:]
    try:
        if out.exists() and any(out.iterdir()):
            raise ConfigError("DIR", str(out), "a new or empty folder")
        cfg = plain_config(compose(overrides))
        plan = validate(cfg)
    except BAD_INPUT as err:
        print(f"snowfed: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    store = build_store(plan, cfg, out)
    names = ", ".join(f"{i}={n['name']}" for i, n in enumerate(store.nodes))
    print(f"wrote the store of federation {plan.name!r} to {out} (partition-id=name: {names})")
    return 0


def run_command(args: list[str]) -> int:
    from snowfed.sim.runner import plain_config, validate

    try:
        args, parallel = _parallel_flag(args)
    except ConfigError as err:
        print(f"snowfed: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    overrides = [a for a in args if "=" in a and not a.startswith("-")]  # not flag values
    multirun = any(a in ("-m", "--multirun") for a in args)
    if any(o.startswith("resume=") for o in overrides) and not multirun:
        return resume_command(overrides)
    try:
        check_group_overrides(overrides)
        if not multirun:
            validate(plain_config(compose(overrides)))
        else:  # the keys a sweep names must exist: its first job's composition says so in a line
            compose(_first_choices(overrides))
    except BAD_INPUT as err:
        print(f"snowfed: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    sys.argv = ["snowfed-run", *args]
    _SWEEP_JOBS.clear()
    with _interrupt_exits():
        try:
            _hydra_run()  # a multirun only collects its jobs (`_job`); they run below, together
        except SystemExit as exit_:
            return int(exit_.code or 0)
        if multirun:
            return _run_sweep(parallel)
    return 0


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


def _parallel_flag(args: list[str]) -> tuple[list[str], int | str]:
    """`--parallel N|auto` (a sweep's runs at once in its simulation), taken out of the args."""
    if "--parallel" not in args:
        return args, "auto"
    i = args.index("--parallel")
    value = args[i + 1] if i + 1 < len(args) else ""
    if value != "auto":
        if not value.isdigit():
            raise ConfigError("--parallel", value, "auto or a whole number of runs")
        value = int(value)
    return args[:i] + args[i + 2 :], value


def _run_sweep(parallel: int | str) -> int:
    from snowfed.sim.sweep import run_sweep

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

    from snowfed.sim.runner import resume

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
    the interpreter's teardown: a Ctrl-C before the simulation took over (sim.runner.ctrl_c_sets)
    leaves Ray starting in a thread (sim.runner.RayStart), and tearing it down from there
    crashed the interpreter (seen: a segfault)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            print("snowfed: interrupted; the run directory holds everything up to the last round "
                  "(continue it with `snowfed run resume=DIR`)", file=sys.stderr, flush=True)
            sys.stdout.flush()
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
    if summary.get("diagnostics"):
        line += f"\n{verdict(summary['diagnostics'])}"
    print(line)


def _job(cfg) -> None:
    """One Hydra job: the run directory is Hydra's output directory (`run_dir`). A multirun's
    jobs are only collected here; `snowfed.sim.sweep` then runs them in one simulation (and
    skips or resumes what an earlier start of the same sweep left)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from snowfed.sim.runner import plain_config, run
    from snowfed.sim.sweep import Job

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        _SWEEP_JOBS.append(Job(plain_config(cfg), run_dir))
        return
    summary = run(cfg, run_dir)
    _print_outcome(summary, run_dir)
    if summary["status"] != "completed":
        sys.exit(EXIT_FAILED)


def _hydra_run() -> None:
    import hydra

    hydra.main(version_base=None, config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")(
        _job
    )()


def console() -> None:
    """The `snowfed` command. Everything a command writes is closed by the time `main` returns;
    the interpreter's final garbage collection then walks the millions of objects torch, Ray and
    Flower leave behind (1.4 s of every run here), so they are frozen out of it: the process
    ends and the OS takes the memory back."""
    # SIGTERM (SLURM, `timeout`, a container stop) ends a run as Ctrl-C does: interrupted, its
    # summary written, resumable (sim.runner.ctrl_c_sets during the simulation)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    code = main()
    sys.stdout.flush()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
