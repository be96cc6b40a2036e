"""The `snowfed` command, on Typer (which Flower installs): one subcommand each, `--help` on each.

    snowfed run [HYDRA OVERRIDES]      one simulation (e.g. federation=smoke rounds=2)
    snowfed run -m [SWEEP OVERRIDES]   a Hydra multirun sweep (e.g. seed=0,1,2)
    snowfed run resume=DIR [rounds=N]  continue a stopped run from its last checkpoint
    snowfed report DIR... [FLAGS]      a table of finished runs (e.g. strategy x noise preset)
    snowfed bench [--quick]            snowfed against stock Flower and a plain PyTorch loop
    snowfed prepare DIR [OVERRIDES]    only write the federation store (a real deployment's data)
    snowfed serve [OVERRIDES]          keep a simulation warm for the runs that follow

Bad usage is one line and exit 2, as bad config is. The CLI sits on top of the stack, so its
command handlers import `snowfed.sim` lazily: the core modules themselves never import a role
package.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from snowfed.config import (
    CONFIG_PACKAGE,
    GROUPS,
    ConfigError,
    check_group_overrides,
    compose,
    group_options,
    require_creatable_dir,
)
from snowfed.launch import (
    _SWEEP_JOBS,
    BAD_INPUT,
    EXIT_BAD_CONFIG,
    EXIT_INTERRUPTED,
    _bad_input,
    _first_choices,
    _interrupt_exits,
    _job,
    _run_sweep,
    resume_command,
)
from snowfed.sim.run.processes import adopt_orphans, end_children

# Hydra's own flags that `snowfed run` hands on: they print (config, help, completion) and run
# nothing, so the overrides beside them are not validated first
HYDRA_INTROSPECTION = ("--cfg", "-c", "--info", "-i", "--hydra-help", "--shell-completion", "-sc")
_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _config_groups() -> str:
    """The config groups and their options, a line each (the epilog of `snowfed run --help`)."""
    lines = [f"- **{group}**: {', '.join(group_options(group))}" for group in GROUPS]
    return "Config groups (group=option; any key with group.key=value):\n\n" + "\n\n".join(lines)


app = typer.Typer(
    name="snowfed",
    help="Simulate a federation of hospitals with imperfect labels (Flower + Ray), and compare "
         "local strategies and aggregations.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,  # `snowfed run` completes with Hydra's own shell completion
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        print(f"snowfed {version('snowfed')}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    """Simulate a federation of hospitals with imperfect labels, and compare strategies."""


def main(argv: list[str] | None = None) -> int:
    """The command's exit code: the subcommand's own, 2 for bad usage (one line), 0 for help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-sc"], ["--shell-completion"]):
        return _complete(argv)
    try:
        code = app(args=argv, prog_name="snowfed", standalone_mode=False)
    except click.exceptions.Exit as exit_:  # --help, --version
        return exit_.exit_code
    except click.exceptions.NoArgsIsHelpError as err:  # `snowfed` alone: the help, exit 2
        print(err.ctx.get_help())
        return EXIT_BAD_CONFIG
    except click.ClickException as err:  # a usage error: one line, as bad config is
        where = f"snowfed {err.ctx.info_name}" if getattr(err, "ctx", None) else "snowfed"
        where = "snowfed" if where == "snowfed snowfed" else where
        print(f"{where}: {err.format_message()} (see {where} --help)", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except click.Abort:
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


def _complete(argv: list[str]) -> int:
    """Hydra's bash completion (`snowfed run -sc install=bash`) asks `snowfed -sc query=bash`
    with the whole line in COMP_LINE: the overrides after `snowfed run` are Hydra's to complete,
    the word after `snowfed` is a subcommand."""
    words = os.environ.get("COMP_LINE", "").split()
    if len(words) >= 2 and words[1] == "run" and (len(words) > 2 or
                                                 os.environ["COMP_LINE"].endswith(" ")):
        os.environ["COMP_LINE"] = os.environ["COMP_LINE"].replace(" run", "", 1)
        return _hydra(argv, False, "auto")
    typed = words[1] if len(words) > 1 else ""
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    print(" ".join(c for c in commands if c.startswith(typed)))
    return 0


@app.command(context_settings=_EXTRA_ARGS, epilog=_config_groups())
def run(
    overrides: Annotated[list[str] | None, typer.Argument(
        metavar="[OVERRIDE]...", help="Hydra overrides (group=option, key=value), or Hydra's "
        "flags.", show_default=False)] = None,
    multirun: Annotated[bool, typer.Option("-m", "--multirun",
                                           help="A sweep over comma-separated values, e.g. "
                                                "seed=0,1,2; the same command again runs only the "
                                                "jobs that have not completed.")] = False,
    parallel: Annotated[str, typer.Option(help="A sweep's runs at once in its one simulation: "
                                               "auto or a whole number.")] = "auto",
) -> int:
    """Run a federated simulation, or a sweep of them (-m).

    OVERRIDES are Hydra's: `federation=smoke rounds=2 strategy.lr=0.0005 noise=noisy
    backend=gpu`.

    `resume=DIR [rounds=N]` continues the run in DIR from its last completed round (its own
    config; only rounds, verbose and personalize_steps may change). Hydra's flags pass through:
    `--cfg job` prints the composed config, `--hydra-help` Hydra's help, `--shell-completion
    install=bash` the bash completion script: `eval "$(snowfed run -sc install=bash)"`.
    """
    args = list(overrides or ())
    if parallel != "auto" and not parallel.isdigit():
        return _bad_input(ConfigError("--parallel", parallel, "auto or a whole number of runs"))
    introspection = any(a in HYDRA_INTROSPECTION for a in args)
    given = [a for a in args if "=" in a and not a.startswith("-")]  # not flag values
    if any(o.startswith("resume=") for o in given) and not multirun and not introspection:
        return resume_command(given)
    planned = None  # (config, plan, warm) of a single run, checked here, handed to its Hydra job
    if not introspection:
        try:
            check_group_overrides(given)
            if not multirun:
                planned = planned_run(given)
            else:  # the keys a sweep names must exist: its first job's composition says so
                compose(_first_choices(given))
        except BAD_INPUT as err:
            return _bad_input(err)
    return _hydra(args, multirun, parallel if parallel == "auto" else int(parallel), planned)


def planned_run(overrides: list[str]) -> tuple[dict, Any, bool]:
    """(config, plan, warm) of a single run, checked once before Hydra makes its directory: by
    this user's warm simulation when one takes the run (the plan is then the server's, and this
    command imports no torch), else here."""
    from snowfed.config import plain_config
    from snowfed.launch import CheckedByTheServer
    from snowfed.sim.run.warm import check

    cfg = plain_config(compose(overrides))
    answer = check(cfg)
    if answer is None or answer["event"] == "refused":
        if answer is not None:
            print(f"snowfed: the warm simulation does not take this run ({answer['why']}); "
                  "running it cold", file=sys.stderr)
        return (*validate_overrides(overrides), False)
    if answer["event"] == "bad":
        raise CheckedByTheServer(answer["why"])
    require_creatable_dir(cfg["run_dir"], "run_dir")  # Hydra makes it before the run starts
    return cfg, None, True


def validate_overrides(overrides: list[str]) -> tuple[dict, Any]:
    """The run's config and its plan, validated once, before Hydra makes the run directory."""
    from snowfed.config import plain_config
    from snowfed.sim.run.plan import validate

    cfg = plain_config(compose(overrides))
    plan = validate(cfg)
    require_creatable_dir(cfg["run_dir"], "run_dir")  # Hydra makes it before the run starts
    return cfg, plan


def _hydra(args: list[str], multirun: bool, parallel: int | str, planned: tuple | None = None) -> int:
    """Hand the run (or the sweep's job list) to Hydra under the name `snowfed`, so its shell
    completion and help speak of `snowfed run`."""
    sys.argv = ["snowfed", *(["--multirun"] if multirun else []), *args]
    _SWEEP_JOBS.clear()
    with _interrupt_exits():
        try:
            _hydra_run(planned)  # a multirun only collects its jobs (`_job`); they run below
        except SystemExit as exit_:
            return int(exit_.code or 0)
        if multirun:
            return _run_sweep(parallel)
    return 0


@app.command()
def report(
    dirs: Annotated[list[Path], typer.Argument(help="Run or sweep directories.",
                                               show_default=False)],
    rows: Annotated[str, typer.Option(help="Config key of the rows.")] = "strategy.name",
    cols: Annotated[str, typer.Option(help="Config key of the columns.")] = "noise.name",
    metric: Annotated[str, typer.Option(help="Final global metric (f1, dice, mcc, accuracy, "
                                             "...).")] = "f1",
    row_order: Annotated[str, typer.Option(help="Comma-separated row labels, in order.")] = "",
    col_order: Annotated[str, typer.Option(help="Comma-separated column labels, in order.")] = "",
    out: Annotated[Path | None, typer.Option(help="Where report.md, report.csv and the plots "
                                                     "go (default: the first DIR).")] = None,
    noise_key: Annotated[str | None, typer.Option(
        metavar="KEY", help="The noise level of metric_vs_noise.png: a numeric config key (e.g. "
        "noise.p_remove); default: the run's measured label noise, 1 - label F1 (segmentation) "
        "or the flip rate (classification), num_train-weighted mean over sites.")] = None,
    privacy_plot: Annotated[str | None, typer.Option(
        metavar="KEY", help="Also plot the metric against the epsilon spent, one series per value "
        "of config KEY (e.g. privacy.noise_multiplier): privacy_utility.png.")] = None,
) -> int:
    """A table of finished runs: a final metric by two config keys, ranked.

    The mean and spread of a final global metric over the completed runs under DIRS, grouped by
    two config keys, with a Friedman/Nemenyi ranking of the rows and a pairwise Wilcoxon score;
    writes report.md, report.csv and the plots (metric_per_round.png, metric_vs_noise.png,
    quality_quantity.png, critical_difference.png)."""
    from snowfed.report import check_report_keys, find_runs
    from snowfed.report.command import write_reports

    try:
        runs = find_runs([str(d) for d in dirs])
    except FileNotFoundError as err:
        print(f"snowfed: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    row_order, col_order = ([t for t in order.split(",") if t] for order in (row_order, col_order))
    keys = {"--rows": rows, "--cols": cols, "--noise-key": noise_key,
            "--privacy-plot": privacy_plot}
    try:
        check_report_keys(runs, {flag: key for flag, key in keys.items() if key}, metric)
    except ValueError as err:
        print(f"snowfed: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    write_reports(runs, rows, cols, metric, row_order, col_order, Path(out or dirs[0]), noise_key,
                  privacy_plot)
    return 0


@app.command(context_settings=_EXTRA_ARGS)
def serve(
    ctx: typer.Context,
    stop: Annotated[bool, typer.Option("--stop", help="Stop this user's warm simulation.")] = False,
    idle: Annotated[float, typer.Option(help="Seconds without a run before it stops.")] = 1800.0,
) -> int:
    """Keep a simulation warm for the runs that follow.

    Ray, its actors and their imports stay up; `snowfed run` with the same number of sites and
    backend then hands its run to it, and the first round comes within seconds. OVERRIDES choose
    the sites and the backend as for `snowfed run` (e.g. `federation=smoke`). Results equal a
    cold run's. Listens on a Unix socket only this user can open (docs/warm.md)."""
    from snowfed.config import plain_config
    from snowfed.sim.run.plan import validate
    from snowfed.sim.run.warm import WarmServer, socket_path, stop_server

    if stop:
        print("snowfed serve: stopped" if stop_server() else "snowfed serve: none was running")
        return 0
    try:
        if not idle > 0:
            raise ConfigError("--idle", idle, "a number of seconds > 0")
        cfg = plain_config(compose(ctx.args))
        plan = validate(cfg)
    except BAD_INPUT as err:
        return _bad_input(err)
    server = WarmServer(cfg, len(plan.hospitals), idle)
    print(f"snowfed serve: a warm simulation of {len(plan.hospitals)} sites (backend "
          f"{cfg['backend']['name']}) at {socket_path()}; it stops after {idle:.0f} s without a "
          "run, or on snowfed serve --stop", flush=True)
    try:
        server.serve(on_ready=lambda: print("snowfed serve: ready", flush=True))
    except ConfigError as err:
        return _bad_input(err)
    return 0


@app.command(context_settings=_EXTRA_ARGS)
def prepare(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(metavar="DIR", help="A new or empty folder.",
                                        show_default=False)],
) -> int:
    """Only write the federation store: the data of a real deployment.

    Validate the config (Hydra OVERRIDES after DIR) and write its federation store to DIR,
    without training: the data of a real deployment's rehearsal (docs/deployment.md)."""
    from snowfed.config import plain_config
    from snowfed.sim.federation import build_store
    from snowfed.sim.run.plan import validate

    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError("DIR", str(out), "a new or empty folder")
        cfg = plain_config(compose(ctx.args))
        plan = validate(cfg)
    except BAD_INPUT as err:
        return _bad_input(err)
    store = build_store(plan, cfg, out)
    names = ", ".join(f"{i}={n['name']}" for i, n in enumerate(store.nodes))
    print(f"wrote the store of federation {plan.name!r} to {out} (partition-id=name: {names})")
    return 0


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="Fewer rounds, steps and runs (< 3 min).")] = False,
    only: Annotated[str, typer.Option(help="Comma-separated workloads among W1, W2, S, MEM "
                                           "(default: all).")] = "",
    out: Annotated[Path | None, typer.Option(help="Where the runs go (default: a temporary "
                                                     "folder, removed).")] = None,
) -> int:
    """Benchmark snowfed against stock Flower and a plain PyTorch loop.

    The same work three ways, each in a fresh process; the last line holds the ratios
    (docs/benchmarks.md)."""
    from snowfed.bench.benchmark import benchmark

    return benchmark(quick, [w for w in only.split(",") if w], out)


def _hydra_run(planned: tuple | None = None) -> None:
    import hydra

    def job(cfg) -> None:  # the task Hydra calls; defined here, so its module is still snowfed.cli
        _job(cfg, planned)

    hydra.main(version_base=None, config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")(job)()


def console() -> None:
    """The `snowfed` command. Everything a command writes is closed by the time `main` returns;
    the interpreter's final garbage collection then walks the millions of objects torch, Ray and
    Flower leave behind (1.4 s of every run here), so they are frozen out of it: the process
    ends and the OS takes the memory back."""
    # SIGTERM (SLURM, `timeout`, a container stop) ends a run as Ctrl-C does: interrupted, its
    # summary written, resumable (sim.run.engine.ctrl_c_sets during the simulation)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    adopt_orphans()
    try:
        code = main()
    finally:
        end_children()  # what Ray left running (sim.run.processes): none of it outlives the command
    sys.stdout.flush()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
