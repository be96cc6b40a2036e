"""Every command in README.md and docs/ holds against the code, so the pages cannot drift.

- `snowfed run` and `snowfed prepare` lines go through what the command does before it starts
  anything (composition and validation; a sweep's first job), `report` and `bench` lines through
  their option parsing; a `$ snowfed ...` example followed by its output is run and must print it.
- The README's quick-start sweep and report run for real with tiny overrides.
- Other commands are checked where they are run: docs/deployment.md's word for word by
  tests/test_deployment.py, `flwr run` and the SuperLink's stop by tests/test_flwr_run.py.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from snowfed.cli import EXIT_BAD_CONFIG, _first_choices, main, validate_overrides
from snowfed.config import check_group_overrides, compose

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# the first word of a command that other tests run (see the module docstring), or that needs a
# machine this suite does not set up (a GPU, a tracking UI)
RUN_ELSEWHERE = {"make", "flwr", "flower-superlink", "flower-supernode", "deploy/tls-certificates.sh",
                 "deploy/supernode-key.sh", "mkdir", "cat", "export", ".", "pip", "tensorboard",
                 "pid=$(pgrep", "kill", "python", ".venv/bin/python", "eval"}


def _commands(page: Path) -> list[str]:
    """The commands of a page's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        block = re.sub(r"<<'?EOF'?\n.*?\nEOF\n", "\n", block, flags=re.S).replace("\\\n", " ")
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _examples(page: Path) -> list[tuple[str, str]]:
    """`$ command` lines of a page's plain ``` blocks, each with the line printed after it."""
    pairs = []
    for block in re.findall(r"```\n(.*?)```", page.read_text(), flags=re.S):
        lines = block.splitlines()
        pairs += [(line[2:], lines[i + 1]) for i, line in enumerate(lines[:-1]) if line.startswith("$ ")]
    return pairs


ALL = [(page.relative_to(REPO).as_posix(), c) for page in PAGES for c in _commands(page)]


def test_the_pages_have_commands():
    assert len([c for _, c in ALL if c.startswith("snowfed")]) >= 40


@pytest.mark.parametrize(("page", "command"), ALL, ids=[f"{p}:{c[:60]}" for p, c in ALL])
def test_documented_command_holds(page, command, tmp_path, monkeypatch, capsys):
    first = command.split()[0]
    if page == "docs/deployment.md" and "$" in command and first not in RUN_ELSEWHERE:
        from tests.test_deployment import COMMANDS

        assert any(command in c for c in COMMANDS.values()), f"{command!r} is not in test_deployment"
        return
    words = shlex.split(os.path.expandvars(command))  # what the shell hands the command
    if words[0] == ".venv/bin/snowfed":
        words[0] = "snowfed"
    if words[0] != "snowfed":
        assert command.split()[0] in RUN_ELSEWHERE, f"{page}: nothing checks {command!r}"
        return
    monkeypatch.chdir(tmp_path)
    # docs/cluster.md's clusters are the reader's: their addresses are checked for form here, and
    # a live cluster answering is tests/test_cluster.py's
    from snowfed.sim.run import plan

    monkeypatch.setattr(plan, "attach_address", plan.cluster_address)
    sub, args = words[1], words[2:]
    if sub == "run":
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        if any(o.startswith("resume=") for o in overrides):
            assert set(a.split("=")[0] for a in overrides) <= {"resume", "rounds", "verbose",
                                                                "personalize_steps"}
            return
        check_group_overrides(overrides)
        if "-m" in args or "--multirun" in args:
            overrides = _first_choices(overrides)
        overrides = [o for o in overrides if not o.startswith("hydra.")]
        if any(o.startswith("dataset.path=") or ".path=" in o for o in overrides):
            compose(overrides)  # its files are the reader's own: the keys must exist
        else:
            validate_overrides(overrides)
    elif sub == "prepare":
        validate_overrides(args[1:])
    elif sub in ("report", "bench"):
        assert main([sub, *args, "--help"]) == 0, capsys.readouterr().err
    elif sub == "serve" and "--stop" not in args:  # it would serve until stopped: its flags and config
        assert main([sub, *args, "--help"]) == 0, capsys.readouterr().err
        validate_overrides([a for a in args if "=" in a and not a.startswith("-")])
    else:
        assert main(words[1:]) == 0


EXAMPLES = [(page.relative_to(REPO).as_posix(), c, out) for page in PAGES for c, out in _examples(page)]


@pytest.mark.parametrize(("page", "command", "printed"), EXAMPLES,
                         ids=[f"{p}:{c[:50]}" for p, c, _ in EXAMPLES])
def test_documented_output_is_what_the_command_prints(page, command, printed, capsys, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "summary.json").write_text("{}")
    assert main(shlex.split(command)[1:]) == EXIT_BAD_CONFIG
    said = capsys.readouterr().err.strip()
    assert said.startswith(printed.removesuffix("...").strip()), (page, said)


@pytest.mark.slow
def test_the_quick_start_sweep_and_report_run(tmp_path, monkeypatch):
    readme = _commands(REPO / "README.md")
    sweep = next(c for c in readme if c.startswith("snowfed run -m"))
    report = next(c for c in readme if c.startswith("snowfed report"))
    monkeypatch.chdir(tmp_path)
    tiny = ["rounds=1", "strategy.local_steps=2", "seed=0,1"]  # seed: the last value wins
    assert main(shlex.split(sweep)[1:] + tiny) == 0
    assert main(shlex.split(report)[1:]) == 0
    out = Path(shlex.split(report)[2])
    assert (out / "report.md").exists() and (out / "metric_per_round.png").exists()
    assert len(list(out.glob("*/summary.json"))) == 6  # 3 strategies x 2 seeds
    assert (out / "critical_difference.png").exists()
