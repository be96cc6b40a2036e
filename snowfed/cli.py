"""The `snowfed` command.

    snowfed run [HYDRA OVERRIDES]      one simulation (e.g. federation=smoke rounds=2)
    snowfed run -m [SWEEP OVERRIDES]   a Hydra multirun sweep (e.g. seed=0,1,2)

The CLI sits on top of the stack, so its command handlers import `snowfed.sim` lazily: the core
modules themselves never import a role package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from snowfed.config import CONFIG_PACKAGE, ConfigError, check_group_overrides, compose

USAGE = """usage: snowfed run [-m] [OVERRIDE ...]

  run        run a federated simulation; OVERRIDEs are Hydra overrides such as
             federation=smoke rounds=2 strategy.lr=0.0005 noise=noisy backend=gpu
  run -m     a sweep over comma-separated values (Hydra multirun), e.g. seed=0,1,2

Config groups: task dataset model federation noise strategy aggregation privacy backend experiment
(`snowfed run --cfg job` prints the composed config; `--help` lists the options of each group).
"""

EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else EXIT_BAD_CONFIG
    command, args = argv[0], argv[1:]
    if command != "run":
        print(f"snowfed: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return run_command(args)


def run_command(args: list[str]) -> int:
    from snowfed.sim.runner import plain_config, validate

    overrides = [a for a in args if "=" in a and not a.startswith("-")]  # not flag values
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        check_group_overrides(overrides)
        if not multirun:
            validate(plain_config(compose(overrides)))
    except ConfigError as err:
        print(f"snowfed: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    sys.argv = ["snowfed-run", *args]
    try:
        _hydra_run()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("snowfed: interrupted; the run directory holds everything up to the last round",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The summary is already on disk. Ray's and gRPC's threads, interrupted mid-flight, can
        # crash the interpreter's normal teardown (seen: a segfault), so leave without it.
        os._exit(EXIT_INTERRUPTED)
    return 0


def _job(cfg) -> None:
    """One Hydra job: the run directory is Hydra's output directory (`run_dir`)."""
    from hydra.core.hydra_config import HydraConfig

    from snowfed.sim.runner import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = run(cfg, run_dir)
    print(f"{summary['status']}: {summary['rounds']} rounds, global f1 "
          f"{summary['global'].get('f1', float('nan')):.3f}, run directory {run_dir}")


def _hydra_run() -> None:
    import hydra

    hydra.main(version_base=None, config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")(
        _job
    )()


if __name__ == "__main__":
    sys.exit(main())
