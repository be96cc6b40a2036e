"""The same app under Flower's own CLI: `flwr run .` against a local simulation federation.

`flwr run` lazily starts a managed `flower-superlink --simulation` that outlives the command;
the test gives it a private FLWR_HOME and stops it afterwards."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# docs/deployment.md's way to stop the SuperLink `flwr run` started: by its PID
STOP_SUPERLINK = next(block for block in re.findall(r"```bash\n(.*?)```", (
    REPO / "docs" / "deployment.md").read_text(), flags=re.S) if "pgrep" in block)


def _superlinks() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture
def flwr_env(tmp_path):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flwr").exists():
        pytest.fail(f"flwr is not installed beside {sys.executable}")
    before = _superlinks()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           # snowfed is installed already; Flower 1.41-1.42 would otherwise `uv sync` a fresh
           # environment per run (downloading torch) before starting the ServerApp.
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    yield env
    stopped = subprocess.run(["bash", "-c", STOP_SUPERLINK], env=env, capture_output=True,
                             text=True, timeout=30)
    deadline = time.monotonic() + 20  # the SuperLink shuts down in order on SIGTERM
    while (left := _superlinks() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # what the documented stop missed, so that no test leaves one behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert stopped.returncode == 0 and not left, f"the documented stop left {left}: {stopped}"


def test_flwr_run_local_simulation_prints_the_fix_for_too_few_supernodes(flwr_env, tmp_path):
    """Flower's local simulation has 2 SuperNodes; four hospitals stop the run with the exact
    command that gives it 4, and after that command the same `flwr run` completes its rounds.
    (One test, one SuperLink: each start costs about a minute and a half of the suite.)"""
    flwr = shutil.which("flwr", path=flwr_env["PATH"])
    pyproject = (REPO / "pyproject.toml").read_bytes()
    run_config = (f"overrides='rounds=2 strategy.local_steps=2' "
                  f"run-dir='{tmp_path / 'four'}'")
    first = subprocess.run([flwr, "run", ".", "--stream", "--run-config", run_config], cwd=REPO,
                           env=flwr_env, capture_output=True, text=True, timeout=400)
    said = first.stdout + first.stderr
    assert "run `flwr federation simulation-config" in said, said[-3000:]
    fix = said.split("run `flwr federation ", 1)[1].split("`", 1)[0]
    assert fix.endswith("--num-supernodes 4")
    subprocess.run([flwr, "federation", *fix.split()], cwd=REPO, env=flwr_env, check=True,
                   capture_output=True, timeout=60)
    assert not (tmp_path / "four").exists()  # refused before anything was made
    second = subprocess.run([flwr, "run", ".", "--stream", "--run-config", run_config], cwd=REPO,
                            env=flwr_env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # flwr migrates a [tool.flwr.federations] table out of pyproject in place; we keep none
    assert (REPO / "pyproject.toml").read_bytes() == pyproject
    summary = json.loads((tmp_path / "four" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert len(summary["nodes"]) == 4
    assert "round 2/2 | global f1" in second.stdout + second.stderr  # snowfed's per-round lines
