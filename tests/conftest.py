"""Shared fixtures: composed configs and a small built federation store."""

from __future__ import annotations

import pytest

from snowfed.config import compose
from snowfed.sim.runner import plain_config


@pytest.fixture
def smoke_cfg() -> dict:
    return plain_config(compose(["federation=smoke"]))


@pytest.fixture
def smoke_store(smoke_cfg, tmp_path):
    from snowfed.sim.runner import prepare

    _, store = prepare(smoke_cfg, tmp_path / "run")
    return store


def ray_processes() -> set[int]:
    """The PIDs of this machine's Ray processes (raylet, GCS, workers, agents)."""
    import subprocess

    out = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server|default_worker"],
                         capture_output=True, text=True)
    return {int(pid) for pid in out.stdout.split()}


def wait_until_gone(pids: set[int], within_s: float) -> set[int]:
    """The PIDs among `pids` still running after `within_s` seconds (fewer checks if all go)."""
    import time

    deadline = time.monotonic() + within_s
    while (left := pids & ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def start_smoke_run(run_dir, until: str):
    """`snowfed run federation=smoke rounds=50` in a process of its own, returned once its
    progress printed a line starting with `until` (e.g. "round 2/") or 240 s passed."""
    import os
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "snowfed.cli", "run", "federation=smoke", "rounds=50",
         f"run_dir={run_dir}"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 240
    for line in proc.stderr:
        if line.startswith(until) or time.monotonic() > deadline:
            break
    return proc
