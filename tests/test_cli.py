"""The `snowfed` command's surface: version, each subcommand's own help, one-line usage errors,
Hydra's shell completion through `snowfed run`."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from snowfed.cli import EXIT_BAD_CONFIG, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"snowfed {version('snowfed')}"


@pytest.mark.parametrize(("command", "options"), [
    ("run", ["--multirun", "--parallel", "resume=DIR", "--cfg job", "strategy:", "logger:"]),
    ("report", ["--rows", "--cols", "--metric", "--noise-key", "--privacy-plot", "--out"]),
    ("prepare", ["DIR"]),
    ("bench", ["--quick", "--only", "--out"]),
])
def test_each_command_lists_its_own_options(command, options, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out, option
    assert not any(tmp_path.iterdir())  # `prepare --help` writes no store into a folder "--help"


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("run", "report", "prepare", "bench", "--version"))
    assert main([]) == EXIT_BAD_CONFIG  # no command: the help, and a failing exit
    assert "Usage: snowfed" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["report", "--rowz", "x", "."], ["bench", "--quick", "3"],
                                  ["run", "--parallel", "two", "-m", "seed=0,1"]])
def test_bad_usage_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("snowfed"), err


def _bash(script: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout


def test_hydra_shell_completion_completes_snowfed_run():
    """The script Hydra prints is installed for `snowfed`; bash then completes a config group's
    options after `snowfed run`, and the subcommand after `snowfed`."""
    completion = '''eval "$(snowfed run --shell-completion install=bash)"
complete -p snowfed
for line in "snowfed run federation=sm" "snowfed run strategy.local_s" "snowfed rep"; do
  COMP_LINE="$line"; COMP_POINT=${#line}; read -ra words <<< "$line"
  COMP_CWORD=$((${#words[@]} - 1)); hydra_bash_completion; echo "${COMPREPLY[*]}"
done'''
    registered, group, key, command = _bash(completion).strip().splitlines()
    assert registered.endswith(" snowfed")
    assert group == "federation=smoke"
    assert key == "strategy.local_steps="
    assert command == "report"


def test_a_run_is_validated_once_from_the_command_to_its_store(tmp_path, monkeypatch, capsys):
    """The command checks the config before Hydra makes the run directory; the run then builds
    its store from that plan instead of checking the config again."""
    import snowfed.sim.run.plan as plan_module

    calls = []
    resolve = plan_module.resolve_federation
    monkeypatch.setattr(plan_module, "resolve_federation",
                        lambda cfg, loaded=None: calls.append(1) or resolve(cfg, loaded))
    run_dir = tmp_path / "run"
    code = main(["run", "federation=smoke", "aggregation=local", "rounds=1", "strategy.local_steps=2",
                 f"run_dir={run_dir}"])
    assert code == 0 and (run_dir / "summary.json").is_file(), capsys.readouterr().err
    assert len(calls) == 1
